"""Performance models, the profiler on CPU, the planner, and the CLI (disagg/sim)."""
from __future__ import annotations

import json
import os

import pytest

from disagg.config import ModelConfig
from disagg.sim.perf_model import RooflineModel
from disagg.sim.profile_model import ProfileModel
from disagg.sim.simulator import SimConfig
from disagg.traces import synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "..", "disagg", "sim", "configs")


def config(name: str) -> ModelConfig:
    with open(os.path.join(CONFIGS, name)) as f:
        return ModelConfig.from_hf_dict(json.load(f), name=name)


def test_roofline_reproduces_the_h200_figures_it_was_fitted_to():
    """benchmarks/RESULTS.md, issue 2: decode steps (ms) and 2K prefills on one H200."""
    m = RooflineModel(config("llama3_8b.json"), "h200")
    for b, c, ms in [(1, 512, 4.84), (1, 4096, 5.01), (16, 512, 5.32), (16, 4096, 7.21), (64, 512, 6.56),
                     (64, 1024, 7.61), (64, 4096, 13.99), (256, 512, 13.07)]:
        assert m._decode(b, b * c) * 1e3 == pytest.approx(ms, rel=0.03)
    assert m._prefill(2048, 0) * 1e3 == pytest.approx(51.3, rel=0.03)
    assert m._prefill(2048, 2048) * 1e3 == pytest.approx(62.2, rel=0.03)
    four = m.prefill_chunks_time([(2048, 0)] * 4) - m.sched_s - 4 * m.sched_seq_s
    assert four * 1e3 == pytest.approx(204.3, rel=0.03)          # 4 prompts: 4x the attention of one, not 16x
    # slower memory, same FLOP/s: decode slower, prefill about the same
    h100 = RooflineModel(config("llama3_8b.json"), "h100")
    assert h100._decode(1, 512) > m._decode(1, 512) and h100._prefill(2048, 0) == pytest.approx(51.3e-3, rel=0.05)
    assert 0 < h100.num_kv_blocks(16) < m.num_kv_blocks(16)


def test_tensor_parallel_model():
    mc = config("llama3_8b.json")
    h200 = RooflineModel(mc, "h200", tp=2)                   # RESULTS.md issue 6: TP=2 decode, 1,024 tokens
    for b, ms in ((1, 4.11), (64, 6.14)):
        assert h200._tp(h200._decode(b, b * 1024), b, b) * 1e3 == pytest.approx(ms, rel=0.06)
    one, two = RooflineModel(mc, "h100"), RooflineModel(mc, "h100", tp=2)
    assert two.decode_time(32, 32 * 1024) < one.decode_time(32, 32 * 1024)
    assert two.prefill_chunks_time([(2048, 0)]) < one.prefill_chunks_time([(2048, 0)])
    assert two.num_kv_blocks(16) > 2 * one.num_kv_blocks(16)     # the second GPU's weight share is KV now
    assert two._allreduce_s(64) > 0 == one._allreduce_s(64)
    with pytest.raises(ValueError):
        RooflineModel(mc, "h100", tp=3)


def fake_profile(**over) -> dict:
    with open(os.path.join(CONFIGS, "smollm2_135m.json")) as f:
        hf = json.load(f)
    p = {"format": "disagg-perf-profile-v1", "gpu": "NVIDIA H100 80GB HBM3", "model": {"name": "smollm2", "config": hf},
         "kv_cache": {"num_blocks": 1000, "block_size": 16, "gpu_memory_utilization": 0.9},
         "decode": {"batch": [1, 8], "context": [100, 1000], "seconds": [[1.0, 2.0], [3.0, None]]},
         "prefill": {"tokens": [10, 100], "context": [0, 1000], "seconds": [[5.0, 6.0], [7.0, 9.0]]},
         "per_prompt_s": 0.5, "host": {"sched_s": 0.0, "sched_seq_s": 0.0},
         "codecs": {"int8": {"tokens": [100, 200], "encode_s": [1.0, 2.0], "decode_s": [3.0, 5.0], "ratio": 1.9}}}
    p.update(over)
    return p


def test_profile_model_interpolates_and_extrapolates():
    m = ProfileModel(fake_profile())
    assert m.decode_time(1, 100) == 1.0 and m.decode_time(1, 550) == 1.5 and m.decode_time(1, 1900) == 3.0
    assert m.decode_time(8, 800) == 3.0
    # the missing cell: the row above's cost per KV token (1 s per 900 tokens), times 8 requests
    assert m.decode_time(8, 8000) == pytest.approx(3.0 + 8 * 900 / 900)
    assert m.decode_time(4, 400) == pytest.approx(1.0 + (3.0 - 1.0) * 3 / 7)
    assert m.prefill_chunks_time([(55, 0)]) == pytest.approx(6.0)
    assert m.prefill_chunks_time([(10, 1000)]) == pytest.approx(6.0)
    assert m.prefill_chunks_time([(5, 0)]) == 5.0                  # below the grid: flat
    two = m.prefill_chunks_time([(50, 0)] * 2)                     # 100 tokens, half the attention: + per prompt
    assert 0.5 * 7.0 + 0.5 < two < 7.0 + 0.5
    assert m.codec_layer_s("int8", 150) == (1.5, 4.0) and m.codec_ratio("int8") == 1.9
    assert m.codec_ratio("none") == 1.0
    graphs = ProfileModel(fake_profile(decode={"batch": [1, 8], "context": [100, 1000], "seconds": [[1.0, 2.0],
                                                                                                   [3.0, 4.0]],
                                               "graph_sizes": [1, 2, 4, 8]}))
    assert graphs.decode_time(3, 300) == pytest.approx(graphs.decode_time(4, 300))   # runs as the 4-graph
    with pytest.raises(ValueError):
        ProfileModel({"format": "other"})


