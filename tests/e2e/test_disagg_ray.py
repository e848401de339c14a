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


def _cluster(model_dir, codec="none", num_prefill=1, num_decode=1, budget=64):
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.deploy.cluster import ClusterConfig, DisaggEngine
    from disagg.model.tokenizer import Tokenizer
    ecfg = EngineConfig(model_dir, device="cpu", cache=CacheConfig(block_size=4, num_blocks=256),
                        scheduler=SchedulerConfig(max_num_batched_tokens=budget))
    eng = DisaggEngine(ClusterConfig(ecfg, num_prefill, num_decode, kv_codec=codec, use_gpus=False),
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
