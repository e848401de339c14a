"""The `disagg` command: generate, serve, demo, bench. Flags follow vLLM's names where one exists."""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time


# ---------------------------------------------------------------------- shared flags
def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face checkpoint directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"],
                   help="weights and KV dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None, help="KV-cache blocks (skips sizing)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--cpu-kv-gib", type=float, default=1.0, help="KV-cache size on CPU, GiB")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--max-prefill-graph-tokens", type=int, default=2048,
                   help="steps carrying prefill chunks of up to this many tokens replay piecewise CUDA graphs "
                        "(attention eager); 0: run them eagerly")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of prompt prefixes seen before (default: on; --no-enable-prefix-caching)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights of the checkpoint's shapes (benchmarks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "spf"],
                   help="which waiting request goes next: fcfs, or spf = shortest predicted response first, "
                        "with aging (no request waits more than --max-wait-s behind later arrivals)")
    p.add_argument("--max-wait-s", type=float, default=10.0, help="spf: the aging bound, seconds")


def resolve_model(model: str | None) -> tuple[str, str]:
    """(directory, served name). No model: convert the bundled SmolLM2 once and use it."""
    if model is None:
        from disagg.model.gguf_convert import default_model_dir
        d = default_model_dir()
        return d, "SmolLM2-135M-Instruct"
    if not os.path.isdir(model):
        raise SystemExit(f"error: {model!r} is not a directory (give a Hugging Face checkpoint directory; "
                         "nothing is downloaded from a hub)")
    return model, os.path.basename(os.path.normpath(model))


def engine_config(args, model_dir: str):
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    return EngineConfig(
        model_dir=model_dir, dtype=args.dtype, device=args.device,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_gpu_blocks_override,
                          gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_gib=args.cpu_kv_gib,
                          enable_prefix_caching=args.enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len, ordering=args.scheduling_policy,
                                  max_wait_s=args.max_wait_s),
        use_cuda_graphs=not args.enforce_eager, piecewise_max_tokens=args.max_prefill_graph_tokens,
        load_format=args.load_format, seed=args.seed)


