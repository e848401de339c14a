"""Tensor parallelism: the shard layout (exact), and a real gloo group of 2 processes whose sharded
model gives the single-device logits and greedy tokens (the layout tests cover tp=4 and 8)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import make_engine
from dist_util import run_ranks
from disagg.config import ModelConfig
from disagg.model.tensor_parallel import (TensorParallel, TPModelRunner, check_tp, kv_heads, local_config, q_heads,
                                          shard_weights)
from disagg.request import SamplingParams


def _cfg(hq: int, hkv: int, inter: int = 128) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=32, hidden_size=64, intermediate_size=inter, num_layers=1,
                       num_heads=hq, num_kv_heads=hkv, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4,
                       max_position_embeddings=64)


def test_head_assignment_exact():
    c = _cfg(8, 2)
    assert [list(q_heads(c, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(kv_heads(c, 4, r)) for r in range(4)] == [[0], [0], [1], [1]]     # replicated
    assert [list(kv_heads(c, 2, r)) for r in range(2)] == [[0], [1]]               # split
    assert [list(kv_heads(_cfg(8, 8), 2, r)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    lc = local_config(c, 4)
    assert (lc.num_heads, lc.num_kv_heads, lc.intermediate_size) == (2, 1, 32)
    # every rank's query heads use exactly its KV heads (q head h -> KV head h // G)
    for hq, hkv, tp in [(8, 2, 4), (8, 2, 2), (4, 1, 2), (8, 8, 4), (32, 8, 2)]:
        cfg, g = _cfg(hq, hkv), hq // hkv
        for r in range(tp):
            assert sorted({h // g for h in q_heads(cfg, tp, r)}) == list(kv_heads(cfg, tp, r))
    for bad in [(_cfg(6, 2), 4), (_cfg(8, 2, 100), 8), (_cfg(12, 3), 2)]:
        with pytest.raises(ValueError):
            check_tp(*bad)


def test_shards_reassemble_the_full_weights():
    c = _cfg(4, 2)
    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn(*s, generator=g) for n, s in [
        ("model.layers.0.self_attn.q_proj.weight", (64, 64)), ("model.layers.0.self_attn.k_proj.weight", (32, 64)),
        ("model.layers.0.self_attn.o_proj.weight", (64, 64)), ("model.layers.0.mlp.gate_proj.weight", (128, 64)),
        ("model.layers.0.mlp.down_proj.weight", (64, 128)), ("model.layers.0.self_attn.q_proj.bias", (64,)),
        ("model.embed_tokens.weight", (32, 64))]}
    shards = [dict(shard_weights(full.items(), c, 2, r)) for r in range(2)]
    for name, dim in [("q_proj.weight", 0), ("k_proj.weight", 0), ("o_proj.weight", 1), ("gate_proj.weight", 0),
                      ("down_proj.weight", 1), ("q_proj.bias", 0)]:
        n = next(k for k in full if k.endswith(name))
        assert torch.equal(torch.cat([s[n] for s in shards], dim=dim), full[n])
    assert all(torch.equal(s["model.embed_tokens.weight"], full["model.embed_tokens.weight"]) for s in shards)


def _prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


def _tp_body(rank: int, world: int, model_dirs: list[str]) -> None:
    from disagg.model.llama import AttnMetadata, PrefillSeq
    from prefill.ring_prefill import prompt_slots
    tp = TensorParallel.of(dist.group.WORLD)
    for d in model_dirs:
        ref = make_engine(d)
        eng = make_engine(d)
        eng.runner = TPModelRunner(eng.cfg, eng.model_cfg, eng.max_model_len, tp)   # swap in the shard
        assert eng.runner.model_cfg.num_kv_heads == len(kv_heads(eng.model_cfg, world, rank))
        # 1. logits of every token of one prompt
        prompt = _prompts(5, [29])[0]
        logits = []
        for e in (ref, eng):
            r = e.runner
            assert e.reserve("p", len(prompt))
            slots = prompt_slots(e.block_table("p"), len(prompt), r.block_size, r.device)
            S = len(prompt)
            meta = AttnMetadata(slot_mapping=slots, prefills=[PrefillSeq(0, S, S, torch.zeros(1, dtype=torch.long))])
            with torch.inference_mode():
                logits.append(r.model.compute_logits(r.model.forward(torch.tensor(prompt), torch.arange(S),
                                                                     meta, r.kv_caches)))
            e.release("p")
        torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"tp={world} rank {rank} {d}: {m}")
        # 2. batched greedy generation (chunked prefill past the budget of 64, paged decode), and a seeded sample
        prompts = _prompts(1, (5, 70, 17))
        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (10, 6, 12)]
        params[2] = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
        want = [r.output_token_ids for r in ref.generate(prompts, params)]
        got = [r.output_token_ids for r in eng.generate(prompts, params)]
        assert got == want, f"tp={world} rank {rank} {d}: {got} != {want}"


def test_tp2_equals_single_device(tiny_ckpts):
    # KV heads split (llama_gqa); q/k/v biases (qwen2_bias); one KV head replicated on both ranks (tied)
    run_ranks(_tp_body, 2, [tiny_ckpts(v) for v in ("llama_gqa", "qwen2_bias", "tied")])
