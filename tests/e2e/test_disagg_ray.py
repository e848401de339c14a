"""Disaggregated serving through Ray CPU actors and gloo: equal to the colocated engine, token for token."""
from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from conftest import make_engine
from disagg.request import SamplingParams

ray = pytest.importorskip("ray")


def _prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


def _cluster(model_dir, codec="none", num_prefill=1, num_decode=1, budget=64, local_prefill="never"):
    """local_prefill="never" by default: these tests are about the transfer path."""
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.deploy.cluster import ClusterConfig, DisaggEngine
    from disagg.model.tokenizer import Tokenizer
    ecfg = EngineConfig(model_dir, device="cpu", cache=CacheConfig(block_size=4, num_blocks=256),
                        scheduler=SchedulerConfig(max_num_batched_tokens=budget))
    eng = DisaggEngine(ClusterConfig(ecfg, num_prefill, num_decode, kv_codec=codec, use_gpus=False,
                                     local_prefill=local_prefill),
                       Tokenizer(model_dir), log=lambda *a: None)
    eng.launch()
    return eng


async def _run_all(eng, prompts, params):
    eng.start()

    async def one(p, sp):
        toks, reason = [], None
        async for out in eng.generate(p, sp, uuid.uuid4().hex):
            toks.extend(out.new_token_ids)
            reason = out.finish_reason
        return toks, reason
    try:
        return await asyncio.gather(*[one(p, sp) for p, sp in zip(prompts, params)])
    finally:
        for t in eng._tasks:
            t.cancel()


@pytest.fixture(scope="module")
def tiny_cluster(tiny_ckpts):
    eng = _cluster(tiny_ckpts("llama_gqa"))
    yield eng
    eng.stop()


def test_disaggregated_equals_colocated_tiny(tiny_ckpts, tiny_cluster):
    d = tiny_ckpts("llama_gqa")
    prompts = _prompts(1, (5, 17, 70, 1, 33, 9))   # 70 > budget 64: a chunked prefill on the prefill worker
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (12, 1, 20, 7, 16, 3)]
    params[4] = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    colocated = make_engine(d).generate(prompts, params)
    results = asyncio.run(_run_all(tiny_cluster, prompts, params))
    for (toks, reason), ref in zip(results, colocated):
        assert toks == ref.output_token_ids
        assert reason == ref.finish_reason
    tiny_cluster.check_integrity()


def test_disaggregated_equals_colocated_smollm2(smollm2_dir):
    from disagg.model.tokenizer import Tokenizer
    tok = Tokenizer(smollm2_dir)
    qs = ["What is the capital of France?", "Write a haiku about the sea.", "Count to five."]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in qs]
    params = [SamplingParams(max_tokens=24, temperature=0)] * len(prompts)
    colocated = make_engine(smollm2_dir, num_blocks=256, block_size=16, budget=256).generate(prompts, params)
    eng = _cluster(smollm2_dir, codec="none", budget=256)
    try:
        results = asyncio.run(_run_all(eng, prompts, params))
        eng.check_integrity()
    finally:
        eng.stop()
    for (toks, reason), ref in zip(results, colocated):
        assert toks == ref.output_token_ids and reason == ref.finish_reason
    assert "Paris" in tok.decode(results[0][0])


def test_lossy_codec_serves_and_counts_bytes(tiny_ckpts):
    """int8 over gloo: requests complete, the wire carries about half the raw bytes."""
    d = tiny_ckpts("llama_gqa")
    eng = _cluster(d, codec="int8")
    try:
        prompts = _prompts(3, (30, 12))
        params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)] * 2
        results = asyncio.run(_run_all(eng, prompts, params))
        import ray as _ray
        stats = _ray.get(eng.actors[0].transfer_stats.remote())
    finally:
        eng.stop()
    assert [len(t) for t, _ in results] == [6, 6]
    assert 0 < stats["bytes_wire"] < 0.7 * stats["bytes_raw"]


def test_colocated_replicas_behind_the_router(tiny_ckpts):
    """--prefill 0 --decode 2: every request prefills on the decode worker it was sent to (conditional
    disaggregation with no prefill pool), and equals the colocated engine."""
    d = tiny_ckpts("llama_gqa")
    prompts = _prompts(4, (5, 70, 1, 33, 9, 20))
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (12, 5, 20, 7, 16, 3)]
    colocated = make_engine(d).generate(prompts, params)
    eng = _cluster(d, num_prefill=0, num_decode=2, local_prefill="auto")
    try:
        results = asyncio.run(_run_all(eng, prompts, params))
        eng.check_integrity()
        import ray as _ray
        served = [_ray.get(a.transfer_stats.remote())["local_prefills"] for a in eng.actors.values()]
    finally:
        eng.stop()
    for (toks, reason), ref in zip(results, colocated):
        assert toks == ref.output_token_ids and reason == ref.finish_reason
    assert eng.local_prefills == len(prompts) and eng.codec == "none"
    assert sum(served) == len(prompts)
