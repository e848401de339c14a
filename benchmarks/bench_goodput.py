"""Goodput of disaggregated against colocated serving on two GPUs, on real traces (issue 8).

    python benchmarks/bench_goodput.py                    # nvidia-h200-x2: JSON (and server logs) only
    python benchmarks/bench_goodput.py --shape tiny       # CPU dry run of every code path (Ray CPU actors)
    python benchmarks/bench_goodput.py --report [JSON]    # tables and checks from a saved run
    python benchmarks/bench_goodput.py --plot [JSON]      # PNGs (needs matplotlib: run it off the GPU box)

Setups, each started once as a server subprocess and swept over request rates:
    hf           HF transformers generate(), one request at a time (benchmarks/hf_server.py), 1 GPU
    colocated    disagg serve --prefill 0 --decode 2: two colocated replicas behind one router
    disagg       disagg serve --prefill 1 --decode 1 --local-prefill never: pure disaggregation
    disagg-auto  the same with --local-prefill auto (the router's conditional disaggregation)
Scenarios (a Llama-3-8B-shaped checkpoint with random weights; token-id prompts, ignore_eos, so the
lengths are exact): `fixed` 1,020 prompt / 129 output tokens with Poisson arrivals (AIConfigurator's
case), `conv` and `code` replay the Azure 2023 traces' lengths and arrival pattern, rescaled to each
rate. Each point sends rate x --window requests; a request with no first token after --ttft-timeout
is abandoned (it has failed both SLOs by then; the server drops it, so the backlog clears), and
whatever is unfinished --drain after the last arrival counts as failed. A point that misses the loose
SLO for half its requests ends that scenario's sweep for that setup. Both SLO pairs are evaluated
on every point (see goodput_report.py for the definitions).

The JSON is rewritten after every point, and a rerun resumes: points already there are skipped,
so a run cut short by a time limit keeps its data and the next run fills in the rest.
--budget-s bounds the whole run: each setup gets a share, and points that would not fit are skipped.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from disagg.bench import loadgen, summary, workload  # noqa: E402
from disagg.traces import load_csv  # noqa: E402
from goodput_servers import ServerProc, free_port, get_json, gpus, make_checkpoint, wait_gpus_free  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
AIC_JSON = os.path.join(RESULTS, "aiconfigurator_llama3.1-8b_h200x2.json")
SLOS = {"tight": {"ttft": 250.0, "tpot": 25.0}, "loose": {"ttft": 1000.0, "tpot": 100.0}}
CLUSTER_ARGS = {"colocated": ["--prefill", "0", "--decode", "2"],
                "disagg": ["--prefill", "1", "--decode", "1", "--local-prefill", "never"],
                "disagg-auto": ["--prefill", "1", "--decode", "1", "--local-prefill", "auto"]}
TRACE_FILES = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
# Window starts: conv from its first row; code from row 200, past a 144 s idle gap at row 62 that
# would turn any rescaled window into one burst and a long silence (rows 200-500: CV^2 of the gaps 19).
TRACE_START = {"conv": 0, "code": 200}
SHAPES = {
    "llama3-8b": dict(max_model_len=8192, fixed="1020,129", length_scale=1.0, window=8.0, drain=20.0,
                      ttft_timeout=5.0, rates_fixed="16,32,48,64", rates_conv="10,20,30", rates_code="5,10,20",
                      hf_rates="0.3", hf_requests=6, budget=470.0),
    "tiny": dict(max_model_len=256, fixed="48,8", length_scale=0.125, window=4.0, drain=15.0, ttft_timeout=10.0,
                 rates_fixed="2,4", rates_conv="2", rates_code="2", hf_rates="1", hf_requests=3, budget=900.0),
}


def server_cmd(mode: str, ckpt: str, port: int, args) -> list[str]:
    if mode == "hf":
        return [sys.executable, os.path.join(ROOT, "benchmarks", "hf_server.py"), ckpt, "--load-format", "dummy",
                "--port", str(port)]
    return ([sys.executable, "-m", "disagg.cli", "serve", ckpt, "--load-format", "dummy", "--port", str(port),
             "--max-model-len", str(args.max_model_len)] + scaled(CLUSTER_ARGS[mode], args.scale)
            + shlex.split(args.server_args))


def scaled(cluster_args: list[str], k: int) -> list[str]:
    """--scale K: K times the workers of each setup (4 GPUs: --scale 2 = 2P+2D against 4 replicas)."""
    out = list(cluster_args)
    for flag in ("--prefill", "--decode"):
        i = out.index(flag)
        out[i + 1] = str(int(out[i + 1]) * k)
    return out


# ---------------------------------------------------------------------- workloads and points
def scenario_meta(args) -> dict:
    p, o = args.fixed_lens
    return {"fixed": {"description": f"{p} prompt / {o} output tokens, Poisson arrivals (AIConfigurator's case)"},
            "conv": {"description": f"Azure 2023 conversation trace from row {TRACE_START['conv']}, rescaled"},
            "code": {"description": f"Azure 2023 code trace from row {TRACE_START['code']}, rescaled"}}


def point_seed(scenario: str, rate: float, base: int) -> int:
    """A seed per (scenario, rate): no prompt repeats between the points one server sees (a prefix
    cache must not flatter later points); the same prompts for every setup at a given point."""
    return base * 1_000_003 + ("fixed", "conv", "code").index(scenario) * 100_003 + round(rate * 1000)


def build_requests(scenario: str, rate: float, n: int, args) -> list[loadgen.BenchRequest]:
    seed = point_seed(scenario, rate, args.seed)
    if scenario == "fixed":
        p, o = args.fixed_lens
        return workload.fixed_workload(n, rate, p, o, vocab_size=args.vocab, seed=seed)
    rows = load_csv(os.path.join(args.traces_dir, TRACE_FILES[scenario]), start=TRACE_START[scenario], limit=n)
    if args.length_scale != 1.0:       # tiny CPU runs: shorter prompts (outputs are capped by the context)
        rows = [replace(q, prompt_tokens=max(1, round(q.prompt_tokens * args.length_scale))) for q in rows]
    return workload.trace_workload(rows, rate=rate, vocab_size=args.vocab, max_model_len=args.max_model_len,
                                   seed=seed)


def _ms(x):
    return None if x is None or math.isinf(x) else round(1e3 * x, 3)


def point_record(mode, scenario, rate, reqs, out: loadgen.RunOutcome, wall_s: float) -> dict:
    res = out.results
    s = summary.summarize(res, out.duration_s, per_request=False)
    ttft_all = [r.ttft if r.ok else math.inf for r in res]
    tpot_all = [summary.tpot_s(r) if r.ok else math.inf for r in res]
    p90_ttft, p90_tpot = summary.percentile(ttft_all, 90), summary.percentile(tpot_all, 90)
    slo = {}
    for name, bounds in SLOS.items():
        st = summary.slo_stats(res, bounds, out.duration_s)
        met = p90_ttft is not None and p90_ttft * 1e3 <= bounds["ttft"] and p90_tpot * 1e3 <= bounds["tpot"]
        slo[name] = {**st, "goodput": st["slo_attainment"] * rate, "p90_ttft_ms": _ms(p90_ttft),
                     "p90_tpot_ms": _ms(p90_tpot), "p90_met": bool(met)}
    return {"mode": mode, "scenario": scenario, "rate": rate, "num_requests": len(reqs), "not_sent": out.not_sent,
            "window_s": len(reqs) / rate, "duration_s": out.duration_s, "wall_s": wall_s, "summary": s, "slo": slo,
            "input_lens": [r.prompt_len for r in res], "output_lens": [r.output_len for r in res],
            "ttft_ms": [_ms(r.ttft) if r.ok else None for r in res],
            "tpot_ms": [_ms(summary.tpot_s(r)) if r.ok else None for r in res]}


async def drive(url: str, model: str, reqs, label: str, args, quiet: bool = False) -> loadgen.RunOutcome:
    target = loadgen.Target(url, model, "completions", ignore_eos=True)
    prog = None if quiet or not sys.stderr.isatty() else loadgen.Progress(len(reqs), label=label)
    return await loadgen.run(reqs, target, progress=prog, deadline_s=reqs[-1].arrival_s + args.drain,
                             ttft_timeout_s=args.ttft_timeout, request_timeout_s=args.drain + 600)


def warm_up(url: str, model: str, mode: str, args) -> None:
    """A few unrecorded requests (kernel compilation, first-use allocations) of both short and long prompts."""
    p, _ = args.fixed_lens
    reqs = workload.fixed_workload(1 if mode == "hf" else 4, math.inf, p, 4, vocab_size=args.vocab, seed=99)
    if mode != "hf":
        reqs += workload.fixed_workload(1, math.inf, args.max_model_len // 2, 4, vocab_size=args.vocab, seed=98)
    out = asyncio.run(drive(url, model, reqs, f"{mode} warm-up", args, quiet=True))
    bad = [r.error for r in out.results if not r.ok]
    if bad:
        raise RuntimeError(f"{mode} warm-up failed: {bad[0]}")


# ---------------------------------------------------------------------- the JSON (rewritten after every point)
class Store:
    def __init__(self, path: str, fresh: bool, header: dict):
        self.path = path
        self.data = {"points": [], "skipped": [], "errors": [], "servers": {}}
        if not fresh and os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)
            self.data["skipped"], self.data["errors"] = [], []     # re-decided by this run
            print(f"resuming {path}: {len(self.data['points'])} points already there", file=sys.stderr)
        self.data.update(header)

    def has(self, mode, scenario, rate) -> bool:
        return any(p["mode"] == mode and p["scenario"] == scenario and p["rate"] == rate for p in self.data["points"])

    def get(self, mode, scenario, rate):
        return next((p for p in self.data["points"] if (p["mode"], p["scenario"], p["rate"]) == (mode, scenario, rate)),
                    None)

    def add(self, key: str, item) -> None:
        self.data[key].append(item)
        self.save()

    def save(self) -> None:
        for d in {os.path.dirname(self.path), os.environ.get("OUT")}:
            if not d:
                continue
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, os.path.basename(self.path))
            with open(path + ".tmp", "w") as f:
                json.dump(self.data, f, indent=None, separators=(",", ":"))
            os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------- the sweep
def plan(mode: str, args) -> list[tuple[str, float, int]]:
    """(scenario, rate, requests) in the order they run: scenarios in turn, rates rising."""
    if mode == "hf":
        return [("fixed", r, args.hf_requests) for r in args.hf_rates]
    return [(sc, r, max(2, round(r * args.window))) for sc in args.scenarios for r in args.rates[sc]]


def saturated(store: Store, mode: str, scenario: str, rate: float) -> bool:
    """A lower rate of this scenario already lost half its requests at the loose SLO."""
    return any(p["mode"] == mode and p["scenario"] == scenario and p["rate"] < rate
               and p["slo"]["loose"]["slo_attainment"] < 0.5 for p in store.data["points"])


def run_mode(mode: str, ckpt: str, args, store: Store, deadline: float) -> None:
    todo = [x for x in plan(mode, args) if not store.has(mode, x[0], x[1])]
    if not todo:
        return
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if mode == "hf" and gpus():
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    log = os.path.join(args.log_dir, f"goodput_server_{mode}.log")
    srv = ServerProc(mode, server_cmd(mode, ckpt, port, args), env, log, port)
    print(f"\n[{mode}] $ {' '.join(srv.cmd[1:])}  (log: {log})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    srv.start()
    try:
        srv.wait_healthy(args.startup_timeout)
        startup = time.perf_counter() - t0
        model = asyncio.run(loadgen.fetch_model(srv.url))
        warm_up(srv.url, model, mode, args)
        store.data["servers"][mode] = {"cmd": " ".join(srv.cmd[1:]), "startup_s": startup,
                                       "ready_s": time.perf_counter() - t0}
        store.save()
        print(f"[{mode}] up in {startup:.1f}s, warmed up at {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        time.sleep(args.settle)               # the router's counters refresh every 0.25 s
        m0 = srv.metrics()
        for sc, rate, n in todo:
            skip = {"mode": mode, "scenario": sc, "rate": rate}
            if saturated(store, mode, sc, rate):
                store.add("skipped", {**skip, "why": "saturated at a lower rate"})
                continue
            reqs = build_requests(sc, rate, n, args)
            if time.perf_counter() + reqs[-1].arrival_s + min(args.drain, 6.0) + args.stop_reserve > deadline:
                store.add("skipped", {**skip, "why": "time budget"})
                continue
            hf0 = get_json(srv.url + "/stats") if mode == "hf" else None
            t1 = time.perf_counter()
            out = asyncio.run(drive(srv.url, model, reqs, f"{mode} {sc} @{rate:g}/s", args))
            rec = point_record(mode, sc, rate, reqs, out, time.perf_counter() - t1)
            time.sleep(args.settle)           # aborted requests leave the server; counters refresh
            m1 = srv.metrics()
            for key, name in (("disagg:local_prefills_total", "local_prefills"),
                              ("disagg:kv_transfer_plans_total", "kv_transfer_plans")):
                if key in m1:
                    rec[name] = m1[key] - m0.get(key, 0.0)
            m0 = m1
            if hf0 is not None:
                hf1 = get_json(srv.url + "/stats")
                busy = hf1["busy_s"] - hf0["busy_s"]
                rec["hf_service_bound"] = (hf1["requests"] - hf0["requests"]) / busy if busy > 0 else None
            store.add("points", rec)
            t, f = rec["slo"]["tight"], (lambda x: "-" if x is None else f"{x:.1f}")
            print(f"[{mode}] {sc} @{rate:g}/s: {rec['summary']['completed']}/{n} ok, TTFT p90 {f(t['p90_ttft_ms'])} "
                  f"ms, TPOT p90 {f(t['p90_tpot_ms'])} ms, ITL p99 {f(rec['summary']['p99_itl_ms'])} ms, goodput "
                  f"tight {t['goodput']:.2f} / loose {rec['slo']['loose']['goodput']:.2f} req/s", file=sys.stderr,
                  flush=True)
    except Exception as e:  # noqa: BLE001 - one setup failing must not lose the others
        msg = f"{mode}: {type(e).__name__}: {e}"
        print(f"[{mode}] FAILED: {msg}", file=sys.stderr, flush=True)
        store.add("errors", msg[:3000])
    finally:
        _TERM["shielded"] = True                   # a SIGTERM now must not cut the shutdown short
        try:
            srv.stop()
            if mode != "hf":
                wait_gpus_free()
        finally:
            _TERM["shielded"] = False
        if _TERM["requested"]:
            raise KeyboardInterrupt("SIGTERM")


_TERM = {"requested": False, "shielded": False}


def _on_term(signum, frame):
    """A time limit (SIGTERM): stop the server, keep the JSON; while a server is stopping, finish that first."""
    _TERM["requested"] = True
    if not _TERM["shielded"]:
        raise KeyboardInterrupt("SIGTERM")


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--modes", default="hf,colocated,disagg,disagg-auto", help="run in this order")
    ap.add_argument("--scenarios", default="fixed,conv,code")
    for k in ("fixed", "conv", "code"):
        ap.add_argument(f"--rates-{k}", default=None, help=f"comma-separated req/s for {k}")
    ap.add_argument("--hf-rates", default=None)
    ap.add_argument("--hf-requests", type=int, default=None, help="requests per HF rate")
    ap.add_argument("--window", type=float, default=None, help="seconds of arrivals per point (rate x window requests)")
    ap.add_argument("--drain", type=float, default=None, help="seconds after the last arrival before the rest fail")
    ap.add_argument("--ttft-timeout", type=float, default=None, help="abandon a request with no first token by then")
    ap.add_argument("--fixed-len", default=None, help="prompt,output tokens of the fixed scenario")
    ap.add_argument("--budget-s", type=float, default=None, help="whole-run time bound (seconds)")
    ap.add_argument("--stop-reserve", type=float, default=15.0, help="seconds kept per setup for shutting down")
    ap.add_argument("--settle", type=float, default=1.0, help="pause between points")
    ap.add_argument("--startup-timeout", type=float, default=400.0)
    ap.add_argument("--server-args", default=None, help="extra `disagg serve` flags for the cluster setups")
    ap.add_argument("--traces-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=1, help="K times the workers of each cluster setup (K x 2 GPUs)")
    ap.add_argument("--out", default=None, help="JSON path (default results/goodput_<shape>_<device>.json)")
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming --out")
    ap.add_argument("--report", nargs="?", const="", default=None, metavar="JSON", help="print the report and exit")
    ap.add_argument("--plot", nargs="?", const="", default=None, metavar="JSON", help="write PNGs and exit")
    args = ap.parse_args(argv)
    d = SHAPES[args.shape]
    for k in ("window", "drain", "ttft_timeout", "hf_requests"):
        if getattr(args, k) is None:
            setattr(args, k, d[k])
    args.budget_s = args.budget_s or d["budget"]
    args.max_model_len, args.length_scale = d["max_model_len"], d["length_scale"]
    args.vocab = 384 if args.shape == "tiny" else 128256
    args.fixed_lens = tuple(int(x) for x in (args.fixed_len or d["fixed"]).split(","))
    args.rates = {k: _floats(getattr(args, f"rates_{k}") or d[f"rates_{k}"]) for k in ("fixed", "conv", "code")}
    args.hf_rates = _floats(args.hf_rates or d["hf_rates"])
    args.modes = [m for m in args.modes.split(",") if m]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    bad = [m for m in args.modes if m not in CLUSTER_ARGS and m != "hf"] + \
          [s for s in args.scenarios if s not in ("fixed", "conv", "code")]
    if bad:
        ap.error(f"unknown mode or scenario: {bad}")
    if args.server_args is None:
        args.server_args = "--cpu-kv-gib 0.1" if args.shape == "tiny" else ""
    if args.traces_dir is None:
        local = os.path.join(ROOT, ".devdata", "traces", "azure2023")
        args.traces_dir = local if os.path.isdir(local) else os.path.join(ROOT, "..", "shared", "data", "traces",
                                                                          "azure2023")
    names = gpus()
    slug = "-".join(names[0].lower().split()) if names else "cpu"
    args.device_slug, args.gpus = slug, names
    args.out = args.out or os.path.join(RESULTS, f"goodput_{args.shape}_{slug}.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import goodput_report
    if args.report is not None or args.plot is not None:
        path = (args.report or args.plot) or args.out
        with open(path) as f:
            data = json.load(f)
        if args.plot is not None:
            import plot_goodput
            stem = os.path.splitext(os.path.basename(path))[0]
            for p in plot_goodput.plot_all(data, os.path.dirname(os.path.abspath(path)), stem):
                print(p)
            return 0
        print(goodput_report.report(data))
        return 0
    aic = None
    if os.path.exists(AIC_JSON):
        with open(AIC_JSON) as f:
            aic = json.load(f)
    header = {"benchmark": "bench_goodput", "shape": args.shape, "gpus": args.gpus, "python": sys.version.split()[0],
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "slos_ms": SLOS, "scenarios": scenario_meta(args),
              "config": {k: v for k, v in vars(args).items() if k not in ("report", "plot")},
              "aiconfigurator": aic}
    signal.signal(signal.SIGTERM, _on_term)
    store = Store(args.out, args.fresh, header)
    store.save()
    args.log_dir = os.environ.get("OUT") or tempfile.mkdtemp(prefix="goodput-logs-")
    ckpt = tempfile.mkdtemp(prefix="goodput-ckpt-")
    make_checkpoint(ckpt, args.shape)
    t_start = time.perf_counter()
    hf_allow = 30.0 + 5.0 * args.hf_requests * len(args.hf_rates) if args.shape != "tiny" else 120.0
    try:
        for i, mode in enumerate(args.modes):
            left = args.budget_s - (time.perf_counter() - t_start)
            rest = args.modes[i:]
            n_cluster = sum(m != "hf" for m in rest)
            if mode == "hf":
                share = min(hf_allow, left)
            else:
                share = (left - (hf_allow if "hf" in rest[1:] else 0.0)) / max(n_cluster, 1)
            if share < args.stop_reserve + 10:
                store.add("skipped", {"mode": mode, "scenario": "*", "rate": 0.0, "why": "time budget"})
                continue
            run_mode(mode, ckpt, args, store, time.perf_counter() + share)
    except KeyboardInterrupt:
        store.data["errors"].append("interrupted (Ctrl-C or SIGTERM): the points above are complete")
        print("\ninterrupted: servers stopped; every finished point is in the JSON", file=sys.stderr)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    store.data["wall_s"] = time.perf_counter() - t_start
    store.save()
    print(goodput_report.report(store.data))
    print(f"\nwrote {args.out} ({len(store.data['points'])} points, {store.data['wall_s']:.0f}s)", file=sys.stderr)
    return 1 if store.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
