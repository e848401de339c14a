"""Our planner against NVIDIA AIConfigurator on the same model, GPUs, lengths and SLO.

    .venv/bin/pip install aiconfigurator            # offline (bundled perf database), not a dependency
    python benchmarks/sim_vs_aiconfigurator.py      # ~10-20 min on a 2-core CPU

For each GPU (H100, H200; 8 GPUs; Llama-3.1-8B; 1,020 prompt / 129 output tokens; TTFT <= 250 ms,
TPOT <= 25 ms):

1. AIConfigurator (`aiconfigurator cli default`, vLLM backend, via benchmarks/aic_predict.py):
   its best colocated ("agg") and disaggregated layouts and their predicted throughput per GPU.
2. Ours, for each of those two layouts: the highest Poisson request rate at which the simulator
   (our engine's performance model: the GPU's profile if shipped, else the roofline model) keeps
   at least 90% of requests within both SLOs, as requests/s and output tokens/s per GPU.
3. Ours: `disagg plan` at AIConfigurator's predicted 8-GPU colocated rate: the fewest GPUs and the
   layout our simulator recommends for that load.

Writes benchmarks/results/sim_vs_aiconfigurator.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def our_layout(mode: dict) -> tuple[int, int, int, int]:
    """(prefill workers, decode workers, prefill TP, decode TP) of an AIConfigurator top row."""
    row = mode["top"][0]
    if "(p)workers" in row:
        tp = lambda s: int(s.split("tp")[1].split("pp")[0])          # noqa: E731 - "tp1pp1..." -> 1
        return row["(p)workers"], row["(d)workers"], tp(row["(p)parallel"]), tp(row["(d)parallel"])
    t = int(row["parallel"].split("tp")[1].split("pp")[0])
    return 0, mode["replicas"], 0, t


def max_rate(layout, models, slo, isl, osl, duration, target, lo, hi, log) -> dict:
    """Highest rate (bisection to 3%) at which >= target of the requests meet the SLO."""
    from disagg.sim.report import summarize
    from disagg.sim.simulator import SimConfig, simulate
    from disagg.traces import synthetic
    p, d, tp, td = layout
    cfg = SimConfig(num_prefill=p, num_decode=d, max_model_len=4096)

    def attain(rate):
        tr = synthetic(max(50, int(rate * duration)), rate, prompt=("fixed", isl), output=("fixed", osl), seed=0)
        n = len(tr)
        s = summarize(simulate(tr, cfg, models(td), models(tp) if p else None,
                               stop_after_violations=int((1 - target) * n), slo=slo), slo)
        log(f"    {p}P x TP{tp} + {d}D x TP{td} at {rate:7.2f} req/s: SLO met by {100 * s['slo_attainment']:5.1f}%")
        return s
    best = None
    while attain(hi)["slo_attainment"] >= target:
        lo, hi = hi, hi * 2
    while lo > hi / 64 and attain(lo)["slo_attainment"] < target:
        lo, hi = lo / 2, lo
    while hi / lo > 1.03:
        mid = (lo * hi) ** 0.5
        s = attain(mid)
        if s["slo_attainment"] >= target:
            lo, best = mid, s
        else:
            hi = mid
    if best is None:
        best = attain(lo)
    gpus = best["gpus"]
    return {"layout": {"prefill": p, "decode": d, "prefill_tp": tp, "decode_tp": td}, "gpus": gpus,
            "max_rate": lo, "req_per_s_per_gpu": lo / gpus, "output_tok_per_s_per_gpu": lo * osl / gpus,
            "ttft_p90_ms": best["ttft_s"]["p90"] * 1e3, "tpot_p90_ms": best["tpot_s"]["p90"] * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="h100,h200")
    ap.add_argument("--total-gpus", type=int, default=8)
    ap.add_argument("--isl", type=int, default=1020)
    ap.add_argument("--osl", type=int, default=129)
    ap.add_argument("--ttft", type=float, default=250.0)
    ap.add_argument("--tpot", type=float, default=25.0)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of Poisson arrivals per simulation")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--no-plan", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/sim_vs_aiconfigurator.json"))
    args = ap.parse_args()

    from benchmarks.aic_predict import run as aic_run
    from disagg.sim.cli import HERE, model_config
    from disagg.sim.gpus import gpu_key
    from disagg.sim.perf_model import make_model
    from disagg.sim.profile_model import load_profile
    from disagg.sim.plan import Planner, format_plan
    from disagg.sim.simulator import SimConfig
    from disagg.traces import synthetic

    def log(m):
        print(m, file=sys.stderr, flush=True)
    mc = model_config("llama3-8b")
    slo = (args.ttft / 1e3, args.tpot / 1e3)
    out = {"model": "Llama-3.1-8B shape", "isl": args.isl, "osl": args.osl, "slo_ms": [args.ttft, args.tpot],
           "target": args.target, "total_gpus": args.total_gpus, "gpus": {}}
    for g in args.gpus.split(","):
        system = {"h100": "h100_sxm", "h200": "h200_sxm"}[g]
        t = time.perf_counter()
        aic = aic_run(argparse.Namespace(model="meta-llama/Meta-Llama-3.1-8B", system=system, backend="vllm",
                                         total_gpus=args.total_gpus, isl=args.isl, osl=args.osl, ttft=args.ttft,
                                         tpot=args.tpot, top=3))
        log(f"{g}: AIConfigurator in {time.perf_counter() - t:.0f}s")
        path = os.path.join(HERE, "profiles", f"{gpu_key(g)}_llama3_8b.json")
        prof = load_profile(path) if os.path.exists(path) else None
        models = lambda tp, g=g, prof=prof: make_model(mc, g, tp, "nvlink", prof)   # noqa: E731
        entry = {"aiconfigurator": aic, "perf_model": models(1).describe(), "ours_on_aic_layouts": {}}
        for mode, m in aic["modes"].items():
            layout = our_layout(m)
            gp = layout[0] * layout[2] + layout[1] * layout[3]
            aic_rate_per_gpu = m["request_rate_total"] / args.total_gpus
            log(f"{g} {mode}: AIConfigurator {layout} -> {aic_rate_per_gpu:.2f} req/s/GPU; ours:")
            entry["ours_on_aic_layouts"][mode] = max_rate(layout, models, slo, args.isl, args.osl, args.duration,
                                                         args.target, lo=0.5 * gp, hi=aic_rate_per_gpu * gp, log=log)
        if not args.no_plan and "agg" in aic["modes"]:
            rate = aic["modes"]["agg"]["request_rate_total"]
            tr = synthetic(max(50, int(rate * args.duration)), rate, prompt=("fixed", args.isl),
                           output=("fixed", args.osl), seed=0)
            pl = Planner(tr, SimConfig(max_model_len=4096), models, slo, max_gpus=2 * args.total_gpus,
                         target=args.target, tps=(1, 2), log=log)
            ranked = pl.search()
            log(format_plan(ranked, 5, slo, args.target, pl.sims))
            entry["plan_at_aic_agg_rate"] = {"rate": rate, "sims": pl.sims, "best": [
                {"layout": c.layout, "codec": c.codec, "gpus": c.gpus, "attainment": c.attainment,
                 "goodput_per_gpu": c.goodput_per_gpu, "ttft_p90_ms": c.summary["ttft_s"]["p90"] * 1e3,
                 "tpot_p90_ms": c.summary["tpot_s"]["p90"] * 1e3} for c in ranked[:5]]}
        out["gpus"][g] = entry
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    for g, e in out["gpus"].items():
        for mode, m in e["aiconfigurator"]["modes"].items():
            ours = e["ours_on_aic_layouts"][mode]
            print(f"{g} {mode:>6}: AIConfigurator {m['request_rate_total'] / args.total_gpus:6.2f} req/s/GPU "
                  f"({m['tokens_per_s_per_gpu']:,.0f} tok/s/GPU) | ours on that layout "
                  f"{ours['req_per_s_per_gpu']:6.2f} req/s/GPU ({ours['output_tok_per_s_per_gpu']:,.0f} tok/s/GPU)")
        if "plan_at_aic_agg_rate" in e:
            b = e["plan_at_aic_agg_rate"]["best"]
            print(f"{g} plan at {e['plan_at_aic_agg_rate']['rate']:.1f} req/s: "
                  + (f"{b[0]['layout']} ({b[0]['gpus']} GPUs)" if b else "nothing within the budget"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
