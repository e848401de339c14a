"""Piecewise forward (disagg/engine/piecewise.py): the chain of pieces over padded static buffers
gives model.forward's hidden states and writes the same KV. Uncaptured on CPU; captured on CUDA."""
from __future__ import annotations

import pytest
import torch

from decode.scheduler import ScheduledRequest, SchedulerOutput
from disagg.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from disagg.engine.model_runner import ModelRunner
from disagg.engine.piecewise import PiecewiseGraphs
from disagg.request import Request, SamplingParams

BS = 4


def _runner(model_dir: str) -> ModelRunner:
    cfg = EngineConfig(model_dir, dtype="float32", use_cuda_graphs=False,
                       cache=CacheConfig(block_size=BS, num_blocks=64),
                       scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8))
    return ModelRunner(cfg, ModelConfig.from_dir(model_dir), 256)


def _sched(items, seed=0):
    """[(new tokens, cached tokens)] over disjoint block ranges, decodes first."""
    g = torch.Generator().manual_seed(seed)
    nxt, out = 0, []
    for i, (n, c) in enumerate(items):
        req = Request(f"r{i}", torch.randint(3, 300, (n + c,), generator=g).tolist(),
                      SamplingParams(max_tokens=4, temperature=0.0))
        req.num_computed_tokens = c
        nb = -(-(n + c) // BS)
        out.append(ScheduledRequest(req, n, list(range(nxt, nxt + nb))))
        nxt += nb
    return SchedulerOutput(sorted(out, key=lambda s: not s.is_decode))


def _forward_both(runner, sched, pw):
    ids, pos, slots, dt, dl, pf = runner._prepare(sched)
    meta = runner._meta(slots, dt, dl, pf)
    ref = runner.model.forward(runner._tensor(ids), runner._tensor(pos), meta, runner.kv_caches)
    hooked = []
    got = pw.run(ids, pos, slots, meta, layer_hook=lambda i, k, v: hooked.append(i))
    assert hooked == list(range(runner.model_cfg.num_layers))
    return ref, got.clone()


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2_bias"])
def test_piecewise_equals_forward_on_mixed_steps(tiny_ckpts, variant):
    runner = _runner(tiny_ckpts(variant))
    dev = runner.device
    # a second cache for the piecewise chain, so the KV each path writes can be compared
    kv_pw = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    pw = PiecewiseGraphs(runner.model, kv_pw, max_tokens=64, capture=dev.type == "cuda")
    assert pw.sizes == [16, 32, 64]
    # step 1: prompts only (13 + 6 = 19 tokens: bucket 32, 13 padding rows)
    s1 = _sched([(13, 0), (6, 0)])
    ref, got = _forward_both(runner, s1, pw)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # step 2: two decodes over cached contexts, a chunk over a cached prefix, a fresh prompt
    s2 = _sched([(1, 13), (1, 6), (7, 5), (9, 0)], seed=1)
    for (k, v), (k2, v2) in zip(runner.kv_caches, kv_pw):
        k2.copy_(k), v2.copy_(v)
    ref, got = _forward_both(runner, s2, pw)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for (k, v), (k2, v2) in zip(runner.kv_caches, kv_pw):   # same KV written, nothing by padding rows
        torch.testing.assert_close(k2, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v2, v, rtol=1e-5, atol=1e-5)


def test_piecewise_buckets(tiny_ckpts):
    runner = _runner(tiny_ckpts("llama_gqa"))
    pw = PiecewiseGraphs(runner.model, runner.kv_caches, max_tokens=100, capture=False)
    assert pw.max_tokens == 64 and pw.bucket(1) == 16 and pw.bucket(17) == 32 and pw.bucket(65) is None
    with pytest.raises(ValueError):
        PiecewiseGraphs(runner.model, runner.kv_caches, max_tokens=8, capture=False)
