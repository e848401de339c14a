"""Serving's steps replayed alone: does a step cost more while serving than on its own?

    python benchmarks/replay_steps.py [RESULT.json] [--point 1] [--decode-sample 300]    # GPU, ~2 min
    python benchmarks/replay_steps.py --device cpu --model-config tiny RESULT.json       # CPU smoke run

Takes the steps the real engine ran in one replay of a sim_fidelity result (every step with a
prefill chunk, an even sample of the decode-only ones) and runs each shape again, in the order
served, on a runner built with the same settings (and warmed up as sim_fidelity warms up): the
first call of the shape ("cold") and the median of three more ("warm"). Decode requests get
equal contexts (their recorded total); sampled decode steps are also run with spread contexts
(a ramp from 0.25x to 1.75x the mean, same total), since serving's batches mix short and long
requests and the decode kernel's programs run as long as their own request.

Prints, per kind of step, the recorded runner.execute seconds, cold, warm and the profile
model's prediction (sums and median ratios) and the shapes whose first call costs the most.
If serving's steps are slower than the same shapes alone, the difference is the serving
process (allocator, collector, other threads), not the step model; if cold is slower than
warm, shapes met for the first time pay (kernel selection, allocation) and the profile, which
times warm shapes only, misses it. Writes benchmarks/results/replay_steps_<gpu>.json ($OUT too).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

RUN3 = os.path.join(ROOT, "benchmarks/results/sim_fidelity_nvidia-h200_llama3-8b_run3.json")


def decode_contexts(b: int, k: int, spread: bool) -> list[int]:
    """b contexts summing to about k: equal, or a ramp from 0.25x to 1.75x the mean."""
    mean = k / b
    if not spread or b == 1:
        return [max(1, round(mean))] * b
    return [max(1, round(mean * (0.25 + 1.5 * i / (b - 1)))) for i in range(b)]


def build(runner, decodes: list[int], chunks: list[tuple[int, int]]):
    """A SchedulerOutput: decodes at contexts `decodes`, then prefill chunks (n new after c cached),
    each request on scattered blocks (disagg/sim/profile.py's step_of, as the profile measures)."""
    from disagg.sim.profile import step_of
    return step_of(runner, [(1, x - 1) for x in decodes] + list(chunks))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", nargs="?", default=RUN3, help="a sim_fidelity result JSON")
    ap.add_argument("--point", type=int, default=-1, help="which replay of the result (default: the last)")
    ap.add_argument("--decode-sample", type=int, default=300, help="decode-only steps to replay")
    ap.add_argument("--model-config", default=None, help="default: the result's model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", default=os.path.join(ROOT, "disagg/sim/profiles/h200_llama3_8b.json"))
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop replaying after this long")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.llm_engine import LLMEngine
    from disagg.sim.cli import model_config
    from disagg.sim.profile_model import ProfileModel, load_profile
    from disagg.sim.serving_probe import write_model_dir
    from sim_fidelity import TINY, warm_up

    res = json.load(open(args.result))
    point = res["points"][args.point]
    spec = args.model_config or res["model"]
    if spec == "tiny":
        hf = dict(TINY)
    else:
        mc0 = model_config(spec)
        path = spec if os.path.exists(spec) else os.path.join(
            ROOT, "disagg/sim/configs", {"llama3-8b": "llama3_8b.json", "smollm2": "smollm2_135m.json"}[mc0.name])
        hf = json.load(open(path))
    dev = torch.device(args.device if args.device == "cpu" or torch.cuda.is_available() else "cpu")
    max_len = min(8192, hf["max_position_embeddings"])
    cfg = EngineConfig(write_model_dir(hf), dtype="bfloat16" if dev.type == "cuda" else "float32", device=str(dev),
                       load_format="dummy", cache=CacheConfig(num_blocks=res["num_blocks"], cpu_kv_gib=0.25),
                       scheduler=SchedulerConfig(max_num_seqs=res["max_num_seqs"], max_model_len=max_len,
                                                 max_num_batched_tokens=res["max_num_batched_tokens"]))
    t = time.perf_counter()
    eng = LLMEngine(cfg, detokenize=False)
    runner = eng.runner
    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"runner up in {time.perf_counter() - t:.0f}s on {gpu_name}; warm-up "
          f"{warm_up(eng, max_len, res['max_num_batched_tokens']):.0f}s", flush=True)
    pm = ProfileModel({**load_profile(args.profile), "gpu": "h200"}) if dev.type == "cuda" else None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(out) -> float:
        sync()
        t0 = time.perf_counter()
        runner.execute(out)
        sync()
        return time.perf_counter() - t0

    steps = point["steps"]
    dec_idx = [i for i, s in enumerate(steps) if not s[2]]
    every = max(1, len(dec_idx) // max(args.decode_sample, 1))
    pick = sorted([i for i, s in enumerate(steps) if s[2]] + dec_idx[::every][:args.decode_sample])
    rows, deadline = [], time.perf_counter() + args.budget_s
    for i in pick:
        if time.perf_counter() > deadline:
            print(f"budget reached after {len(rows)} of {len(pick)} steps", flush=True)
            break
        b, k, chunks, served_s, served_exec_s = steps[i][:5]
        chunks = [tuple(c) for c in chunks]
        row = {"step": i, "decodes": b, "kv_tokens": k, "chunks": chunks, "served_s": served_s,
               "served_exec_s": served_exec_s,
               "model_s": pm.step_time(b, k, chunks) - pm.host_s(b, chunks) if pm else None}
        out = build(runner, decode_contexts(b, k, False), chunks) if b else build(runner, [], chunks)
        row["cold_s"] = timed(out)
        row["warm_s"] = statistics.median(timed(out) for _ in range(3))
        if b > 1 and not chunks:
            spread = build(runner, decode_contexts(b, k, True), chunks)
            timed(spread)
            row["spread_warm_s"] = statistics.median(timed(spread) for _ in range(3))
        rows.append(row)

    summary = {}
    for kind, sel in (("decode", lambda r: not r["chunks"]), ("mixed", lambda r: bool(r["chunks"]))):
        rs = [r for r in rows if sel(r)]
        if not rs:
            continue
        ent = {"steps": len(rs)}
        for key in ("served_exec_s", "cold_s", "warm_s", "model_s", "spread_warm_s"):
            xs = [r[key] for r in rs if r.get(key) is not None]
            if xs:
                ent[key] = {"sum": sum(xs), "median": statistics.median(xs)}
        for num, den in (("served_exec_s", "warm_s"), ("cold_s", "warm_s"), ("model_s", "warm_s"),
                         ("spread_warm_s", "warm_s"), ("model_s", "served_exec_s")):
            xs = [r[num] / r[den] for r in rs if r.get(num) is not None and r.get(den)]
            if xs:
                ent[f"{num[:-2]}/{den[:-2]}"] = {"median": statistics.median(xs),
                                                 "p90": sorted(xs)[int(0.9 * (len(xs) - 1))]}
        summary[kind] = ent
        print(f"\n{kind}: {len(rs)} steps; sums: " + ", ".join(
            f"{key[:-2]} {ent[key]['sum']:.3f}s" for key in ("served_exec_s", "cold_s", "warm_s", "model_s",
                                                              "spread_warm_s") if key in ent))
        for key, v in ent.items():
            if "/" in key:
                print(f"  {key}: median x{v['median']:.3f}, P90 x{v['p90']:.3f}")
    worst = sorted(rows, key=lambda r: r["cold_s"] - r["warm_s"], reverse=True)[:10]
    print("\nfirst calls that cost the most (cold - warm):")
    for r in worst:
        print(f"  step {r['step']}: {r['decodes']} decodes + {r['chunks']}: served {r['served_exec_s'] * 1e3:.1f} ms, "
              f"cold {r['cold_s'] * 1e3:.1f}, warm {r['warm_s'] * 1e3:.1f}")
    slug = "cpu" if dev.type == "cpu" else gpu_name.lower().replace(" ", "-")
    path = args.out or os.path.join(ROOT, "benchmarks/results", f"replay_steps_{slug}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": "replay_steps", "device": gpu_name, "source": os.path.basename(args.result),
                   "point_rate": point["rate"], "summary": summary, "rows": rows}, f, indent=1)
    if os.environ.get("OUT"):
        shutil.copy(path, os.environ["OUT"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
