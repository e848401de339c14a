"""Where does the simulator's fidelity error come from? The schedules, or the step times?

    python benchmarks/sim_fidelity_steps.py [results/sim_fidelity_<gpu>_<model>_run3.json]   # CPU, ~1 min

Re-runs the simulator (uncoalesced, the shipped H200 profile) on the trace slices of a
sim_fidelity result and compares with the engine's recorded steps: steps, steps with prefill
chunks, tokens and chunks per such step, decodes per step; then applies the step-time model to
the engine's own step shapes: model / measured per step (median) and in total (busy seconds);
last, the simulator as sim_fidelity runs it (coalesced) with the current model code and profile:
predicted against the recorded measured P50 / P90 TTFT and TPOT (--profile FILE: another profile).
"""
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from disagg.sim.profile_model import ProfileModel, load_profile  # noqa: E402
from disagg.sim.report import summarize  # noqa: E402
from disagg.sim.simulator import SimConfig, Simulator  # noqa: E402
from disagg.traces import cap_lengths, load_csv, rescale  # noqa: E402
from sim_fidelity import default_trace  # noqa: E402

RUN3 = os.path.join(ROOT, "benchmarks/results/sim_fidelity_nvidia-h200_llama3-8b_run3.json")


def mean(xs) -> float:
    return round(statistics.mean(xs), 2)


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", nargs="?", default=RUN3, help="a sim_fidelity result JSON")
    ap.add_argument("--profile", default=os.path.join(ROOT, "disagg/sim/profiles/h200_llama3_8b.json"))
    args = ap.parse_args()
    d = json.load(open(args.result))
    pm = ProfileModel({**load_profile(args.profile), "gpu": "h200"})
    trace = cap_lengths(load_csv(default_trace(), start=d["start"], limit=d["requests"]), 8192)
    for p in d["points"]:
        tr = rescale(trace, p["rate"]) if p["rate"] else trace
        scfg = SimConfig(num_prefill=0, num_decode=1, max_num_seqs=d["max_num_seqs"], frontdoor_s=0.0,
                         max_num_batched_tokens=d["max_num_batched_tokens"], max_model_len=8192, block_size=16,
                         num_blocks=d["num_blocks"], coalesce=False)
        sim = Simulator(tr, scfg, pm)
        sim.step_log = []
        sim.run()
        # [decodes, KV tokens, chunks, s, execute s, longest decode context (0: not recorded)]
        eng = [x[:5] + [x[6] if len(x) > 6 else 0] for x in p["steps"]]
        e_mixed = [s for s in eng if s[2]]
        s_mixed = [s for s in sim.step_log if any(n > 1 for _, n in s[2])]
        print(f"rate {p['rate'] or 'as recorded'}: engine {len(eng)} steps ({len(e_mixed)} with prefill chunks), "
              f"simulated {sum(w.steps for w in sim.workers)} ({len(s_mixed)})")
        print(f"  prompt tokens per such step: engine {mean([sum(n for n, _ in s[2]) for s in e_mixed])}, "
              f"simulated {mean([sum(n for _, n in s[2] if n > 1) for s in s_mixed])}")
        print(f"  chunks per such step: engine {mean([len(s[2]) for s in e_mixed])}, "
              f"simulated {mean([sum(1 for _, n in s[2] if n > 1) for s in s_mixed])}")
        print(f"  decodes per step: engine {mean([s[0] for s in eng])}, "
              f"simulated {mean([sum(1 for _, n in s[2] if n == 1) for s in sim.step_log])}")
        dec = [pm.step_time(b, k, c, m) / s for b, k, c, s, _, m in eng if not c]
        mix = [pm.step_time(b, k, c, m) / s for b, k, c, s, _, m in eng if c]
        busy = sum(pm.step_time(b, k, c, m) for b, k, c, _, _, m in eng)
        print(f"  step model / measured on the engine's shapes: decode x{statistics.median(dec):.3f}, mixed "
              f"x{statistics.median(mix):.3f} (medians); busy {busy:.1f} s modelled against "
              f"{sum(s[3] for s in eng):.1f} s measured")
        rep = summarize(Simulator(tr, SimConfig(**{**scfg.__dict__, "coalesce": True}), pm).run())
        print("  re-simulated (coalesced) / recorded measurement: " + ", ".join(
            f"{k[:-2].upper()} {q.upper()} {rep[k][q] * 1e3:.1f} / {p['measured'][k][q] * 1e3:.1f} ms "
            f"({rep[k][q] / p['measured'][k][q] - 1:+.1%})" for k in ("ttft_s", "tpot_s") for q in ("p50", "p90")))


if __name__ == "__main__":
    main()
