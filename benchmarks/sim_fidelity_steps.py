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

d = json.load(open(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "benchmarks/results/sim_fidelity_nvidia-h200_llama3-8b_run3.json")))
prof = load_profile(os.path.join(ROOT, 'disagg/sim/profiles/h200_llama3_8b.json'))
pm = ProfileModel({**prof, "gpu": "h200"})
trace = cap_lengths(load_csv(default_trace(), start=d['start'], limit=d['requests']), 8192)
for p in d['points']:
    tr = rescale(trace, p['rate']) if p['rate'] else trace
    scfg = SimConfig(num_prefill=0, num_decode=1, max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=8192,
                     block_size=16, num_blocks=d["num_blocks"], coalesce=False)
    sim = Simulator(tr, scfg, pm)
    sim.step_log = []
    sim.run()
    eng = p['steps']          # [b, k, chunks, s, exec]
    e_mixed = [s for s in eng if s[2]]
    s_mixed = [s for s in sim.step_log if any(n > 1 for _, n in s[2])]
    print('rate', p['rate'], 'engine steps', len(eng), 'mixed', len(e_mixed), '| sim steps', sum(w.steps for w in sim.workers), 'mixed', len(s_mixed))
    # tokens per mixed step
    et = [sum(n for n, _ in s[2]) for s in e_mixed]; st = [sum(n for _, n in s[2] if n > 1) for s in s_mixed]
    print('  prefill tokens per mixed step: engine median', statistics.median(et), 'mean', round(statistics.mean(et)), '| sim median', statistics.median(st), 'mean', round(statistics.mean(st)))
    ec = [len(s[2]) for s in e_mixed]; sc = [sum(1 for _, n in s[2] if n > 1) for s in s_mixed]
    print('  chunks per mixed step: engine', round(statistics.mean(ec),2), 'sim', round(statistics.mean(sc),2))
    eb = [s[0] for s in eng]; sb = [sum(1 for _, n in s[2] if n == 1) for s in sim.step_log]
    print('  decodes per step: engine mean', round(statistics.mean(eb),1), 'sim mean', round(statistics.mean(sb),1))
    # measured vs model time per engine step (model applied to the engine's own step shapes)
    dec = [pm.step_time(b, k, c) / s for b, k, c, s, e in eng if not c]
    mix = [pm.step_time(b, k, c) / s for b, k, c, s, e in eng if c]
    print('  model/measured: decode', round(statistics.median(dec),3), 'mixed', round(statistics.median(mix),3), 'busy measured', round(sum(s[3] for s in eng),1), 'model on engine shapes', round(sum(pm.step_time(b,k,c) for b,k,c,s,e in eng),1))
