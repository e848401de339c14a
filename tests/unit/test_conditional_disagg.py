"""Conditional disaggregation and the decode worker's reservation ledger, without Ray.

The decode worker is built with no channel (nothing is transferred here): local prefills
and the ledger are engine-thread bookkeeping. The dispatch decision is the cluster's
router-side function over fabricated worker loads.
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_engine
from disagg.messages import PrefillRequest, Reserve, WorkerLoad, params_to_dict
from disagg.request import SamplingParams
from router.policy import reserved_blocks


def _prompt(seed, n):
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _decode_worker(model_dir, num_blocks=256):
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from decode.worker import DecodeWorker
    from kvtransfer.codec import get_codec
    cfg = EngineConfig(model_dir, dtype="float32", device="cpu", cache=CacheConfig(block_size=4, num_blocks=num_blocks),
                       scheduler=SchedulerConfig(max_num_batched_tokens=64))
    return DecodeWorker(cfg, rank=1, channel=None, codec=get_codec("none"))


def _drain(w, limit=500):
    toks: dict[str, list[int]] = {}
    reasons = {}
    for _ in range(limit):
        w.run_step()
        for o in w.take_outputs(0):
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason:
                reasons[o.request_id] = o.finish_reason
        if not w.has_work():
            return toks, reasons
    raise AssertionError("decode worker did not finish")


def test_local_prefill_on_the_decode_worker_equals_colocated(tiny_ckpts):
    d = tiny_ckpts("llama_gqa")
    prompts = [_prompt(1, 9), _prompt(2, 70), _prompt(3, 1)]       # 70 > step budget 64: chunked
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ref = [r.output_token_ids for r in make_engine(d).generate(prompts, sp)]
    w = _decode_worker(d)
    for i, p in enumerate(prompts):
        w.control(PrefillRequest(f"r{i}", p, params_to_dict(sp), dest_rank=1, predicted_len=5.0))
    toks, reasons = _drain(w)
    assert [toks[f"r{i}"] for i in range(3)] == ref
    assert set(reasons.values()) == {"length"} and w.local_prefills == 3
    w.engine.block_manager.check_integrity()
    assert w.engine.block_manager.num_free_blocks == w.engine.block_manager.num_blocks
    assert w.ledger == {} and w.committed == 0


def test_local_prefill_that_can_never_fit_ends_with_an_error(tiny_ckpts):
    w = _decode_worker(tiny_ckpts("llama_gqa"), num_blocks=8)        # 32 tokens of KV
    w.control(PrefillRequest("big", _prompt(4, 100), params_to_dict(SamplingParams(max_tokens=4)), 1))
    w.run_step()
    (out,) = w.take_outputs(0)
    assert out.finish_reason == "error" and out.error and not w.has_work()


def test_ledger_promises_the_prediction_and_grows_when_a_request_outlives_it(tiny_ckpts):
    """committed = promised - held, recomputed each step: it shrinks as the request grows into
    its prediction, then, past the prediction, grows with the policy's geometric margin."""
    w = _decode_worker(tiny_ckpts("llama_gqa"))
    bs = 4
    p = _prompt(5, 10)
    sp = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    w.control(PrefillRequest("r", p, params_to_dict(sp), dest_rank=1, predicted_len=8.0))
    seen = []
    for _ in range(200):
        w.run_step()
        w.take_outputs(0)
        req = w.engine.requests.get("r")
        if req is None:
            break
        held = len(w.engine.block_manager.block_table("r"))
        promised = reserved_blocks(10, 8.0, req.num_output_tokens, bs, max_tokens=60)
        assert w.committed == max(0, promised - held)
        assert w.load().committed_blocks == w.committed
        seen.append((req.num_output_tokens, promised))
    assert w.committed == 0 and "r" not in w.ledger
    gens = [g for g, _ in seen]
    assert max(gens) >= 59 and min(gens) <= 8
    assert seen[-1][1] > reserved_blocks(10, 8.0, 0, bs)         # corrected upwards past the prediction
    assert all(a[1] <= b[1] for a, b in zip(seen, seen[1:]))     # never shrinks while it lives


