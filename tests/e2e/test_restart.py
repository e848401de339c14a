"""Dead workers come back: Ray restarts the actor, the pool re-forms its KV groups and routes to it again.

Ray CPU actors and gloo, as in test_faults.py. Each test keeps one event loop for all its phases
(the recovery runs as a task beside the requests):

- a decode worker killed mid-run (1P + 2D): every request completes equal to the colocated
  engine; the worker is re-admitted and the next requests' KV lands on it (its new process
  counts transfer plans); then the same for the only prefill worker (meanwhile the decode
  workers prefill locally);
- the last decode worker killed (1P + 1D): the cluster is unhealthy (503) while it is down,
  then serves again without being restarted;
- a ring helper killed (--prefill-cp 2): its leader prefills alone meanwhile, then the ring is
  re-formed and used again.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from conftest import make_engine
from disagg.request import SamplingParams

ray = pytest.importorskip("ray")

from cluster_util import run_requests, tiny_cluster, workload  # noqa: E402


async def _generate(eng, prompts, params, chaos=None):
    """All requests at once (with `chaos()` beside them): ("ok", tokens) or ("error", message) each."""
    return await run_requests(eng, prompts, params, chaos)


async def _until(cond, what: str, limit_s: float = 240.0) -> None:
    """A liveness bound, not a timing assertion: the restart must happen at some point."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit_s, f"never happened: {what}"
        await asyncio.sleep(0.2)


def _plans(eng, rank: int) -> int:
    return ray.get(eng.actors[rank].transfer_stats.remote())["plans"]


def test_restarted_decode_and_prefill_workers_rejoin_and_serve(tiny_ckpts):
    d = tiny_ckpts("llama_gqa")
    phases = [workload(16, seed=s, max_out=120 if s % 2 == 0 else 30) for s in (21, 22, 23, 24)]
    refs = [[r.output_token_ids for r in make_engine(d, num_blocks=4096).generate(p, sp)] for p, sp in phases]
    eng = tiny_cluster(d, 1, 2)

    async def kill(rank):
        # when the worker holds live requests (a fixed delay raced the workload: nothing to retry)
        def busy(st):
            if st.done:
                return False
            return st.decode_rank == rank if rank in eng.decode_ranks else (st.prefill_rank == rank and
                                                                           not st.first_seen)
        t0 = time.monotonic()
        while not any(busy(st) for st in eng.streams.values()):
            assert time.monotonic() - t0 < 60, f"rank {rank} never held a request"
            await asyncio.sleep(0.002)
        ray.kill(eng.actors[rank], no_restart=False)

    async def main():
        eng.start()
        try:
            got = [await _generate(eng, *phases[0], chaos=lambda: kill(2))]        # decode 2 dies mid-run
            await _until(lambda: eng.recovery.restarts["decode"] == 1, "decode 2 re-admitted")
            assert 2 not in eng.dispatcher.dead and eng.worker_status()["2"] == "up"
            got.append(await _generate(eng, *phases[1]))
            decode2_plans = _plans(eng, 2)         # its new process's counters: KV it received since
            got.append(await _generate(eng, *phases[2], chaos=lambda: kill(0)))    # the only prefill dies
            await _until(lambda: eng.recovery.restarts["prefill"] == 1, "prefill 0 re-admitted")
            before = [_plans(eng, r) for r in (1, 2)]
            got.append(await _generate(eng, *phases[3]))
            after = [_plans(eng, r) for r in (1, 2)]
            return got, decode2_plans, before, after
        finally:
            for t in eng._tasks:
                t.cancel()
    try:
        got, decode2_plans, before, after = asyncio.run(main())
        eng.check_integrity()
        transfer = eng.transfer
    finally:
        eng.stop()
    for i, (res, ref) in enumerate(zip(got, refs)):
        assert res == [("ok", want) for want in ref], f"phase {i}: {[r for r in res if r[0] != 'ok'][:3]}"
    assert decode2_plans > 0, "the restarted decode worker was never routed to"
    assert sum(after) > sum(before), f"the restarted prefill worker streamed no KV: {before} -> {after}"
    assert transfer["worker_restarts"] == {"prefill": 1, "decode": 1, "prefill_cp": 0}, transfer["worker_restarts"]
    assert eng.retries >= 1, "no request was retried"


