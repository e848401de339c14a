"""Where a disaggregated request's time to first token goes, against the simulator.

    python benchmarks/bench_handoff.py           # nvidia-h200-x2: Llama-3-8B shape, dummy bf16 weights; ~3 min
    python benchmarks/bench_handoff.py --quick   # CPU: tiny model, Ray CPU actors, gloo; ~2 min on 2 cores

One `disagg serve --load-format dummy --prefill 1 --decode 1 --local-prefill never --kv-codec none`
subprocess (every prompt's KV crosses the link). After a warm-up, fixed-length prompts (1,020 in / 129
out) at a few Poisson rates; for each, TTFT and TPOT (`disagg bench`'s summary) and the router's
`disagg:request_phase_seconds` histogram (disagg/deploy/hops.py) as mean seconds per phase:
queue_reserve (router queue + Reserve RPC, which waits for the decode worker's step in progress),
submit (the prompt to the prefill worker), prefill_first_token (its queue and step, the first token
back to the router), first_to_second_token (KV landed and admitted, a decode step, the token back).
Then `disagg simulate` of the same requests on the same layout (the shipped profile of the GPU),
whose TTFT is what its handoff model predicts. JSON: benchmarks/results/handoff_<machine>.json ($OUT).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from disagg.bench import loadgen, summary, workload  # noqa: E402
from goodput_servers import ServerProc, free_port, make_checkpoint  # noqa: E402

PRESETS = {
    "gpu": dict(shape="llama3-8b", lens=(1020, 129), rates=(1.0, 4.0, 12.0), window=8.0, max_model_len=2048,
                startup_timeout=240.0, drain=20.0, gpu="h200"),
    "quick": dict(shape="tiny", lens=(48, 8), rates=(1.0, 4.0), window=4.0, max_model_len=256,
                  startup_timeout=180.0, drain=30.0, gpu="h200"),
}
PHASES = ("queue_reserve", "submit", "prefill_first_token", "first_to_second_token")


def log(msg: str) -> None:
    print(f"[bench_handoff {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def phase_sums(url: str) -> dict[str, tuple[float, float]]:
    """phase -> (sum seconds, count) of disagg:request_phase_seconds."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[float]] = {p: [0.0, 0.0] for p in PHASES}
    for line in text.splitlines():
        if not line.startswith("disagg:request_phase_seconds_"):
            continue
        for p in PHASES:
            if f'phase="{p}"' in line:
                v = float(line.rsplit(" ", 1)[1])
                if line.startswith("disagg:request_phase_seconds_sum"):
                    out[p][0] += v
                elif line.startswith("disagg:request_phase_seconds_count"):
                    out[p][1] += v
    return {p: (s, c) for p, (s, c) in out.items()}


def simulated(p: dict, reqs, prompt_len: int, output_len: int, max_model_len: int) -> dict:
    """The simulator on the same arrivals and lengths, 1 prefill + 1 decode GPU, the shipped profile."""
    from disagg.sim.cli import model_config
    from disagg.sim.perf_model import make_model
    from disagg.sim.profile_model import load_profile
    from disagg.sim.report import summarize
    from disagg.sim.simulator import SimConfig, Simulator
    from disagg.traces import TraceRequest
    prof_path = os.path.join(ROOT, "disagg/sim/profiles", f"{p['gpu']}_llama3_8b.json")
    pm = make_model(model_config("llama3-8b"), p["gpu"], profile=load_profile(prof_path))
    trace = [TraceRequest(r.arrival_s, prompt_len, output_len) for r in reqs]
    cfg = SimConfig(num_prefill=1, num_decode=1, local_prefill="never", max_model_len=max_model_len)
    s = summarize(Simulator(trace, cfg, pm).run())
    return {k: {q: s[k][q] for q in ("mean", "p50", "p90")} for k in ("ttft_s", "tpot_s")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--log-dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    p = PRESETS["quick" if args.quick else "gpu"]
    ckpt = tempfile.mkdtemp(prefix="handoff_ckpt_")
    make_checkpoint(ckpt, p["shape"])
    vocab = json.load(open(os.path.join(ckpt, "config.json")))["vocab_size"]
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "disagg.cli", "serve", ckpt, "--load-format", "dummy", "--port", str(port),
           "--max-model-len", str(p["max_model_len"]), "--prefill", "1", "--decode", "1", "--local-prefill", "never",
           "--kv-codec", "none", "--no-enable-prefix-caching", "--length-predictor", "none"]
    srv = ServerProc("P1+D1", cmd, env, os.path.join(args.log_dir, "handoff_serve.log"), port)
    out = {"benchmark": "handoff", "cmd": " ".join(cmd[1:]), "lens": p["lens"], "points": []}
    t0 = time.perf_counter()
    srv.start()
    try:
        srv.wait_healthy(p["startup_timeout"])
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        model = asyncio.run(loadgen.fetch_model(srv.url))
        pl, ol = p["lens"]
        warm = workload.fixed_workload(4, math.inf, pl, 4, vocab_size=vocab, seed=99)
        w = asyncio.run(loadgen.run(warm, loadgen.Target(srv.url, model, "completions"), deadline_s=120.0))
        if not all(r.ok for r in w.results):
            raise RuntimeError(f"warm-up failed: {[r.error for r in w.results if not r.ok][:1]}")
        log(f"up in {out['startup_s']}s, warmed up")
        for rate in p["rates"]:
            n = max(4, round(rate * p["window"]))
            reqs = workload.fixed_workload(n, rate, pl, ol, vocab_size=vocab, seed=2000 + round(rate * 10))
            m0 = phase_sums(srv.url)
            res = asyncio.run(loadgen.run(reqs, loadgen.Target(srv.url, model, "completions", ignore_eos=True),
                                          deadline_s=reqs[-1].arrival_s + p["drain"]))
            m1 = phase_sums(srv.url)
            s = summary.summarize(res.results, res.duration_s, per_request=False)
            phases = {ph: round(1e3 * (m1[ph][0] - m0[ph][0]) / max(m1[ph][1] - m0[ph][1], 1), 3) for ph in PHASES}
            sim = simulated(p, reqs, pl, ol, p["max_model_len"])
            pt = {"rate": rate, "num_requests": n, "completed": s["completed"],
                  "ttft_ms": {q: s[f"{q}_ttft_ms"] for q in ("mean", "median", "p90")},
                  "tpot_ms": {q: s[f"{q}_tpot_ms"] for q in ("mean", "median", "p90")},
                  "phase_mean_ms": phases, "simulated_ms": {k: {q: round(v * 1e3, 3) for q, v in d.items()}
                                                            for k, d in sim.items()}}
            out["points"].append(pt)
            log(f"rate {rate}: {s['completed']}/{n} done; TTFT mean {s['mean_ttft_ms']:.1f} ms (simulated "
                f"{sim['ttft_s']['mean'] * 1e3:.1f}), TPOT mean {s['mean_tpot_ms']:.1f} ms (simulated "
                f"{sim['tpot_s']['mean'] * 1e3:.1f}); phases (mean ms): "
                + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    finally:
        srv.stop()
    try:
        import torch
        machine = torch.cuda.get_device_name(0).lower().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    except ImportError:
        machine = "cpu"
    path = os.path.join(ROOT, "benchmarks/results", f"handoff_{machine}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    if os.environ.get("OUT"):
        shutil.copy(path, os.environ["OUT"])
    print(json.dumps(out["points"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
