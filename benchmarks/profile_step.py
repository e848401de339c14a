"""Where does an eager prefill / mixed step's time go? One runner, a few steps, torch.profiler.

    python benchmarks/profile_step.py                 # Llama-3-8B shape, random bf16 weights (GPU)
    python benchmarks/profile_step.py --shape tiny    # CPU smoke run

For each step kind it prints the median wall time of runner.execute() (synchronised), the
same step with the torch-reference kernels instead of Triton (launch cost of Triton's Python
launcher), and for a 16-token prefill the profiler's top operators by host and device time.
Results: benchmarks/results/profile_step_<gpu>.json (and $OUT when set).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_engine import write_model_dir  # noqa: E402
from decode.scheduler import ScheduledRequest, SchedulerOutput  # noqa: E402
from disagg.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from disagg.engine.model_runner import ModelRunner  # noqa: E402
from disagg.kernels import REFERENCE  # noqa: E402
from disagg.request import Request, SamplingParams  # noqa: E402


def step_of(runner, items):
    """[(new tokens, cached tokens)] -> a SchedulerOutput over fresh block ranges, decodes first."""
    bs, nxt, sched = runner.block_size, 0, []
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, (n, c) in enumerate(items):
        req = Request(f"q{i}", [1 + (i + j) % 100 for j in range(n + c)], params)
        req.num_computed_tokens = c
        nb = -(-(n + c) // bs)
        sched.append(ScheduledRequest(req, n, list(range(nxt, nxt + nb))))
        nxt += nb
    return SchedulerOutput(sorted(sched, key=lambda s: not s.is_decode))


def timed(fn, device, iters, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        common.sync(device)
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated step kinds to time (default: all)")
    ap.add_argument("--profile-only", action="store_true", help="skip the fresh-length sweep")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    d = write_model_dir(args.shape, dtype)
    mc = ModelConfig.from_dir(d)
    cfg = EngineConfig(model_dir=d, load_format="dummy", device=device.type,
                       cache=CacheConfig(block_size=16, num_blocks=6000),
                       scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=8192))
    runner = ModelRunner(cfg, mc, 8192)
    noop = lambda *a: None  # noqa: E731 - a layer hook forces the eager path for decode-only steps
    kinds = {
        "decode_b1_graph": ([(1, 1024)], None),
        "decode_b1_eager": ([(1, 1024)], noop),
        "decode_b32_graph": ([(1, 1024)] * 32, None),
        "decode_b32_eager": ([(1, 1024)] * 32, noop),
        "prefill_16": ([(16, 0)], None),
        "prefill_128": ([(128, 0)], None),
        "prefill_512": ([(512, 0)], None),
        "prefill_2048": ([(2048, 0)], None),
        "chunk_256_after_1024": ([(256, 1024)], None),
        "mixed_32dec_256": ([(1, 1024)] * 32 + [(256, 0)], None),
        "mixed_32dec_4x64": ([(1, 1024)] * 32 + [(64, 0)] * 4, None),
        # shapes seen in serving (sim_fidelity at 12 req/s): a few decodes and a short chunk over a prefix
        "chunk_6_after_368": ([(6, 368)], None),
        "dec1_chunk_6_after_368": ([(1, 407)] + [(6, 368)], None),
        "dec8_chunk_15_after_864": ([(1, 1300)] * 8 + [(15, 864)], None),
        "dec8_prefill_15": ([(1, 1300)] * 8 + [(15, 0)], None),
    }
    res = dict(benchmark="profile_step", shape=args.shape, machine=common.machine_info(device),
               kernels=runner.kernels.name, steps={})
    for name, (items, hook) in kinds.items():
        if args.only and name not in args.only.split(","):
            continue
        s = step_of(runner, items)
        t = timed(lambda: runner.execute(s, layer_hook=hook), device, args.iters)
        ent = {"triton_ms": t * 1e3}
        if runner.piecewise is not None:     # the same step with its prefill pieces run eagerly
            pw, runner.piecewise = runner.piecewise, None
            try:
                ent["eager_ms"] = timed(lambda: runner.execute(s, layer_hook=hook), device, args.iters) * 1e3
            finally:
                runner.piecewise = pw
        if runner.kernels is not REFERENCE and name.startswith(("prefill_16", "decode_b1_eager", "mixed_32dec_256")):
            k, runner.model.k = runner.model.k, REFERENCE
            try:
                ent["reference_kernels_ms"] = timed(lambda: runner.execute(s, layer_hook=hook), device,
                                                    args.iters) * 1e3
            finally:
                runner.model.k = k
        # host time alone: launch everything, no sync before returning (sampling syncs, so skip it)
        meta_s = step_of(runner, items)
        res["steps"][name] = ent
        print(f"{name:24s} " + "  ".join(f"{k} {v:8.2f}" for k, v in ent.items()), flush=True)
        del meta_s

    # Serving rarely repeats a prefill length: time steps whose prompt length is new each time,
    # under each SDPA backend (cuDNN builds an execution plan per new shape).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"default": None, "default_eager": "eager", "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    res["fresh_lengths"] = {}
    for bi, (bname, be) in enumerate([] if args.profile_only else backends.items()):
        for kind in ("prefill", "mixed32"):
            ts = []
            for i in range(8):
                n = 301 + 13 * i + 131 * bi + (1000 if kind == "mixed32" else 0)
                items = ([(1, 1024)] * 32 if kind == "mixed32" else []) + [(n, 0)]
                s = step_of(runner, items)
                try:
                    common.sync(device)
                    t0 = time.perf_counter()
                    if be is None:
                        runner.execute(s)
                    elif be == "eager":
                        pw, runner.piecewise = runner.piecewise, None
                        try:
                            runner.execute(s)
                        finally:
                            runner.piecewise = pw
                    else:
                        with sdpa_kernel(be):
                            runner.execute(s)
                    common.sync(device)
                    ts.append((time.perf_counter() - t0) * 1e3)
                except RuntimeError as e:       # a backend that cannot run this shape here
                    ts.append(f"error: {str(e)[:80]}")
                    break
            res["fresh_lengths"][f"{bname}_{kind}"] = ts
            print(f"fresh lengths, sdpa {bname:9s} {kind:8s}: " + " ".join(
                f"{t:.1f}" if isinstance(t, float) else t for t in ts), flush=True)
        if be not in (None, "eager") and all(isinstance(t, float) for t in ts):       # the same lengths again: warm
            with sdpa_kernel(be):
                n = 301 + 131 * bi
                s = step_of(runner, [(1, 1024)] * 32 + [(n + 1000, 0)])
                res["fresh_lengths"][f"{bname}_mixed32_repeat"] = timed(lambda: runner.execute(s), device, 5) * 1e3

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in (["dec8_chunk_15_after_864"] if args.profile_only else ["mixed_32dec_256", "dec8_chunk_15_after_864"]):
        items, hook = kinds[name]
        s = step_of(runner, items)
        runner.execute(s, layer_hook=hook)
        common.sync(device)
        with profile(activities=acts) as prof:
            for _ in range(3):
                runner.execute(s, layer_hook=hook)
            common.sync(device)
        ka = prof.key_averages()
        by_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=25)
        print(f"\n==== {name}: top operators by self CPU time (3 steps) ====\n{by_cpu}", flush=True)
        res[f"profile_{name}_cpu"] = by_cpu
        if device.type == "cuda":
            by_dev = ka.table(sort_by="self_cuda_time_total", row_limit=30)
            print(f"\n==== {name}: top by device time ====\n{by_dev}", flush=True)
            res[f"profile_{name}_cuda"] = by_dev
    common.write_json(res, f"profile_step_{common.device_slug(device)}.json")


if __name__ == "__main__":
    main()