def test_last_decode_worker_restarts_and_service_resumes(tiny_ckpts):
    d = tiny_ckpts("llama_gqa")
    prompts, _ = workload(8, seed=3)
    params = [SamplingParams(max_tokens=300, temperature=0, ignore_eos=True) for _ in prompts]
    after_p, after_sp = workload(8, seed=4)
    ref = [r.output_token_ids for r in make_engine(d, num_blocks=4096).generate(after_p, after_sp)]
    eng = tiny_cluster(d, 1, 1)
    seen = {}

    async def chaos():
        await asyncio.sleep(0.3)
        ray.kill(eng.actors[1], no_restart=False)
        await _until(lambda: not eng.healthy, "the death noticed")
        seen["status"] = eng.worker_status()["1"]
        try:                                       # what the server answers 503 with
            await eng.generate(prompts[0], params[0], "while-down").__anext__()
        except Exception as e:  # noqa: BLE001
            seen["error"] = f"{type(e).__name__}: {e}"

    async def main():
        eng.start()
        try:
            down = await _generate(eng, prompts, params, chaos)
            await _until(lambda: eng.healthy, "the decode worker back")
            return down, await _generate(eng, after_p, after_sp)
        finally:
            for t in eng._tasks:
                t.cancel()
    try:
        down, up = asyncio.run(main())
        eng.check_integrity()
    finally:
        eng.stop()
    assert seen["status"] in ("restarting", "dead") and "EngineDeadError" in seen["error"], seen
    errors = [r[1] for r in down if r[0] == "error"]
    assert errors and all("decode worker" in e for e in errors), down
    assert all(len(r[1]) == 300 for r in down if r[0] == "ok")
    assert up == [("ok", want) for want in ref]


def test_ring_helper_restarts_and_the_ring_reforms(tiny_ckpts):
    """--prefill-cp 2: the helper killed, the ring goes down on its leader (which prefills alone, equal
    outputs), then the restarted helper and the leader re-form the ring and prompts go around it again."""
    d = tiny_ckpts("llama_gqa")
    phases = [workload(8, seed=s, max_out=20) for s in (31, 32)]
    refs = [[r.output_token_ids for r in make_engine(d, num_blocks=4096).generate(p, sp)] for p, sp in phases]
    eng = tiny_cluster(d, 1, 1, prefill_cp=2, prefill_cp_min_tokens=16)
    helper = 2

    def ring_prefills():
        return ray.get(eng.actors[0].transfer_stats.remote())["ring_prefills"]

    async def main():
        eng.start()
        try:
            ray.kill(eng.helpers[helper], no_restart=False)
            await _until(lambda: helper in eng.recovery.dead_helpers or eng.recovery.restarts["prefill_cp"],
                         "the helper's death noticed")
            got = [await _generate(eng, *phases[0])]
            await _until(lambda: eng.recovery.restarts["prefill_cp"] == 1, "the helper re-admitted")
            before = ring_prefills()
            got.append(await _generate(eng, *phases[1]))
            return got, before, ring_prefills()
        finally:
            for t in eng._tasks:
                t.cancel()
    try:
        got, before, after = asyncio.run(main())
        eng.check_integrity()
    finally:
        eng.stop()
    for i, (res, ref) in enumerate(zip(got, refs)):
        assert res == [("ok", want) for want in ref], f"phase {i}: {[r for r in res if r[0] != 'ok'][:3]}"
    assert after > before                          # the re-formed ring is used
    assert 0 not in eng.dispatcher.dead
