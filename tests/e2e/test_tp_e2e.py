"""Tensor-parallel workers through Ray CPU actors and gloo: `--prefill-tp 2 --decode-tp 1`, `--prefill-tp 1
--decode-tp 2` (the KV transfer reshards the heads rank to rank) and colocated replicas of 2 ranks
(`--prefill 0 --decode 1 --decode-tp 2`); greedy and seeded outputs equal the single-device colocated engine's."""
from __future__ import annotations


import pytest
import torch

from cluster_util import generate_all
from conftest import make_engine
from disagg.request import SamplingParams

ray = pytest.importorskip("ray")


def _prompts(lengths):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("num_prefill,prefill_tp,decode_tp", [(1, 2, 1), (1, 1, 2), (0, 1, 2)],
                         ids=["prefill_tp2", "decode_tp2", "colocated_tp2"])
def test_tp_cluster_equals_colocated(tiny_ckpts, num_prefill, prefill_tp, decode_tp):
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.deploy.cluster import ClusterConfig, DisaggEngine
    from disagg.model.tokenizer import Tokenizer
    d = tiny_ckpts("llama_gqa")                      # 4 query heads, 2 KV heads: split on 2 ranks
    prompts = _prompts((5, 17, 70, 33))              # 70 > budget 64: a chunked prefill
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (6, 9, 5, 8)]
    params[3] = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    colocated = [r.output_token_ids for r in make_engine(d).generate(prompts, params)]
    ecfg = EngineConfig(d, device="cpu", cache=CacheConfig(block_size=4, num_blocks=256),
                        scheduler=SchedulerConfig(max_num_batched_tokens=64))
    eng = DisaggEngine(ClusterConfig(ecfg, num_prefill, 1, kv_codec="none", use_gpus=False,
                                     local_prefill="never" if num_prefill else "auto",
                                     prefill_tp=prefill_tp, decode_tp=decode_tp), Tokenizer(d), log=lambda *a: None)
    eng.launch()

    try:
        assert len(eng.helpers) == (prefill_tp - 1) * num_prefill + decode_tp - 1     # the TP followers
        results = generate_all(eng, prompts, params)
        stats = ray.get([a.transfer_stats.remote() for a in eng.actors.values()])
        eng.check_integrity()
    finally:
        eng.stop()
    assert results == colocated
    if num_prefill:     # the whole prompts' KV went over, in every TP rank's slices
        kv_bytes = eng._mc.kv_bytes_per_token(torch.float32) * sum(len(p) for p in prompts)
        assert stats[0]["bytes_raw"] == kv_bytes and stats[1]["plans"] >= 1 and stats[1]["failures"] == 0
