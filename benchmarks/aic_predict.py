"""The bar to clear: NVIDIA AIConfigurator's prediction for vLLM on the same model, GPUs, lengths and SLO.

    pip install aiconfigurator          # offline: ships its H200 perf database; runs on CPU in ~10 s
    python benchmarks/aic_predict.py    # -> results/aiconfigurator_llama3.1-8b_h200x2.json

Runs `aiconfigurator cli default` (aggregated = colocated replicas against disaggregated
xPyD, best configuration of each under the SLO) and keeps, for each mode, the top rows of
its `best_config_topn.csv` with the figures that matter: request rate, output tokens/s per
GPU, TTFT, TPOT, concurrency, and the worker layout. benchmarks/bench_goodput.py reads the
JSON and prints it beside our measured figure (aiconfigurator is not installed on the GPU
machine, so the prediction is made here, once).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "aiconfigurator_llama3.1-8b_h200x2.json")
KEEP = ["concurrency", "request_rate", "seq/s", "tokens/s", "tokens/s/gpu", "tokens/s/user", "ttft", "tpot",
        "request_latency", "num_total_gpus", "parallel", "bs", "(p)workers", "(d)workers", "(p)bs", "(d)bs",
        "(p)parallel", "(d)parallel", "(p)seq/s/worker", "(d)seq/s/worker", "backend", "version", "system"]


def _num(v: str):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v else f


def run(args) -> dict:
    exe = shutil.which("aiconfigurator") or os.path.join(os.path.dirname(sys.executable), "aiconfigurator")
    save = tempfile.mkdtemp(prefix="aic-")
    cmd = [exe, "cli", "default", "--model-path", args.model, "--system", args.system, "--backend", args.backend,
           "--total-gpus", str(args.total_gpus), "--isl", str(args.isl), "--osl", str(args.osl),
           "--ttft", str(args.ttft), "--tpot", str(args.tpot), "--save-dir", save, "--no-color"]
    shown = "aiconfigurator " + " ".join(cmd[1:-3])          # without the temporary --save-dir
    print("$", shown, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"aiconfigurator failed (rc={p.returncode}):\n{p.stderr[-3000:]}")
    out = {"tool": "aiconfigurator", "version": _version(), "command": shown,
           "model": args.model, "system": args.system, "backend": args.backend, "total_gpus": args.total_gpus,
           "isl": args.isl, "osl": args.osl, "slo_ms": {"ttft": args.ttft, "tpot": args.tpot},
           "seconds": round(time.perf_counter() - t0, 1), "modes": {}}
    for mode in ("agg", "disagg"):
        files = glob.glob(os.path.join(save, "**", mode, "best_config_topn.csv"), recursive=True)
        if not files:
            continue
        with open(files[0], newline="") as f:
            rows = [{k: _num(v) for k, v in r.items() if k in KEEP} for r in csv.DictReader(f)]
        if rows:
            best = rows[0]
            gpus = best.get("num_total_gpus") or 1
            # request_rate in the CSV is per replica; scale to the whole deployment of --total-gpus GPUs
            replicas = args.total_gpus // gpus if gpus else 1
            out["modes"][mode] = {"replicas": replicas, "request_rate_total": best["request_rate"] * replicas,
                                  "tokens_per_s_per_gpu": best["tokens/s/gpu"], "ttft_ms": best["ttft"],
                                  "tpot_ms": best["tpot"], "concurrency_total": best["concurrency"] * replicas,
                                  "top": rows[:args.top]}
    shutil.rmtree(save, ignore_errors=True)
    return out


def _version() -> str | None:
    try:
        from importlib.metadata import version
        return version("aiconfigurator")
    except Exception:  # noqa: BLE001
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="meta-llama/Meta-Llama-3.1-8B")
    ap.add_argument("--system", default="h200_sxm")
    ap.add_argument("--backend", default="vllm")
    ap.add_argument("--total-gpus", type=int, default=2)
    ap.add_argument("--isl", type=int, default=1020)
    ap.add_argument("--osl", type=int, default=129)
    ap.add_argument("--ttft", type=float, default=250.0)
    ap.add_argument("--tpot", type=float, default=25.0)
    ap.add_argument("--top", type=int, default=3, help="rows kept per mode")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    data = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    for mode, m in data["modes"].items():
        print(f"{mode:>6}: {m['request_rate_total']:.2f} req/s on {args.total_gpus} GPUs "
              f"({m['tokens_per_s_per_gpu']:,.0f} output tok/s/GPU, TTFT {m['ttft_ms']:.1f} ms, "
              f"TPOT {m['tpot_ms']:.2f} ms, {m['replicas']} replica(s), concurrency {m['concurrency_total']})")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
