"""Tensor-parallel serving: 1 prefill + 1 decode worker at TP sizes (1,1), (1,2), (2,2), (2,1) (issue 6).

    python benchmarks/bench_tp_serve.py            # nvidia-h200-x4: Llama-3-8B shape, dummy bf16 weights; ~5-6 min
    python benchmarks/bench_tp_serve.py --quick    # CPU: tiny model, Ray CPU actors and gloo; ~3 min on 2 cores

Each setup is one `disagg serve --load-format dummy --prefill 1 --decode 1 --prefill-tp A --decode-tp B
--local-prefill never --kv-codec none` subprocess (every request's KV crosses the link, resharded from A
to B ranks). Per setup, after a warm-up:
  1. agreement: a few prompts, greedy (temperature 0, ignore_eos), non-streamed; their output texts are
     compared with the TP1+TP1 setup's (dummy weights are the single-device model's, sharded, so all
     setups serve one model; bf16 all-reduces sum in another order, so a few tokens may differ: reported,
     not failed);
  2. load: fixed-length token-id prompts (1,020 in / 129 out), Poisson arrivals at a few rates; TTFT, TPOT,
     ITL and E2E percentiles (`disagg bench`'s summary), and the KV transfer time per plan from the
     server's /metrics counters (decode side: plan posted -> every decode rank holds its slices).
JSON: benchmarks/results/tp_serve_<machine>.json (rewritten after every setup), and a copy in $OUT if set.
--budget-s bounds the run: a load point that would not fit is skipped (recorded).
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
from goodput_servers import ServerProc, free_port, gpus, make_checkpoint, wait_gpus_free  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
SETUPS = {"P1+D1": (1, 1), "P1+D2": (1, 2), "P2+D2": (2, 2), "P2+D1": (2, 1)}    # (prefill TP, decode TP)
PRESETS = {
    "gpu": dict(shape="llama3-8b", lens=(1020, 129), rates=(4.0, 12.0), window=4.0, max_model_len=2048,
                agree_prompts=4, agree_tokens=32, budget_s=340.0, startup_timeout=240.0, drain=20.0),
    "quick": dict(shape="tiny", lens=(48, 8), rates=(2.0,), window=3.0, max_model_len=256,
                  agree_prompts=3, agree_tokens=8, budget_s=600.0, startup_timeout=180.0, drain=30.0),
}
METRICS = ("disagg:kv_transfer_seconds_total", "disagg:kv_transfer_plans_total", "disagg:kv_transfer_failures_total")


def f(x, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def log(msg: str) -> None:
    print(f"[bench_tp_serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            for key in METRICS:
                if line.startswith(key):
                    out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def greedy_texts(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    out = []
    for p in prompts:       # one at a time: each greedy answer alone in its batch
        body = json.dumps({"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with opener.open(req, timeout=300) as r:
            out.append(json.loads(r.read())["choices"][0]["text"])
    return out


def agreement(a: list[str], b: list[str]) -> dict:
    """Identical answers, and the mean fraction of leading words two answers share."""
    prefix = []
    for x, y in zip(a, b):
        wx, wy = x.split(), y.split()
        n = next((i for i, (u, v) in enumerate(zip(wx, wy)) if u != v), min(len(wx), len(wy)))
        prefix.append(n / max(len(wx), len(wy), 1))
    return {"identical": sum(x == y for x, y in zip(a, b)), "of": len(a),
            "mean_common_prefix_frac": round(sum(prefix) / max(len(prefix), 1), 4)}


def run_setup(name: str, ckpt: str, args, out: dict, deadline: float) -> None:
    tp_p, tp_d = SETUPS[name]
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "disagg.cli", "serve", ckpt, "--load-format", "dummy", "--port", str(port),
           "--max-model-len", str(args.max_model_len), "--prefill", "1", "--decode", "1",
           "--prefill-tp", str(tp_p), "--decode-tp", str(tp_d), "--local-prefill", "never", "--kv-codec", "none",
           "--no-enable-prefix-caching", "--length-predictor", "none"]
    logf = os.path.join(args.log_dir, f"tp_serve_{name}.log")
    srv = ServerProc(name, cmd, env, logf, port)
    rec: dict = {"setup": name, "prefill_tp": tp_p, "decode_tp": tp_d, "gpus": tp_p + tp_d,
                 "cmd": " ".join(cmd[1:]), "points": [], "skipped": []}
    out["setups"].append(rec)
    log(f"[{name}] $ {' '.join(cmd[1:])}  (log: {logf})")
    t0 = time.perf_counter()
    srv.start()
    try:
        srv.wait_healthy(args.startup_timeout)
        rec["startup_s"] = round(time.perf_counter() - t0, 1)
        model = asyncio.run(loadgen.fetch_model(srv.url))
        p, _ = args.lens
        warm = workload.fixed_workload(4, math.inf, p, 4, vocab_size=args.vocab, seed=99)
        w = asyncio.run(loadgen.run(warm, loadgen.Target(srv.url, model, "completions"), deadline_s=120.0))
        if not all(r.ok for r in w.results):
            raise RuntimeError(f"warm-up failed: {[r.error for r in w.results if not r.ok][:1]}")
        prompts = [q.prompt for q in workload.fixed_workload(args.agree_prompts, math.inf, p, 1,
                                                              vocab_size=args.vocab, seed=7)]
        rec["greedy"] = greedy_texts(srv.url, model, prompts, args.agree_tokens)
        log(f"[{name}] up in {rec['startup_s']}s; greedy answers taken")
        for rate in args.rates:
            n = max(4, round(rate * args.window))
            reqs = workload.fixed_workload(n, rate, p, args.lens[1], vocab_size=args.vocab,
                                           seed=1000 + round(rate * 10))
            if time.perf_counter() + reqs[-1].arrival_s + 10.0 > deadline:
                rec["skipped"].append({"rate": rate, "why": "time budget"})
                continue
            time.sleep(0.6)                  # the router's counters refresh every 0.25 s
            m0 = counters(srv.url)
            res = asyncio.run(loadgen.run(reqs, loadgen.Target(srv.url, model, "completions", ignore_eos=True),
                                          deadline_s=reqs[-1].arrival_s + args.drain))
            time.sleep(0.6)
            m1 = counters(srv.url)
            d = {k.split(":")[1].removesuffix("_total"): m1.get(k, 0.0) - m0.get(k, 0.0) for k in METRICS}
            s = summary.summarize(res.results, res.duration_s, per_request=False)
            plans = d["kv_transfer_plans"]
            pt = {"rate": rate, "num_requests": n, "summary": s, "kv_transfer_plans": plans,
                  "kv_transfer_failures": d["kv_transfer_failures"],
                  "kv_transfer_ms_per_plan": round(1e3 * d["kv_transfer_seconds"] / plans, 3) if plans else None,
                  "requests_per_plan": round(s["completed"] / plans, 3) if plans else None}
            rec["points"].append(pt)
            log(f"[{name}] @{rate:g}/s: {s['completed']}/{n} ok, TTFT p50/p99 {f(s['median_ttft_ms'])}/"
                f"{f(s['p99_ttft_ms'])} ms, TPOT p50/p99 {f(s['median_tpot_ms'], 2)}/{f(s['p99_tpot_ms'], 2)} ms, "
                f"ITL p99 {f(s['p99_itl_ms'], 2)} ms, KV transfer {f(pt['kv_transfer_ms_per_plan'], 2)} ms/plan")
    except Exception as e:  # noqa: BLE001 - one setup failing must not lose the others
        rec["error"] = f"{type(e).__name__}: {e}"[:3000]
        log(f"[{name}] FAILED: {rec['error']}\n{srv.tail(1500)}")
    finally:
        srv.stop()
        if not args.quick:
            wait_gpus_free()


def save(out: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    if os.environ.get("OUT"):
        shutil.copy(path, os.path.join(os.environ["OUT"], os.path.basename(path)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU run with a tiny model (proves the code paths)")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated among " + ", ".join(SETUPS))
    ap.add_argument("--rates", default=None, help="request rates, comma-separated (default per preset)")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/tp_serve_<machine>.json)")
    args = ap.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "gpu"]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if isinstance(args.rates, str):
        args.rates = tuple(float(x) for x in args.rates.split(","))
    names = [s for s in args.setups.split(",") if s]
    if "P1+D1" in names:          # the reference runs first
        names = ["P1+D1"] + [s for s in names if s != "P1+D1"]
    machine = gpus()
    tag = "cpu" if args.quick or not machine else f"{machine[0].split()[-1].lower()}x{len(machine)}"
    path = args.out or os.path.join(RESULTS, f"tp_serve_{tag}.json")
    work = tempfile.mkdtemp(prefix="bench_tp_serve_")
    args.log_dir = os.environ.get("OUT") or work
    ckpt = os.path.join(work, "ckpt")
    os.makedirs(ckpt)
    make_checkpoint(ckpt, args.shape)
    with open(os.path.join(ckpt, "config.json")) as fh:
        args.vocab = json.load(fh)["vocab_size"]
    out = {"machine": machine or ["cpu"], "shape": args.shape, "input_len": args.lens[0], "output_len": args.lens[1],
           "rates": list(args.rates),
           "command": "python benchmarks/bench_tp_serve.py" + (" --quick" if args.quick else ""),
           "setups": []}
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    for name in names:
        if time.perf_counter() > deadline - 30:
            out["setups"].append({"setup": name, "skipped": "time budget"})
            continue
        run_setup(name, ckpt, args, out, deadline)
        save(out, path)
    ref = next((s.get("greedy") for s in out["setups"] if s["setup"] == "P1+D1"), None)
    for s in out["setups"]:
        if ref and s.get("greedy"):
            s["agreement_with_P1+D1"] = agreement(ref, s["greedy"])
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    save(out, path)
    log(f"wrote {path} in {out['wall_s']}s")
    print(f"{'setup':8} {'GPUs':>4} {'rate':>5} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>7} {'ITL p99':>8} "
          f"{'KV ms/plan':>10}  greedy agreement")
    for s in out["setups"]:
        agree = s.get("agreement_with_P1+D1", {})
        a = f"{agree['identical']}/{agree['of']} identical" if agree else s.get("error", s.get("skipped", ""))[:60]
        for pt in s.get("points") or [{}]:
            sm = pt.get("summary")
            if not sm:
                print(f"{s['setup']:8} {s.get('gpus', ''):>4}   -   {a}")
                continue
            print(f"{s['setup']:8} {s['gpus']:>4} {pt['rate']:>5g} {f(sm['median_ttft_ms']):>9} "
                  f"{f(sm['p99_ttft_ms']):>8} {f(sm['median_tpot_ms'], 2):>9} {f(sm['p99_tpot_ms'], 2):>7} "
                  f"{f(sm['p99_itl_ms'], 2):>8} {f(pt['kv_transfer_ms_per_plan'], 2):>10}  {a}")
    failed = [s["setup"] for s in out["setups"] if s.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