def test_profile_model_mixed_decode_extra():
    """Decodes sharing a step with a prefill chunk cost the measured extra (interpolated over the
    batch); decode-only and prefill-only steps do not."""
    base, mx = ProfileModel(fake_profile()), ProfileModel(fake_profile(mixed_decode={"batch": [1, 8],
                                                                                     "extra_s": [0.2, 0.9]}))
    assert mx.decode_time(4, 400) == base.decode_time(4, 400)
    assert mx.prefill_chunks_time([(55, 0)]) == base.prefill_chunks_time([(55, 0)])
    assert mx.prefill_chunks_time([(55, 0)], 1, 100) == pytest.approx(base.prefill_chunks_time([(55, 0)], 1, 100) + 0.2)
    assert mx.prefill_chunks_time([(55, 0)], 4, 400) == pytest.approx(base.prefill_chunks_time([(55, 0)], 4, 400) + 0.5)


def test_profile_model_mixed_extra_is_robust_to_one_jittered_point():
    """Extras on a line 3 + 0.01 B, but B=1 measured 12 (one jittered run): the fitted line is the
    line through the other four, where a least-squares fit would bend to the outlier."""
    xs = [1, 8, 32, 128, 256]
    ys = [12.0] + [3.0 + 0.01 * b for b in xs[1:]]
    m = ProfileModel(fake_profile(mixed_decode={"batch": xs, "extra_s": ys}))
    assert m._mixed_extra(64) == pytest.approx(3.64)
    assert m._mixed_extra(1) == pytest.approx(3.01)
    down = ProfileModel(fake_profile(mixed_decode={"batch": [1, 8, 64], "extra_s": [5.0, 4.0, 3.0]}))
    assert down._mixed_extra(100) == pytest.approx(4.0)            # never cheaper with more decodes


def test_profile_model_mixed_extra_depends_on_the_chunk_length():
    """A line in the batch per measured chunk length, linear between lengths, flat past them."""
    md = {"batch": [1, 64, 1, 64], "prefill_tokens": [64, 64, 1024, 1024], "extra_s": [4.0, 4.0, 1.0, 3.0]}
    m = ProfileModel(fake_profile(mixed_decode=md))
    assert m._mixed_extra(64, 64) == pytest.approx(4.0) and m._mixed_extra(64, 1024) == pytest.approx(3.0)
    assert m._mixed_extra(64, 544) == pytest.approx(3.5)
    assert m._mixed_extra(1, 4000) == pytest.approx(1.0) and m._mixed_extra(1, 10) == pytest.approx(4.0)
    base = ProfileModel(fake_profile())
    assert m.prefill_chunks_time([(1024, 0)], 64, 6400) == pytest.approx(
        base.prefill_chunks_time([(1024, 0)], 64, 6400) + 3.0)


def test_profile_model_straggler_term():
    """One long context among short ones costs the measured extra over equal contexts; equal
    contexts (longest = mean) and unknown longest (0) cost nothing more; interpolated between
    the measured lengths from 0 at the base context, relative to the batch's mean context."""
    st = {"batch": [16, 64], "max_context": [2048, 4096], "base_context": 1024,
          "extra_s": [[0.2, 0.6], [0.4, 1.0]]}
    base, m = ProfileModel(fake_profile()), ProfileModel(fake_profile(decode_straggler=st))
    k = 16 * 500
    assert m.decode_time(16, k) == base.decode_time(16, k) == m.decode_time(16, k, 500)
    assert m.decode_time(16, k, 4096) == pytest.approx(base.decode_time(16, k) + 0.6)
    assert m.decode_time(16, k, 3072) == pytest.approx(base.decode_time(16, k) + 0.4)
    assert m.decode_time(40, 40 * 500, 2048) == pytest.approx(base.decode_time(40, 40 * 500) + 0.3)
    assert m.decode_time(16, 16 * 1536, 4096) == pytest.approx(base.decode_time(16, 16 * 1536) + 0.6 - 0.1)
    assert m.step_time(16, k, [(55, 0)], 4096) == pytest.approx(base.step_time(16, k, [(55, 0)]) + 0.6)