def test_reserve_records_the_promise_and_release_clears_it(tiny_ckpts):
    w = _decode_worker(tiny_ckpts("llama_gqa"))
    reply = w.reserve(Reserve("q", 10, predicted_len=30.0, max_tokens=100))
    assert reply.ok
    w.run_step()
    assert w.committed == reserved_blocks(10, 30.0, 0, 4, max_tokens=100) - 3     # holds ceil(11 / 4) = 3
    w.control("q")                                                                  # abort before any KV
    w.run_step()
    assert w.committed == 0 and w.ledger == {}
    assert w.engine.block_manager.num_free_blocks == w.engine.block_manager.num_blocks


# ---------------------------------------------------------------------- router-side decision
def _router(model_dir, **kw):
    from disagg.config import CacheConfig, EngineConfig
    from disagg.deploy.cluster import ClusterConfig, DisaggEngine
    ecfg = EngineConfig(model_dir, dtype="float32", device="cpu", cache=CacheConfig(block_size=4))
    eng = DisaggEngine(ClusterConfig(ecfg, **kw), tokenizer=None, log=lambda *a: None)
    return eng


def _loads(eng, decode_running=0, prefill_queued=0, c=1e-4):
    d = eng.decode_ranks[0]
    eng.loads.clear()
    eng.loads.update({r: WorkerLoad(r, "prefill", 0, 0, prefill_queued, 100, 100, prefill_s_per_token=c)
                      for r in eng.prefill_ranks})
    eng.loads[d] = WorkerLoad(d, "decode", decode_running, 0, 0, 100, 100)


def test_dispatch_decision_follows_the_cost_model(tiny_ckpts):
    d = tiny_ckpts("llama_gqa")
    eng = _router(d, num_prefill=1, num_decode=1, local_prefill_threshold=64)
    eng.dispatcher.link_bytes_per_s = 1e9
    _loads(eng, decode_running=8)
    assert eng.dispatcher.prefill_here(32, 1)            # under the threshold: rides along, no transfer
    assert not eng.dispatcher.prefill_here(2000, 1)      # long prompt, busy decode worker: the prefill pool
    _loads(eng, decode_running=8, prefill_queued=10**6)
    assert eng.dispatcher.prefill_here(2000, 1)          # the prefill pool is backed up: stay local
    _loads(eng, decode_running=0)
    assert eng.dispatcher.prefill_here(2000, 1)          # nothing decoding there to stall
    never = _router(d, num_prefill=1, num_decode=1, local_prefill="never")
    never.dispatcher.link_bytes_per_s = 1e9
    _loads(never)
    assert not never.dispatcher.prefill_here(1, 1)
    assert _router(d, num_prefill=0, num_decode=1).dispatcher.prefill_here(5000, 0)
    eng.dispatcher.dead.add(0)                  # the prefill pool died: everything goes local
    _loads(eng, decode_running=8)
    assert eng.dispatcher.prefill_here(2000, 1)


def test_cluster_config_validates_local_prefill(tiny_ckpts):
    from disagg.config import EngineConfig
    from disagg.deploy.cluster import ClusterConfig
    e = EngineConfig(tiny_ckpts("llama_gqa"))
    with pytest.raises(ValueError, match="local-prefill"):
        ClusterConfig(e, local_prefill="sometimes")
    with pytest.raises(ValueError, match="prefill pool"):
        ClusterConfig(e, num_prefill=0, local_prefill="never")
    with pytest.raises(ValueError, match="at least"):
        ClusterConfig(e, num_prefill=1, num_decode=0)


def test_prompt_no_decode_worker_can_hold_is_a_400_at_once(tiny_ckpts):
    import asyncio

    from router.openai_api import APIError
    eng = _router(tiny_ckpts("llama_gqa"), num_prefill=1, num_decode=1)
    _loads(eng)                                   # decode worker: 100 blocks of 4 tokens
    with pytest.raises(APIError) as e:
        asyncio.run(eng.dispatcher.acquire("big", 400, 10.0, 16, reserve=None))
    assert e.value.status == 400 and "400 tokens" not in e.value.message and "holds 400" in e.value.message
    assert eng.dispatcher.waiting == {}
    eng.dispatcher.dead.add(1)                  # no live decode worker: 503 at once
    with pytest.raises(APIError) as e:
        asyncio.run(eng.dispatcher.acquire("small", 4, 10.0, 16, reserve=None))
    assert e.value.status == 503 and not eng.healthy
