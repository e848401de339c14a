"""How fast the simulator runs: a one-hour trace at 10 requests/s on CPU.

    python benchmarks/sim_speed.py            # -> benchmarks/results/sim_speed_cpu.json

The Azure conversation trace rescaled to 10 req/s lasts 32 minutes; it is laid end to end with
itself to fill an hour (36,698 requests), then simulated for a few deployments of the Llama-3-8B
shape on H100s (roofline model): CPU seconds (time.process_time) and wall seconds of simulate(),
with the machine's load average beside them (the development VM is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--layouts", default="0x1,0x3,2x3", help="PxD,... (prefill x decode workers)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/sim_speed_cpu.json"))
    args = ap.parse_args()
    from disagg.sim.cli import find_trace, model_config
    from disagg.sim.perf_model import RooflineModel
    from disagg.sim.report import summarize
    from disagg.sim.simulator import SimConfig, simulate
    from disagg.traces import cap_lengths, load_csv, rescale, window
    base = cap_lengths(rescale(load_csv(find_trace("azure-conv")), args.rate), 8192)
    tr, span = list(base), args.hours * 3600
    while tr[-1].arrival_s < span:
        off = tr[-1].arrival_s + 1 / args.rate
        tr += [replace(q, arrival_s=q.arrival_s + off) for q in base]
    tr = window(tr, span)
    m = RooflineModel(model_config("llama3-8b"), "h100")
    runs = []
    for lay in args.layouts.split(","):
        p, d = (int(x) for x in lay.split("x"))
        load0 = os.getloadavg()[0]
        c0, w0 = time.process_time(), time.perf_counter()
        res = simulate(tr, SimConfig(num_prefill=p, num_decode=d), m)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        s = summarize(res, (1.0, 0.05))
        runs.append({"prefill": p, "decode": d, "requests": len(tr), "cpu_s": cpu, "wall_s": wall,
                     "load_avg": [load0, os.getloadavg()[0]], "steps": sum(w.steps for w in res.workers),
                     "windows": sum(w.windows for w in res.workers), "slo_attainment": s["slo_attainment"]})
        print(f"{p}P+{d}D: {len(tr)} requests, {tr[-1].arrival_s:.0f}s of trace: {cpu:.1f}s CPU, {wall:.1f}s wall "
              f"(load average {load0:.1f}), {runs[-1]['steps']:,} engine steps in {runs[-1]['windows']:,} windows "
              f"+ single steps", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "sim_speed", "rate": args.rate, "hours": args.hours, "runs": runs,
                   "cpus": os.cpu_count()}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
