"""`disagg profile | simulate | plan`: register(subparsers) adds them to the disagg CLI.

Imports stay inside the commands so `disagg --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODELS = {"llama3-8b": "llama3_8b.json", "smollm2": "smollm2_135m.json", "smollm2-135m": "smollm2_135m.json"}
TRACES = {"azure-conv": "AzureLLMInferenceTrace_conv.csv", "azure-code": "AzureLLMInferenceTrace_code.csv"}
TRACE_DIRS = (os.path.join(REPO, ".devdata", "traces", "azure2023"),
              os.path.join(os.path.dirname(REPO), "shared", "data", "traces", "azure2023"))


# ---------------------------------------------------------------------- resolving names
def model_config(spec: str):
    """A shipped shape name (llama3-8b, smollm2), a config.json, or a checkpoint directory."""
    from disagg.config import ModelConfig
    if spec in MODELS:
        path, name = os.path.join(HERE, "configs", MODELS[spec]), spec
    elif os.path.isdir(spec):
        path, name = os.path.join(spec, "config.json"), os.path.basename(os.path.normpath(spec))
    else:
        path, name = spec, os.path.splitext(os.path.basename(spec))[0]
    if not os.path.exists(path):
        raise SystemExit(f"error: no model config {spec!r} (a name: {', '.join(MODELS)}; a config.json; "
                         "or a checkpoint directory)")
    with open(path) as f:
        return ModelConfig.from_hf_dict(json.load(f), name=name)


def model_key(spec: str) -> str:
    name = MODELS.get(spec, os.path.basename(os.path.normpath(spec)))
    return os.path.splitext(name)[0].replace("-", "_")


def find_profile(gpu_name: str, spec: str) -> str | None:
    """The shipped profile for a GPU and model: profiles/<gpu>_<model>.json, the model named by its
    config file (llama3_8b, smollm2_135m) or by the short name given (smollm2)."""
    from disagg.sim.gpus import gpu_key
    g = gpu_key(gpu_name)
    for key in (model_key(spec), os.path.splitext(os.path.basename(spec))[0].replace("-", "_")):
        path = os.path.join(HERE, "profiles", f"{g}_{key}.json")
        if os.path.exists(path):
            return path
    return None


def find_trace(spec: str) -> str:
    if spec in TRACES:
        for d in TRACE_DIRS:
            p = os.path.join(d, TRACES[spec])
            if os.path.exists(p):
                return p
        raise SystemExit(f"error: trace {spec!r} not found in {' or '.join(TRACE_DIRS)}")
    if not os.path.exists(spec):
        raise SystemExit(f"error: no trace file {spec!r}")
    return spec


def length_spec(s: str) -> tuple:
    """'1024' | 'uniform:LO:HI' | 'lognormal:MEDIAN:SIGMA'."""
    kind, *a = s.split(":")
    if not a:
        return ("fixed", int(kind))
    return (kind, *[float(x) for x in a])


def parse_slo(s: str | None) -> tuple[float, float] | None:
    """'ttft=MS,tpot=MS' -> (seconds, seconds)."""
    if not s:
        return None
    vals = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in ("ttft", "tpot") or not v:
            raise SystemExit(f"error: --slo takes ttft=MS,tpot=MS (got {s!r})")
        vals[k.strip()] = float(v) / 1e3
    return vals.get("ttft", float("inf")), vals.get("tpot", float("inf"))


def load_trace(args):
    from disagg.traces import cap_lengths, load_csv, rescale, synthetic, window
    if args.trace == "synthetic":
        rate = args.rate or 1.0
        n = args.num_requests or max(1, int(rate * (args.duration or 60)))
        tr = synthetic(n, rate, prompt=length_spec(args.input_len), output=length_spec(args.output_len),
                       burstiness=args.burstiness, seed=args.seed)
    else:
        limit = args.num_requests
        if args.rate and args.duration and limit is None:
            limit = max(2, round(args.rate * args.duration))   # S seconds' worth at R, from --start
        tr = load_csv(find_trace(args.trace), start=args.start, limit=limit)
        if args.rate:
            tr = rescale(tr, args.rate)                         # the slice's own mean becomes R
    if args.duration:
        tr = window(tr, args.duration)
    return cap_lengths(tr, args.max_model_len)


def perf_models(args, mc):
    """(decode / colocated model, prefill model) for the GPU, TPs and link asked for."""
    from disagg.sim.perf_model import make_model
    from disagg.sim.profile_model import load_profile
    prof = None
    path = args.profile
    if path is None and not args.roofline:
        path = find_profile(args.gpu, args.model)
    if path:
        prof = load_profile(path)
    return (make_model(mc, args.gpu, args.decode_tp, args.link, prof),
            make_model(mc, args.gpu, args.prefill_tp, args.link, prof))


def sim_config(args, **over):
    from disagg.sim.simulator import SimConfig
    kw = dict(num_prefill=args.prefill, num_decode=args.decode, kv_codec=args.kv_codec, policy=args.policy,
              local_prefill=args.local_prefill, local_prefill_threshold=args.local_prefill_threshold,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, block_size=args.block_size, num_blocks=args.num_gpu_blocks,
              gpu_memory_utilization=args.gpu_memory_utilization, predictor=args.predictor,
              coalesce=not args.exact, seed=args.seed, max_wait_s=args.max_wait_s)
    kw.update(over)
    try:
        return SimConfig(**kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# ---------------------------------------------------------------------- commands
def cmd_simulate(args) -> int:
    from disagg.sim.report import format_report, plot_cdfs, plot_goodput, strip, summarize
    from disagg.sim.simulator import simulate
    mc = model_config(args.model)
    slo = parse_slo(args.slo)
    dec, pre = perf_models(args, mc)
    tr = load_trace(args)
    cfg = sim_config(args)
    progress = not args.no_progress and sys.stderr.isatty()
    print(f"{len(tr)} requests; {dec.describe()}", file=sys.stderr)
    res = simulate(tr, cfg, dec, pre, progress=progress)
    s = summarize(res, slo)
    s["perf_model"] = dec.describe()
    out = {"summary": strip(s)}
    label = f"{args.prefill}P+{args.decode}D" if args.prefill else f"colocated x{args.decode}"
    if args.sweep_rates:
        sweep = []
        for r in [float(x) for x in args.sweep_rates.split(",")]:
            args2 = argparse.Namespace(**{**vars(args), "rate": r})
            sr = summarize(simulate(load_trace(args2), cfg, dec, pre), slo)
            sweep.append({"rate": r, "goodput": sr.get("goodput", sr["request_throughput"]),
                          "ttft_p90_s": sr["ttft_s"]["p90"], "tpot_p90_s": sr["tpot_s"]["p90"],
                          "slo_attainment": sr.get("slo_attainment")})
            print(f"rate {r:g}: goodput {sweep[-1]['goodput']:.2f} req/s, TTFT p90 "
                  f"{sr['ttft_s']['p90'] * 1e3:.0f} ms, TPOT p90 {sr['tpot_s']['p90'] * 1e3:.1f} ms", file=sys.stderr)
        out["sweep"] = sweep
    if args.json:
        print(json.dumps(out, indent=1, default=float))
    else:
        print(format_report(s))
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        paths = [plot_cdfs({label: s}, os.path.join(args.plot, "latency_cdf.png"))]
        if args.sweep_rates:
            paths.append(plot_goodput({label: [(p["rate"], p["goodput"]) for p in out["sweep"]]},
                                      os.path.join(args.plot, "goodput_vs_rate.png")))
        print("plots: " + ", ".join(paths), file=sys.stderr)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1, default=float)
    return 0


def cmd_plan(args) -> int:
    from disagg.sim.perf_model import make_model
    from disagg.sim.profile_model import load_profile
    from disagg.sim.plan import Planner, format_plan
    mc = model_config(args.model)
    slo = parse_slo(args.slo)
    if slo is None:
        raise SystemExit("error: plan needs --slo ttft=MS,tpot=MS")
    tr = load_trace(args)
    prof = None
    if not args.roofline:
        path = args.profile or find_profile(args.gpu, args.model)
        prof = load_profile(path) if path else None
    base = sim_config(args, num_prefill=0, num_decode=1)
    tps = tuple(int(t) for t in args.tp.split(","))
    pl = Planner(tr, base, lambda tp: make_model(mc, args.gpu, tp, args.link, prof), slo, args.max_gpus,
                 args.target, tps=tps)
    print(f"{len(tr)} requests over {tr[-1].arrival_s:.0f} s; {pl._model(1).describe()}", file=sys.stderr)
    ranked = pl.search()
    print(format_plan(ranked, args.top, slo, args.target, pl.sims))
    if args.json_out:
        from disagg.sim.report import strip
        with open(args.json_out, "w") as f:
            json.dump([{"layout": c.layout, "codec": c.codec, "gpus": c.gpus, "attainment": c.attainment,
                        "goodput_per_gpu": c.goodput_per_gpu, "summary": strip(c.summary)} for c in ranked],
                      f, indent=1, default=float)
    return 0


def cmd_profile(args) -> int:
    from disagg.sim.profile import main as profile_main
    return profile_main(args)


# ---------------------------------------------------------------------- flags
def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="azure-conv",
                   help="azure-conv | azure-code | a CSV in the Azure format | synthetic")
    p.add_argument("--model", default="llama3-8b", help=f"{' | '.join(MODELS)} | a config.json | a checkpoint dir")
    p.add_argument("--profile", default=None, help="a `disagg profile` JSON (default: the shipped one for "
                   "--gpu and --model if any, else the roofline model)")
    p.add_argument("--roofline", action="store_true", help="use the analytic model even if a profile exists")
    p.add_argument("--gpu", default="h100", help="h100 | h200 | a100 | l40s | l4 | b200")
    p.add_argument("--link", default="nvlink", choices=["nvlink", "pcie", "ib", "tcp"],
                   help="prefill -> decode KV link")
    p.add_argument("--rate", type=float, default=None, help="rescale arrivals to this mean rate (req/s)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of trace: with --rate the R*S requests from --start rescaled to R, else the first S s")
    p.add_argument("--start", type=int, default=0, help="first trace row")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--input-len", default="lognormal:1000:0.8", help="synthetic: N | uniform:LO:HI | "
                   "lognormal:MEDIAN:SIGMA")
    p.add_argument("--output-len", default="lognormal:200:0.8", help="synthetic output lengths")
    p.add_argument("--burstiness", type=float, default=1.0, help="synthetic: gamma shape (1 = Poisson)")
    p.add_argument("--slo", default=None, help="ttft=MS,tpot=MS")
    p.add_argument("--policy", default="fcfs", choices=["fcfs", "spf"])
    p.add_argument("--max-wait-s", type=float, default=10.0)
    p.add_argument("--predictor", default="max_tokens", help="max_tokens | fixed:N | noisy:SIGMA")
    p.add_argument("--local-prefill", default="auto", choices=["auto", "never", "always"])
    p.add_argument("--local-prefill-threshold", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="KV blocks per decode worker (override)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact", action="store_true", help="no coalesced decode steps (slower, same results)")
    p.add_argument("--json-out", default=None, help="also write the JSON here")


def register(sub) -> None:
    s = sub.add_parser("simulate", help="simulate a deployment on a trace (TTFT, TPOT, goodput)")
    _workload_args(s)
    s.add_argument("--prefill", type=int, default=0, help="prefill workers (0: colocated)")
    s.add_argument("--decode", type=int, default=1, help="decode (or colocated) workers")
    s.add_argument("--prefill-tp", type=int, default=1)
    s.add_argument("--decode-tp", type=int, default=1)
    s.add_argument("--kv-codec", default="none", choices=["none", "fp8", "int8", "int4"])
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.add_argument("--plot", default=None, help="write latency CDFs (and goodput vs rate) into this folder")
    s.add_argument("--sweep-rates", default=None, help="also simulate these rates (r1,r2,...) for goodput vs rate")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_simulate)

    p = sub.add_parser("plan", help="fewest GPUs (pool sizes, TP, codec, colocated or not) meeting an SLO")
    _workload_args(p)
    p.add_argument("--max-gpus", type=int, default=16)
    p.add_argument("--target", type=float, default=0.9, help="fraction of requests that must meet the SLO")
    p.add_argument("--tp", default="1,2,4,8", help="tensor-parallel sizes to try")
    p.add_argument("--top", type=int, default=10)
    p.set_defaults(fn=cmd_plan, prefill=0, decode=1, kv_codec="none", decode_tp=1, prefill_tp=1)

    f = sub.add_parser("profile", help="measure a performance model on this GPU (writes JSON)")
    f.add_argument("model_dir", nargs="?", default=None, help="checkpoint directory (only config.json is read)")
    f.add_argument("--model-config", default=None, help="a config.json, or a shipped name (llama3-8b, smollm2)")
    f.add_argument("--out", default=None, help="output JSON (default disagg/sim/profiles/<gpu>_<model>.json)")
    f.add_argument("--device", default="cuda")
    f.add_argument("--quick", action="store_true", help="fewer points (a smoke run)")
    f.add_argument("--max-model-len", type=int, default=8192)
    f.add_argument("--max-num-batched-tokens", type=int, default=8192)
    f.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    f.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    f.add_argument("--gpu-name", default=None, help="record the profile as this GPU (default: the device's)")
    f.add_argument("--link-peer", default=None, help="a second device (cuda:1) to measure the copy link to")
    f.add_argument("--budget-s", type=float, default=170.0, help="stop measuring new points after this long")
    f.set_defaults(fn=cmd_profile)