def build_engine(args):
    from disagg.engine.llm_engine import LLMEngine
    model_dir, name = resolve_model(args.model)
    try:
        cfg = engine_config(args, model_dir)
        t0 = time.perf_counter()
        eng = LLMEngine(cfg, progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Loaded {name} ({eng.model_cfg.num_params / 1e6:.0f}M params, {eng.runner.dtype}, "
          f"{eng.runner.device}, kernels: {eng.runner.kernels.name}, {eng.runner.num_blocks} KV blocks of "
          f"{cfg.cache.block_size}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return eng, name


# ---------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from disagg.request import SamplingParams
    eng, _ = build_engine(args)
    tok = eng.tokenizer
    if args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed_sampling, stop=tuple(args.stop or ()),
                                ignore_eos=args.ignore_eos)
        req = eng.add_request(ids, params)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.perf_counter()
    while eng.has_unfinished():
        for out in eng.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{req.num_output_tokens} tokens in {dt:.2f}s, {req.num_output_tokens / max(dt, 1e-9):.1f} tok/s, "
          f"finish_reason={req.finish_reason.value}]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- serve
async def start_server(args, eng, name, host: str, port: int):
    from aiohttp import web

    from disagg.engine.async_engine import AsyncEngine
    from router.server import Server
    aeng = AsyncEngine(eng)
    aeng.start()
    server = Server(aeng, eng.tokenizer, args.served_model_name or name, eng.max_model_len, **server_kwargs(args))
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return aeng, runner, server


def load_predictor(args):
    """The length predictor the router uses (the shipped SmolLM2 one, a trained file, or none)."""
    if args.length_predictor == "none":
        return None
    from router import predictor as lp
    if args.length_predictor == "default":
        # A predictor belongs to a model: the shipped one learned SmolLM2's answers.
        return lp.load_default_predictor() if args.model is None else None
    return lp.LearnedPredictor.load(args.length_predictor)


def server_kwargs(args) -> dict:
    return dict(api_key=args.api_key, predictor=load_predictor(args), max_queued_requests=args.max_queued_requests,
                max_queued_tokens=args.max_queued_tokens, request_log=args.request_log)


def launch_cluster(args):
    """Disaggregated mode: start (or join) Ray and bring up the prefill and decode workers."""
    from disagg.config import ModelConfig
    from disagg.deploy.cluster import ClusterConfig, DisaggEngine
    from disagg.model.tokenizer import Tokenizer
    model_dir, name = resolve_model(args.model)
    try:
        ecfg = engine_config(args, model_dir)
        ccfg = ClusterConfig(ecfg, num_prefill=args.prefill or 0, num_decode=args.decode, kv_codec=args.kv_codec,
                             address=args.address, local_prefill=args.local_prefill,
                             local_prefill_threshold=args.local_prefill_threshold, prefill_cp=args.prefill_cp,
                             prefill_cp_min_tokens=args.prefill_cp_min_tokens, prefill_routing=args.prefill_routing,
                             prefill_tp=args.prefill_tp, decode_tp=args.decode_tp,
                             max_worker_restarts=args.max_worker_restarts)
        mc = ModelConfig.from_dir(model_dir)
        ccfg.check_model(mc)
        tok = Tokenizer(model_dir)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    max_len = ecfg.scheduler.max_model_len or mc.max_position_embeddings
    t0 = time.perf_counter()
    tps = "".join(f", {flag} {n}" for flag, n in (("prefill TP", args.prefill_tp), ("decode TP", args.decode_tp))
                  if n > 1)
    print(f"Starting {args.prefill or 0} prefill + {args.decode} decode workers{tps} for {name} "
          f"({'Ray at ' + args.address if args.address else 'local Ray'})", file=sys.stderr, flush=True)
    eng = DisaggEngine(ccfg, tok, log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        eng.launch()
    except Exception as e:  # noqa: BLE001 - bring-up errors end the command with their message
        raise SystemExit(f"error: cluster bring-up failed: {type(e).__name__}: {e}") from None
    print(f"Cluster up in {time.perf_counter() - t0:.1f}s, KV codec {eng.codec}", file=sys.stderr, flush=True)
    return eng, tok, name, max_len


async def start_cluster_server(args, eng, tok, name, max_len, host, port):
    from aiohttp import web

    from router.server import Server
    eng.start()
    server = Server(eng, tok, args.served_model_name or name, max_len, **server_kwargs(args))
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return eng, runner, server


def cmd_serve(args) -> int:
    disaggregated = args.prefill is not None or args.decode is not None
    if disaggregated and args.colocated:
        raise SystemExit("error: --colocated and --prefill/--decode exclude each other")
    if disaggregated and (args.decode is None or args.decode < 1 or (args.prefill or 0) < 0):
        raise SystemExit("error: cluster mode needs --decode M >= 1 (and --prefill N >= 0; "
                         "--prefill 0 runs M colocated replicas behind the router)")
    if not disaggregated and (args.prefill_tp > 1 or args.decode_tp > 1):
        raise SystemExit("error: --prefill-tp/--decode-tp need cluster mode (--decode M; --prefill 0 --decode M "
                         "--decode-tp N for colocated replicas of N GPUs each)")
    args.api_key = args.api_key or os.environ.get("DISAGG_API_KEY")
    if disaggregated:
        eng, tok, name, max_len = launch_cluster(args)
    else:
        eng, name = build_engine(args)

    async def main():
        import signal
        if disaggregated:
            aeng, runner, server = await start_cluster_server(args, eng, tok, name, max_len, args.host, args.port)
            mode = (f"disaggregated, {args.prefill}P+{args.decode}D, KV codec {eng.codec}, local prefill "
                    f"{args.local_prefill}" if args.prefill else f"{args.decode} colocated replicas")
        else:
            aeng, runner, server = await start_server(args, eng, name, args.host, args.port)
            mode = "colocated"
        print(f"Serving {args.served_model_name or name} ({mode}) on http://{args.host}:{args.port}/v1 "
              f"(Ctrl-C to stop)", file=sys.stderr, flush=True)
        stop, now = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):     # first signal: drain; a second: stop now
            loop.add_signal_handler(sig, lambda: now.set() if stop.is_set() else stop.set())
        while not stop.is_set() and aeng.healthy:
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        failed = not aeng.healthy and not stop.is_set()
        if stop.is_set() and aeng.healthy:
            server.begin_drain()
            n = server.in_flight
            print(f"Draining: {n} request(s) in flight, new ones get 503 (up to {args.shutdown_timeout:g}s; "
                  "signal again to stop now)", file=sys.stderr, flush=True)
            deadline = loop.time() + args.shutdown_timeout
            while server.in_flight and loop.time() < deadline and not now.is_set() and aeng.healthy:
                try:
                    await asyncio.wait_for(now.wait(), 0.1)
                except asyncio.TimeoutError:
                    pass
            if server.in_flight:
                print(f"Stopping with {server.in_flight} request(s) unfinished", file=sys.stderr, flush=True)
        await runner.cleanup()
        aeng.stop()
        if failed:
            print(f"error: the engine failed: {aeng.error}", file=sys.stderr, flush=True)
        return 1 if failed else 0
    return asyncio.run(main())


# ---------------------------------------------------------------------- demo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_demo(args) -> int:
    """Serve the model on a loopback port, ask one chat question over HTTP, print the answer."""
    import aiohttp
    eng, name = build_engine(args)
    args.api_key = None
    args.length_predictor = "none"

    async def main():
        port = _free_port()
        aeng, runner, _ = await start_server(args, eng, name, "127.0.0.1", port)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": args.served_model_name or name, "messages": [{"role": "user", "content": args.question}],
                "max_tokens": args.max_tokens, "temperature": 0}
        try:
            async with aiohttp.ClientSession() as s:
                t0 = time.perf_counter()
                async with s.post(url, json=body) as r:
                    data = await r.json()
                dt = time.perf_counter() - t0
        finally:
            await runner.cleanup()
            aeng.stop()
        if "error" in data:
            print(f"error: {data['error']['message']}", file=sys.stderr)
            return 1
        print(f"POST {url}")
        print(f"user:      {args.question}")
        print(f"assistant: {data['choices'][0]['message']['content']}")
        u = data["usage"]
        print(f"[{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens in {dt:.2f}s]")
        return 0
    return asyncio.run(main())


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="disagg", description="Disaggregated prefill/decode LLM serving")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="complete one prompt and print it")
    add_engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed-sampling", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.set_defaults(fn=cmd_generate)

    s = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP endpoint")
    add_engine_args(s)
    s.add_argument("--colocated", action="store_true",
                   help="one engine does prefill and decode (the default without --prefill/--decode)")
    s.add_argument("--prefill", type=int, default=None,
                   help="prefill workers (one GPU each): disaggregated mode; 0 with --decode M: M colocated "
                        "replicas behind the router")
    s.add_argument("--decode", type=int, default=None, help="decode workers (one GPU each): cluster mode")
    s.add_argument("--local-prefill", default="auto", choices=["auto", "never", "always"],
                   help="conditional disaggregation: auto prefills a prompt on its decode worker when that is "
                        "cheaper than a transfer (short prompts, idle prefill-free decode workers, a backed-up "
                        "prefill pool); never: always use the prefill pool; always: never transfer")
    s.add_argument("--local-prefill-threshold", type=int, default=256,
                   help="prompt tokens a decode step absorbs almost free (auto mode's stall model)")
    s.add_argument("--prefill-routing", default="cache_aware", choices=["cache_aware", "least_loaded"],
                   help="cache_aware: send a prompt where its prefix is cached unless that worker's queue is "
                        "longer by more than the cached tokens; least_loaded: fewest queued prompt tokens")
    s.add_argument("--prefill-cp", type=int, default=1,
                   help="GPUs per prefill worker (context parallelism): a prompt of at least --prefill-cp-min-tokens "
                        "is split across them and prefilled with ring attention")
    s.add_argument("--prefill-cp-min-tokens", type=int, default=4096,
                   help="shortest prompt prefilled with ring attention (shorter ones use the first GPU alone)")
    s.add_argument("--prefill-tp", type=int, default=1,
                   help="GPUs per prefill worker (tensor parallelism: heads and MLP sharded, all-reduce per layer)")
    s.add_argument("--decode-tp", type=int, default=1,
                   help="GPUs per decode worker (tensor parallelism); may differ from --prefill-tp: the KV "
                        "transfer reshards the heads rank to rank")
    s.add_argument("--kv-codec", default="auto", choices=["auto", "none", "fp8", "int8", "int4"],
                   help="KV compression between prefill and decode (auto: fastest handoff on the measured "
                        "link among the lossless and 8-bit codecs)")
    s.add_argument("--max-worker-restarts", type=int, default=3,
                   help="cluster mode: Ray restarts a dead worker up to this many times and it rejoins the pool "
                        "(0: a dead worker stays dead)")
    s.add_argument("--address", default=None, help="join an existing Ray cluster (default: start a local one)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set DISAGG_API_KEY)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT: stop accepting (503) and let in-flight requests finish for up to "
                        "this many seconds (a second signal stops at once)")
    add_router_args(s)
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="serve the model on loopback and answer one chat request")
    add_engine_args(d)
    d.add_argument("--question", default="What is the capital of France?")
    d.add_argument("--max-tokens", type=int, default=64)
    d.add_argument("--served-model-name", default=None)
    add_router_args(d)
    d.set_defaults(fn=cmd_demo)

    sub.add_parser("chat", help="terminal chat client that streams from a server (disagg chat --help)")
    sub.add_parser("predictor", help="response-length predictor tools (disagg predictor train --help)")
    from disagg.bench.cli import register as register_bench
    register_bench(sub)
    from disagg.sim.cli import register as register_sim     # profile, simulate, plan
    register_sim(sub)
    return ap


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests waiting for their first token before new ones get 429")
    p.add_argument("--max-queued-tokens", type=int, default=1 << 22,
                   help="prompt tokens waiting for their first token before new requests get 429")
    p.add_argument("--request-log", default=None,
                   help="append one JSON line per finished request (prompt text included) for "
                        "`disagg predictor train --log FILE`")
    p.add_argument("--length-predictor", default="default",
                   help="'default': the shipped predictor when serving the bundled SmolLM2, none for other "
                        "models; 'none'; or a file trained by `disagg predictor train`")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "chat":
        from disagg.chat import main as chat_main
        return chat_main(argv[1:]) or 0
    if argv and argv[0] == "predictor":
        from router.predictor_cli import main as predictor_main
        return predictor_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    return args.fn(args) or 0


if __name__ == "__main__":
    sys.exit(main())
