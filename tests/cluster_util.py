"""Driving a DisaggEngine from a test (or benchmarks/bench_faults.py): a tiny cluster, a workload
of known lengths, one request's end, and a batch of them."""
from __future__ import annotations

import asyncio
import random
import uuid


def tiny_cluster(model_dir: str, num_prefill: int, num_decode: int, device: str = "cpu", num_blocks: int = 2048,
                 **kw):
    """A launched cluster of a tiny fp32 checkpoint (Ray CPU actors, or one GPU per worker on cuda):
    lossless KV (outputs must equal the colocated engine's), prompts prefilled by the prefill pool."""
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.deploy.cluster import ClusterConfig, DisaggEngine
    from disagg.model.tokenizer import Tokenizer
    ecfg = EngineConfig(model_dir, device=device, dtype="float32",
                        cache=CacheConfig(block_size=4, num_blocks=num_blocks),
                        scheduler=SchedulerConfig(max_num_batched_tokens=64))
    kw.setdefault("kv_codec", "none")
    kw.setdefault("local_prefill", "never" if num_prefill else "always")
    eng = DisaggEngine(ClusterConfig(ecfg, num_prefill, num_decode, use_gpus=device == "cuda", **kw),
                       Tokenizer(model_dir), log=lambda *a: None)
    eng.launch()
    return eng


def workload(n: int, seed: int, max_prompt: int = 60, max_out: int = 40):
    """n random prompts (1..max_prompt tokens) with greedy, ignore_eos answers of 4..max_out tokens."""
    import torch

    from disagg.request import SamplingParams
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    prompts = [torch.randint(3, 384, (rnd.randint(1, max_prompt),), generator=g).tolist() for _ in range(n)]
    params = [SamplingParams(max_tokens=rnd.randint(4, max_out), temperature=0, ignore_eos=True) for _ in range(n)]
    return prompts, params


async def collect(eng, prompt, params) -> tuple[str, object]:
    """One request: ("ok", its tokens) or ("error", message) (a clean error is an acceptable end)."""
    toks = []
    try:
        async for out in eng.generate(prompt, params, uuid.uuid4().hex):
            toks.extend(out.new_token_ids)
            if out.finished:
                return "ok", toks
        return "error", "stream ended without a finish"
    except Exception as e:  # noqa: BLE001 - reported to the test
        return "error", f"{type(e).__name__}: {e}"


async def run_requests(eng, prompts, params, chaos=None, timeout: float = 120.0) -> list[tuple[str, object]]:
    """Every request at once (with `chaos()` beside them); asserts none hangs past `timeout`."""
    tasks = [asyncio.ensure_future(collect(eng, p, sp)) for p, sp in zip(prompts, params)]
    if chaos is not None:
        await chaos()
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    if pending:                  # say where each unfinished request was (the flaky-restart lead)
        where = [dict(id=st.request_id, attempt=st.attempt, decode=st.decode_rank, prefill=st.prefill_rank,
                      first_seen=st.first_seen, out=st.num_out, buffered=len(st.buffered), done=st.done)
                 for st in getattr(eng, "streams", {}).values()]
        for w in where:          # and what the workers hold for it
            try:
                import ray
                w["workers"] = {r: ray.get(a.where.remote(w["id"]), timeout=10) for r, a in eng.actors.items()}
            except Exception as e:  # noqa: BLE001 - diagnostics only
                w["workers"] = repr(e)
        assert not pending, (f"{len(pending)} requests hung; streams: {where}; dead: "
                             f"{sorted(getattr(getattr(eng, 'dispatcher', None), 'dead', []))}; "
                             f"waiting: {list(getattr(getattr(eng, 'dispatcher', None), 'waiting', {}))}")
    return [t.result() for t in tasks]


def generate_all(eng, prompts, params, timeout: float = 120.0) -> list[list[int]]:
    """Start the engine, run the requests, stop its tasks; each request's tokens (errors fail the test)."""
    async def main():
        eng.start()
        try:
            res = await run_requests(eng, prompts, params, timeout=timeout)
        finally:
            for t in eng._tasks:
                t.cancel()
        bad = [r for r in res if r[0] != "ok"]
        assert not bad, bad[:3]
        return [toks for _, toks in res]
    return asyncio.run(main())
