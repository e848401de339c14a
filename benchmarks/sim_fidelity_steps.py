"""Where does the simulator's fidelity error come from? The schedules, or the step times?

    python benchmarks/sim_fidelity_steps.py [results/sim_fidelity_<gpu>_<model>_run3.json]   # CPU, ~1 min

Re-runs the simulator (uncoalesced, the shipped H200 profile) on the trace slices of a
sim_fidelity result and compares with the engine's recorded steps: steps, steps with prefill
chunks, tokens and chunks per such step, decodes per step; then applies the step-time model to
the engine's own step shapes: model / measured per step (median) and in total (busy seconds).
"""
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from disagg.sim.perf_model import ProfileModel, load_profile  # noqa: E402
from disagg.sim.simulator import SimConfig, Simulator  # noqa: E402
from disagg.traces import cap_lengths, load_csv, rescale  # noqa: E402
from sim_fidelity import default_trace  # noqa: E402

RUN3 = os.path.join(ROOT, "benchmarks/results/sim_fidelity_nvidia-h200_llama3-8b_run3.json")


def mean(xs) -> float:
    return round(statistics.mean(xs), 2)


def main() -> None:
    d = json.load(open(sys.argv[1] if len(sys.argv) > 1 else RUN3))
    pm = ProfileModel({**load_profile(os.path.join(ROOT, "disagg/sim/profiles/h200_llama3_8b.json")), "gpu": "h200"})
    trace = cap_lengths(load_csv(default_trace(), start=d["start"], limit=d["requests"]), 8192)
    for p in d["points"]:
        tr = rescale(trace, p["rate"]) if p["rate"] else trace
        scfg = SimConfig(num_prefill=0, num_decode=1, max_num_seqs=d["max_num_seqs"],
                         max_num_batched_tokens=d["max_num_batched_tokens"], max_model_len=8192, block_size=16,
                         num_blocks=d["num_blocks"], coalesce=False)
        sim = Simulator(tr, scfg, pm)
        sim.step_log = []
        sim.run()
        eng = p["steps"]                                        # [decodes, KV tokens, chunks, s, execute s]
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
        dec = [pm.step_time(b, k, c) / s for b, k, c, s, _ in eng if not c]
        mix = [pm.step_time(b, k, c) / s for b, k, c, s, _ in eng if c]
        busy = sum(pm.step_time(b, k, c) for b, k, c, _, _ in eng)
        print(f"  step model / measured on the engine's shapes: decode x{statistics.median(dec):.3f}, mixed "
              f"x{statistics.median(mix):.3f} (medians); busy {busy:.1f} s modelled against "
              f"{sum(s[3] for s in eng):.1f} s measured")


if __name__ == "__main__":
    main()
