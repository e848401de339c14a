"""Parallelism inside a pool, end to end on CPU (gloo, real processes).

Ring prefill: cp ranks prefill one prompt with ring attention; the leader's cache then holds the
whole prompt's KV. Its last-token logits and KV equal the single-device prefill's, and decoding
from that KV (as a decode worker does after a transfer) gives the colocated engine's greedy tokens.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cluster_util import generate_all
from conftest import make_engine
from dist_util import run_ranks
from disagg.request import SamplingParams


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _single_device_prefill(engine, prompt: list[int]):
    """Whole-prompt prefill on one device: (last-token logits [1, V], KV [layers, 2, S, Hkv, D])."""
    from prefill.ring_prefill import prompt_slots
    r = engine.runner
    rid = f"ref-{len(prompt)}"
    assert engine.reserve(rid, len(prompt))
    slots = prompt_slots(engine.block_table(rid), len(prompt), r.block_size, r.device)
    from disagg.model.llama import AttnMetadata, PrefillSeq
    S = len(prompt)
    meta = AttnMetadata(slot_mapping=slots, prefills=[PrefillSeq(0, S, S, torch.zeros(1, dtype=torch.long))])
    with torch.inference_mode():
        h = r.model.forward(torch.tensor(prompt), torch.arange(S), meta, r.kv_caches)
        logits = r.model.compute_logits(h[-1:])
    kv = _gather_kv(r, slots)
    engine.release(rid)
    return logits, kv


def _gather_kv(runner, slots: torch.Tensor) -> torch.Tensor:
    c = runner.model_cfg
    flat = runner.kv_cache.view(c.num_layers, 2, -1, c.num_kv_heads, c.head_dim)
    return flat[:, :, slots].clone()


def _ring_prefill_body(rank: int, world: int, cases: list[tuple[str, list[int]]], max_tokens: int) -> None:
    for model_dir, lengths in cases:
        _ring_prefill_checks(rank, world, model_dir, lengths, max_tokens)


def _ring_prefill_checks(rank: int, world: int, model_dir: str, lengths: list[int], max_tokens: int) -> None:
    from prefill.ring_prefill import prompt_slots, ring_prefill
    group = dist.group.WORLD
    engine = make_engine(model_dir)
    r = engine.runner
    ref_engine = make_engine(model_dir) if rank == 0 else None
    for n in lengths:
        prompt = _prompt(n, seed=n)
        rid = f"ring-{n}"
        slots = None
        if rank == 0:
            assert engine.reserve(rid, n)
            slots = prompt_slots(engine.block_table(rid), n, r.block_size, r.device)
        h = ring_prefill(r.model, r.kv_caches, torch.tensor(prompt), group, slots)
        if rank != 0:
            assert h is None
            continue
        logits = r.model.compute_logits(h)
        ref_logits, ref_kv = _single_device_prefill(ref_engine, prompt)
        where = f"cp={world}, prompt of {n}"
        torch.testing.assert_close(logits, ref_logits, atol=2e-4, rtol=1e-4, msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close(_gather_kv(r, slots), ref_kv, atol=2e-5, rtol=1e-5,
                                   msg=lambda m: f"{where}, KV: {m}")
        # Decode from the ring-prefilled KV, as the decode worker does once a transfer landed.
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        first = int(logits.argmax(-1))
        assert engine.add_prefilled(rid, prompt, first, params) is None
        out = [first]
        while engine.has_unfinished():
            for o in engine.step():
                out.extend(o.new_token_ids)
        ref = ref_engine.generate([prompt], params)[0].output_token_ids
        assert out == ref, f"{where}: ring-prefilled generation {out} != single-device {ref}"
        engine.block_manager.check_integrity()


def test_ring_prefill_equals_single_device(tiny_ckpts):
    # (4 processes are covered at the attention level in tests/unit/test_ring_attention.py)
    cases = [("llama_gqa", [4, 37, 70]),     # 4 = 2*cp: one-token chunks; 37: not divisible; 70 > budget 64
             ("qwen2_bias", [23]),           # q/k/v biases
             ("llama3_rope", [1, 45])]       # 1: rank 1's slice is empty; llama3 rope: positions matter
    run_ranks(_ring_prefill_body, 2, [(tiny_ckpts(v), lengths) for v, lengths in cases], 8)


# ---------------------------------------------------------------------- serving: disagg serve --prefill-cp 2
def test_ring_prefill_through_ray_equals_colocated(tiny_ckpts):
    """`--prefill 1 --prefill-cp 2 --decode 1` on Ray CPU actors (gloo): prompts of >= 16 tokens are
    prefilled by the leader and its helper with ring attention, shorter ones by the leader alone;
    every generation equals the colocated engine's."""
    pytest.importorskip("ray")
    import ray

    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.deploy.cluster import ClusterConfig, DisaggEngine
    from disagg.model.tokenizer import Tokenizer
    d = tiny_ckpts("llama_gqa")
    prompts = [_prompt(n, seed=n) for n in (5, 17, 70, 33)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (6, 9, 5, 8)]
    params[3] = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    colocated = make_engine(d).generate(prompts, params)
    ecfg = EngineConfig(d, device="cpu", cache=CacheConfig(block_size=4, num_blocks=256),
                        scheduler=SchedulerConfig(max_num_batched_tokens=64))
    eng = DisaggEngine(ClusterConfig(ecfg, 1, 1, kv_codec="none", use_gpus=False, local_prefill="never",
                                     prefill_cp=2, prefill_cp_min_tokens=16), Tokenizer(d), log=lambda *a: None)
    eng.launch()

    try:
        assert len(eng.helpers) == 1
        results = generate_all(eng, prompts, params)
        stats = ray.get(eng.actors[0].transfer_stats.remote())
        eng.check_integrity()
    finally:
        eng.stop()
    assert results == [r.output_token_ids for r in colocated]
    assert stats["ring_prefills"] == 3            # 17, 70 and 33 tokens went around the ring; 5 did not
