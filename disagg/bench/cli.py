"""`disagg bench`: load-test any OpenAI-compatible endpoint and print vllm-bench-serve's summary.

    disagg bench --url http://127.0.0.1:8000 --trace AzureLLMInferenceTrace_conv.csv --rate 8 \\
        --num-prompts 500 --goodput ttft:250 tpot:25 --save-result conv_8.json
    disagg bench --url URL --input-len 1020 --output-len 129 --rate 64 --num-prompts 2000
    disagg bench --url https://host/v1 --endpoint chat --dataset question.jsonl --output-len 256 \\
        --rate 2 --max-concurrency 16 --api-key $KEY
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time

DEFAULT_URL = "http://127.0.0.1:8000"


def register(sub) -> None:
    """Add the `bench` subcommand to the `disagg` CLI's subparsers."""
    p = sub.add_parser("bench", help="open-loop load generator for an OpenAI-compatible endpoint "
                                     "(TTFT, TPOT, ITL, goodput)",
                       description="Send requests at a given rate (open loop), stream the answers, and print "
                                   "the summary vllm bench serve prints. Without --trace or --dataset, prompts "
                                   "are random token ids of --input-len tokens.")
    add_args(p)
    p.set_defaults(fn=cmd_bench)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL, with or without /v1 (default {DEFAULT_URL})")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", default=None, help="Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens): "
                     "replay its prompt/output lengths (token-id prompts, ignore_eos) and its arrival pattern")
    src.add_argument("--dataset", default=None, help="prompt file (.jsonl[.gz], .json, .csv): text prompts, "
                     "answers of --output-len tokens")
    p.add_argument("--trace-start", type=int, default=0, help="first trace row to replay")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests to send (default 1000; with --trace, 1000 rows from --trace-start)")
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens without --trace/--dataset")
    p.add_argument("--output-len", type=int, default=128, help="answer tokens (not with --trace)")
    p.add_argument("--rate", type=float, default=None,
                   help="mean requests per second; inf: all at once (the default, except with --trace, "
                        "which keeps the trace's own timing unless --rate is given)")
    p.add_argument("--burstiness", type=float, default=None,
                   help="gamma arrivals of shape B (1 = Poisson, default; < 1 burstier); with --trace, "
                        "replaces the trace's own arrival pattern")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:250 tpot:25 (keys ttft, tpot, e2el; milliseconds)")
    p.add_argument("--save-result", default=None, metavar="FILE", help="write the summary as JSON")
    p.add_argument("--save-detailed", action="store_true",
                   help="also save per-request lengths, TTFT, TPOT, ITLs, E2EL and errors")
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"],
                   help="completions (/v1/completions; token-id prompts) or chat (/v1/chat/completions; text)")
    p.add_argument("--model", default=None, help="model name (default: the first the server lists)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $DISAGG_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="token-id prompts use ids in [3, VOCAB) (must be within the server's vocabulary)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="clamp trace prompt + output lengths to this context length")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly max_tokens (the server's ignore_eos extension; default on)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request fails")
    p.add_argument("--deadline", type=float, default=None,
                   help="end the run this many seconds after the start; unfinished requests count as failed")
    p.add_argument("--ttft-timeout", type=float, default=None,
                   help="abandon a request with no first token after this many seconds (counted as failed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_workload(args) -> list:
    from disagg.bench import workload as wl
    from disagg.traces import load_csv
    burst = args.burstiness
    if args.trace:
        if args.endpoint == "chat":
            raise SystemExit("error: --trace replays token-id prompts: use --endpoint completions")
        reqs = load_csv(args.trace, start=args.trace_start, limit=args.num_prompts or 1000)
        return wl.trace_workload(reqs, rate=args.rate, burstiness=burst, vocab_size=args.vocab_size,
                                 max_model_len=args.max_model_len, seed=args.seed)
    n = args.num_prompts or 1000
    rate = math.inf if args.rate is None else args.rate
    if args.dataset:
        return wl.dataset_workload(wl.load_prompts(args.dataset), n, output_len=args.output_len, rate=rate,
                                   burstiness=1.0 if burst is None else burst, seed=args.seed)
    if args.endpoint == "chat":
        raise SystemExit("error: random token-id prompts need --endpoint completions (or give --dataset)")
    return wl.fixed_workload(n, rate, args.input_len, args.output_len,
                             burstiness=1.0 if burst is None else burst, vocab_size=args.vocab_size, seed=args.seed)


async def bench(args) -> tuple[dict, int]:
    from disagg.bench import loadgen, summary
    slos = summary.parse_slos(args.goodput)
    requests = build_workload(args)
    if not requests:
        raise SystemExit("error: nothing to send")
    api_key = args.api_key or os.environ.get("DISAGG_API_KEY") or os.environ.get("OPENAI_API_KEY")
    model = args.model
    if model is None:
        try:
            model = await loadgen.fetch_model(args.url, api_key)
        except Exception as e:  # noqa: BLE001 - the server is down or not OpenAI-compatible
            raise SystemExit(f"error: could not list models at {args.url}: {e} (is the server up? --model NAME "
                             "skips this)") from None
    target = loadgen.Target(args.url, model, args.endpoint, api_key, args.ignore_eos, args.temperature)
    src = args.trace or args.dataset or f"random token ids, {args.input_len} in / {args.output_len} out"
    span = requests[-1].arrival_s
    print(f"Benchmarking {target.url} (model {model}): {len(requests)} requests from {src}, "
          f"arrivals over {span:.1f}s, max concurrency {args.max_concurrency or 'unlimited'}", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (NotImplementedError, RuntimeError):      # not the main thread, or no signals here
        pass
    prog = None if args.no_progress else loadgen.Progress(len(requests))
    out = await loadgen.run(requests, target, max_concurrency=args.max_concurrency, progress=prog, stop=stop,
                            deadline_s=args.deadline, request_timeout_s=args.request_timeout,
                            ttft_timeout_s=args.ttft_timeout)
    try:
        loop.remove_signal_handler(signal.SIGINT)
    except (NotImplementedError, RuntimeError):
        pass
    if out.interrupted:
        print(f"Interrupted: {len(out.results)} requests sent, {out.not_sent} never sent.", file=sys.stderr)
    d = summary.summarize(out.results, out.duration_s, slos, per_request=args.save_detailed)
    d.update(date=time.strftime("%Y%m%d-%H%M%S"), url=target.url, model_id=model, endpoint=args.endpoint,
             source=src, num_prompts=len(requests), not_sent=out.not_sent, interrupted=out.interrupted,
             hit_deadline=out.hit_deadline, request_rate=None if args.rate is None or math.isinf(args.rate) else args.rate,
             burstiness=args.burstiness, max_concurrency=args.max_concurrency, ignore_eos=args.ignore_eos,
             seed=args.seed)
    print(summary.format_summary(d))
    if args.save_result:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_result)), exist_ok=True)
        with open(args.save_result, "w") as f:
            json.dump(d, f, indent=1)
            f.write("\n")
        print(f"Saved {args.save_result}", file=sys.stderr)
    rc = 130 if out.interrupted else (1 if out.results and d["completed"] == 0 else 0)
    return d, rc


def cmd_bench(args) -> int:
    try:
        _, rc = asyncio.run(bench(args))
    except ValueError as e:       # bad --goodput, unreadable trace or prompt file
        raise SystemExit(f"error: {e}") from None
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="disagg bench")
    add_args(ap)
    ap.set_defaults(fn=cmd_bench)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