def test_profile_model_pads_prefill_steps_to_the_piecewise_bucket():
    """A step of n tokens runs its GEMMs padded to the next captured bucket, its attention on n:
    prefill(n, c) + prefill(bucket, 0) - prefill(n, 0). Past the last bucket (eager) no padding."""
    tab = {"tokens": [10, 100, 200], "context": [0, 1000], "seconds": [[5.0, 6.0], [7.0, 9.0], [11.0, 15.0]]}
    flat = ProfileModel(fake_profile(prefill=tab))
    pad = ProfileModel(fake_profile(prefill={**tab, "buckets": [10, 100]}))
    assert pad.prefill_chunks_time([(100, 0)]) == flat.prefill_chunks_time([(100, 0)]) == 7.0
    # 55 tokens after 1000 cached: flat 6.0 + (9.0 - 6.0) * 0.5 = 7.5; padded to 100: + 7.0 - 6.0
    assert flat.prefill_chunks_time([(55, 1000)]) == pytest.approx(7.5)
    assert pad.prefill_chunks_time([(55, 1000)]) == pytest.approx(7.5 + 1.0)
    assert pad.prefill_chunks_time([(150, 0)]) == flat.prefill_chunks_time([(150, 0)]) == pytest.approx(9.0)


def test_profile_measures_on_cpu():
    """disagg profile's measurement loop on a tiny model on CPU (times meaningless, shape of the JSON not)."""
    import torch

    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.model_runner import ModelRunner
    from disagg.sim import profile
    from disagg.sim.serving_probe import write_model_dir
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256, hidden_size=32,
              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
              rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512)
    mc = ModelConfig.from_hf_dict(hf, name="tiny")
    cfg = EngineConfig(write_model_dir(hf), dtype="float32", device="cpu", load_format="dummy",
                       cache=CacheConfig(num_blocks=256), scheduler=SchedulerConfig(max_model_len=512))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grid = dict(batch=(1, 4), context=(32, 128), tokens=(16, 64), pcontext=(0, 64), multi=((2, 16),),
                    codec_tokens=(32,), mixed=((2, 32, 16, 0),), mixed_batch=(1, 2),
                    straggler_batch=(4,), straggler_context=(128,), straggler_base=32, host_s=3.0,
                    host_on_runner=True, served_min=3)
        prof = profile.measure(ModelRunner(cfg, mc, 512), hf, "tiny", "cpu", grid)
    finally:
        torch.set_num_threads(threads)
    assert prof["decode"]["batch"] == [1, 4] and all(x > 0 for row in prof["decode"]["seconds"] for x in row)
    assert len(prof["prefill"]["seconds"]) == 2 and prof["validation"][0]["seconds"] > 0
    md = prof["mixed_decode"]         # from the serving run's steps with decodes and prompt chunks
    assert md["source"] == "serving run" and len(md["batch"]) == len(md["extra_s"]) >= 3
    assert "_steps" not in prof["host"] and prof["host"]["decode_steps"] > 10
    assert prof["decode_straggler"]["batch"] == [4] and len(prof["decode_straggler"]["extra_s"][0]) == 1
    assert set(prof["host"]) >= {"sched_s", "sched_seq_s", "chunk_s", "chunk_token_s"}
    assert set(prof["codecs"]) == {"none", "fp8", "int8", "int4"} and prof["codecs"]["int4"]["ratio"] > 3
    m = ProfileModel({**json.loads(json.dumps(prof)), "gpu": "h100"})
    assert m.decode_time(2, 100) > 0 and m.num_kv_blocks(16) > 0


def test_planner_finds_the_fewest_gpus():
    from disagg.sim.plan import Planner, format_plan
    mc = config("llama3_8b.json")
    tr = synthetic(240, 12.0, prompt=("lognormal", 800, 0.5), output=("lognormal", 100, 0.5), seed=0)
    slo = (0.3, 0.012)
    pl = Planner(tr, SimConfig(), lambda tp: RooflineModel(mc, "h100", tp), slo, max_gpus=4, tps=(1, 2),
                 log=lambda m: None)
    ranked = pl.search()
    assert ranked and all(c.attainment >= 0.9 for c in ranked)
    best = ranked[0]
    assert best.gpus == min(c.gpus for c in ranked)
    if best.prefill == 0 and best.decode > 1:                  # one replica fewer misses the SLO
        assert pl.evaluate(0, best.decode - 1, 0, best.decode_tp, "none").attainment < 0.9
    assert "goodput/GPU" in format_plan(ranked, 5, slo, 0.9, pl.sims)


def test_cli_simulate_json(tmp_path, capsys):
    from disagg.cli import main
    out = tmp_path / "s.json"
    assert main(["simulate", "--trace", "synthetic", "--rate", "5", "--duration", "20", "--gpu", "h200",
                 "--prefill", "1", "--decode", "1", "--slo", "ttft=500,tpot=50", "--json", "--json-out", str(out),
                 "--sweep-rates", "2,5", "--no-progress"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["summary"]["successful"] == s["summary"]["requests"] > 50
    assert [p["rate"] for p in s["sweep"]] == [2.0, 5.0]
    assert json.loads(out.read_text())["summary"]["slo"] == {"ttft_s": 0.5, "tpot_s": 0.05}
