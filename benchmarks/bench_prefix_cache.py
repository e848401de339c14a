"""Prefix caching (issue 10): prefill tokens computed and TTFT with the cache on and off, and
cache-aware against least-loaded routing over 2 prefill workers.

    python benchmarks/bench_prefix_cache.py                         # CPU, bundled SmolLM2, both modes
    python benchmarks/bench_prefix_cache.py --modes colocated --device cuda --model DIR \\
        --conversations 32 --concurrency 16 --answer-tokens 128 --system-prompts 16 --sys-tokens 1500

Workloads (from ../shared/data/prompts, deterministic for a given --seed):
  multiturn  --conversations conversations of --turns turns: mt-bench's two questions, then short
             oasst prompts as follow-ups. Each turn's prompt is the whole conversation so far in the
             chat template. The answers are the model's own greedy answers, generated once (a
             transcript pass) and replayed as fixed token counts (ignore_eos), so every
             configuration serves the very same requests.
  sysprompt  --requests requests, each = one of --system-prompts long system prompts (ifeval
             instructions joined, about --sys-tokens tokens) + one user question (arena-hard /
             oasst), the system prompt drawn uniformly; --sys-answer-tokens tokens each.

Clients are closed-loop: --concurrency clients, each sending its next request (the next turn of
its conversation, or the next single request) as soon as the previous one finished.

Modes:
  colocated  one LLMEngine in this process: cache off, cache on.
  disagg     DisaggEngine on Ray (CPU actors when the Ray cluster has fewer GPUs than workers):
             --prefill 2 --decode 1, local prefill off (every prompt goes through the prefill
             pool): cache off; cache on + least-loaded routing; cache on + cache-aware routing; and
             cache-aware with conditional disaggregation on (--local-prefill auto: a prompt whose
             uncached part is cheaper to compute on the decode worker than to move is computed
             there). Needs `ray`.

Per run: prompt tokens, prefill tokens computed (colocated: prompt positions run through the
model; disagg: prefill workers' queries - hits, plus what decode workers prefilled themselves),
KV tokens transferred (disagg), hit rate,
TTFT mean / p50 / p90, wall time. Timings on a shared CPU are noisy; token counts are exact.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import device_slug, machine_info, write_json  # noqa: E402


# ---------------------------------------------------------------------- workloads
def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _data(data_dir):
    d = os.path.join(data_dir, "prompts")
    mt = _jsonl(os.path.join(d, "mt-bench", "question.jsonl"))
    oasst = []
    for name in ("en_100_text.jsonl", "prompt_lottery_en_250_text.jsonl"):
        oasst += [r if isinstance(r, str) else r.get("text", "") for r in _jsonl(os.path.join(d, "oasst", name))]
    arena = []
    for r in _jsonl(os.path.join(d, "arena-hard", "v0.1", "question.jsonl")):
        p = r.get("prompt") or (r["turns"][0]["content"] if r.get("turns") else None)
        if isinstance(p, str):
            arena.append(p)
    ifeval = [r["prompt"] for r in _jsonl(os.path.join(d, "ifeval", "input_data.jsonl"))]
    return mt, [p for p in oasst if 10 < len(p) <= 240], [p for p in arena if len(p) <= 400], ifeval


def build_multiturn(engine, tok, data, n_conv, turns, answer_tokens, seed):
    """[[(prompt ids, answer tokens), ...turns], ...conversations] from one greedy transcript pass."""
    from disagg.request import SamplingParams
    mt, follow, _, _ = data
    rng = random.Random(seed)
    convs = rng.sample(mt, n_conv)
    users = [[c["turns"][0], c["turns"][1]] + rng.sample(follow, max(0, turns - 2)) for c in convs]
    history = [[] for _ in convs]
    out = [[] for _ in convs]
    params = SamplingParams(max_tokens=answer_tokens, temperature=0.0)
    for k in range(turns):
        prompts = [tok.encode_chat(h + [{"role": "user", "content": u[k]}]) for h, u in zip(history, users)]
        reqs = engine.generate(prompts, params)
        for i, (p, r) in enumerate(zip(prompts, reqs)):
            out[i].append((p, r.num_output_tokens))
            history[i] += [{"role": "user", "content": users[i][k]},
                           {"role": "assistant", "content": tok.decode(r.output_token_ids)}]
    return out


def build_sysprompt(tok, data, n_sys, sys_tokens, n_req, answer_tokens, seed):
    """[[(prompt ids, answer tokens)], ...] single-turn requests sharing n_sys system prompts."""
    _, follow, arena, ifeval = data
    rng = random.Random(seed + 1)
    systems = []
    pool = ifeval[:]
    rng.shuffle(pool)
    for i in range(n_sys):
        text = f"You are assistant #{i} of a help desk. Follow every house rule below in each answer.\n"
        while len(tok.encode(text)) < sys_tokens and pool:
            text += f"- {pool.pop()}\n"
        systems.append(text)
    questions = follow + arena
    reqs = []
    for _ in range(n_req):
        msgs = [{"role": "system", "content": rng.choice(systems)}, {"role": "user", "content": rng.choice(questions)}]
        reqs.append([(tok.encode_chat(msgs), answer_tokens)])
    return reqs


# ---------------------------------------------------------------------- colocated
def _engine(args, model_dir, caching):
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.llm_engine import LLMEngine
    eng = LLMEngine(EngineConfig(model_dir, dtype=args.dtype, device=args.device,
                                 cache=CacheConfig(block_size=args.block_size, num_blocks=args.kv_blocks,
                                                   enable_prefix_caching=caching),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                                           max_num_seqs=args.concurrency * 2)))
    eng.prompt_computed = 0
    execute = eng.runner.execute

    def spy(sched, *a, **k):       # prompt positions run through the model (not decode tokens)
        for s in sched.scheduled:
            eng.prompt_computed += max(0, min(s.start + s.num_tokens, s.request.num_prompt_tokens) - s.start)
        return execute(sched, *a, **k)
    eng.runner.execute = spy
    return eng


def _params(answer_tokens, default):
    from disagg.request import SamplingParams
    return SamplingParams(max_tokens=answer_tokens or default, temperature=0.0, ignore_eos=True)


def run_colocated(args, model_dir, sessions, caching):
    eng = _engine(args, model_dir, caching)
    todo = [list(s) for s in sessions]
    waiting = list(range(len(todo)))
    live: dict[str, int] = {}                     # request id -> session
    t_add, ttft = {}, []
    t0 = time.perf_counter()

    def submit(i):
        prompt, n = todo[i].pop(0)
        rid = uuid.uuid4().hex
        eng.add_request(prompt, _params(n, args.answer_tokens), request_id=rid)
        live[rid] = i
        t_add[rid] = time.perf_counter()

    for _ in range(min(args.concurrency, len(waiting))):
        submit(waiting.pop(0))
    while live:
        for o in eng.step():
            if o.request_id in t_add and o.new_token_ids:
                ttft.append(time.perf_counter() - t_add.pop(o.request_id))
            if o.finished:
                i = live.pop(o.request_id)
                if todo[i]:
                    submit(i)
                elif waiting:
                    submit(waiting.pop(0))
    wall = time.perf_counter() - t0
    pc = eng.scheduler.prefix_stats
    eng.block_manager.check_integrity()
    prompt_tokens = sum(len(p) for s in sessions for p, _ in s)
    return {"mode": "colocated", "prefix_caching": caching, "requests": len(ttft), "prompt_tokens": prompt_tokens,
            "prefill_tokens_computed": eng.prompt_computed, "cache_queries": pc.queries, "cache_hits": pc.hits,
            **_ttft(ttft), "wall_s": wall}


def _ttft(xs):
    xs = sorted(xs)
    q = lambda f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    return {"ttft_mean_s": statistics.fmean(xs), "ttft_p50_s": q(0.5), "ttft_p90_s": q(0.9)}


# ---------------------------------------------------------------------- disaggregated
def run_disagg(args, model_dir, sessions, caching, routing, local_prefill="never"):
    import ray

    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.deploy.cluster import ClusterConfig, DisaggEngine
    from disagg.messages import WorkerLoad, decode
    from disagg.model.tokenizer import Tokenizer
    ecfg = EngineConfig(model_dir, dtype=args.dtype,
                        cache=CacheConfig(block_size=args.block_size, num_blocks=args.kv_blocks,
                                          enable_prefix_caching=caching),
                        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                                  max_num_seqs=args.concurrency * 2))
    eng = DisaggEngine(ClusterConfig(ecfg, 2, 1, kv_codec="none", local_prefill=local_prefill, prefill_routing=routing),
                       Tokenizer(model_dir), log=lambda *a: None)
    eng.launch()
    ttft = []

    async def client(queue):
        while queue:
            for prompt, n in queue.pop(0):
                t = time.perf_counter()
                first = True
                async for out in eng.generate(prompt, _params(n, args.answer_tokens), uuid.uuid4().hex):
                    if first and out.new_token_ids:
                        ttft.append(time.perf_counter() - t)
                        first = False

    async def main():
        eng.start()
        queue = [list(s) for s in sessions]
        t0 = time.perf_counter()
        try:
            await asyncio.gather(*[client(queue) for _ in range(args.concurrency)])
        finally:
            for t in eng._tasks:
                t.cancel()
        return time.perf_counter() - t0

    try:
        wall = asyncio.run(main())
        loads = {r: decode(ray.get(a.load.remote()), WorkerLoad) for r, a in eng.actors.items()}
        stats = {r: ray.get(a.transfer_stats.remote()) for r, a in eng.actors.items()}
        eng.check_integrity()
    finally:
        eng.stop()
    pre = [loads[r] for r in eng.prefill_ranks]
    dec = loads[eng.decode_ranks[0]]
    mc_bytes = _kv_bytes_per_token(model_dir, eng)
    prompt_tokens = sum(len(p) for s in sessions for p, _ in s)
    sent = round(sum(stats[r]["bytes_raw"] for r in eng.prefill_ranks) / mc_bytes)
    # the decode worker's lookups: Reserve (queries - hits = tokens sent) and local prefills (= computed there)
    local_computed = dec.prefix_cache_queries - dec.prefix_cache_hits - sent
    return {"mode": "disagg", "prefix_caching": caching, "routing": routing, "local_prefill": local_prefill,
            "local_prefills": eng.local_prefills, "requests": len(ttft), "prompt_tokens": prompt_tokens,
            "prefill_tokens_computed": sum(w.prefix_cache_queries - w.prefix_cache_hits for w in pre) + local_computed
            if caching else prompt_tokens,
            "prefill_cache_hits": [w.prefix_cache_hits for w in pre],
            "prefill_cache_queries": [w.prefix_cache_queries for w in pre],
            "decode_cache_hits": dec.prefix_cache_hits,
            "kv_tokens_transferred": sent,
            **_ttft(ttft), "wall_s": wall}


def _kv_bytes_per_token(model_dir, eng):
    from disagg.config import ModelConfig
    import torch
    mc = ModelConfig.from_dir(model_dir)
    dtype = eng.cfg.engine.torch_dtype if eng.pg is not None else torch.float32
    return mc.kv_bytes_per_token(dtype)


# ---------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--modes", default="colocated,disagg")
    ap.add_argument("--workloads", default="multiturn,sysprompt")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--system-prompts", type=int, default=6)
    ap.add_argument("--sys-tokens", type=int, default=250)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--sys-answer-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-blocks", type=int, default=256, help="KV blocks per engine / worker")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in this process (default: 1 on CPU, as the Ray CPU actors use; on a shared "
                         "2-core machine 2 threads ran 5-30x slower)")
    ap.add_argument("--out", default=None, help="results file name (default prefix_cache_<device>.json)")
    args = ap.parse_args(argv)

    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    from disagg.model.tokenizer import Tokenizer
    if args.model is None:
        from disagg.model.gguf_convert import default_model_dir
        model_dir = default_model_dir()
    else:
        model_dir = args.model
    tok = Tokenizer(model_dir)
    data = _data(args.data_dir)
    t0 = time.perf_counter()
    workloads = {}
    if "multiturn" in args.workloads:
        workloads["multiturn"] = build_multiturn(_engine(args, model_dir, True), tok, data, args.conversations,
                                                 args.turns, args.answer_tokens, args.seed)
    if "sysprompt" in args.workloads:
        workloads["sysprompt"] = build_sysprompt(tok, data, args.system_prompts, args.sys_tokens, args.requests,
                                                 args.sys_answer_tokens, args.seed)
    print(f"workloads built in {time.perf_counter() - t0:.1f}s: " + ", ".join(
        f"{k}: {sum(len(s) for s in v)} requests, {sum(len(p) for s in v for p, _ in s)} prompt tokens"
        for k, v in workloads.items()), file=sys.stderr)

    runs = []
    for name, sessions in workloads.items():
        if "colocated" in args.modes:
            for caching in (False, True):
                r = {"workload": name, **run_colocated(args, model_dir, sessions, caching)}
                runs.append(r)
                print(json.dumps(r), file=sys.stderr)
        if "disagg" in args.modes:
            for caching, routing, local in ((False, "least_loaded", "never"), (True, "least_loaded", "never"),
                                            (True, "cache_aware", "never"), (True, "cache_aware", "auto")):
                r = {"workload": name, **run_disagg(args, model_dir, sessions, caching, routing, local)}
                runs.append(r)
                print(json.dumps(r), file=sys.stderr)

    result = {"benchmark": "prefix_cache", "model": os.path.basename(os.path.normpath(model_dir)),
              "machine": machine_info(device), "args": vars(args),
              "command": "python benchmarks/bench_prefix_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": runs}
    for path in write_json(result, args.out or f"prefix_cache_{device_slug(device)}.json"):
        print(f"wrote {path}", file=sys.stderr)
    print(table(runs))


def table(runs) -> str:
    """The RESULTS.md table of one run."""
    rows = ["| workload | mode | cache | routing | prompt tokens | prefill computed | KV tokens sent | "
            "TTFT mean s | p50 | p90 | wall s |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        sent = f"{r['kv_tokens_transferred']:.0f}" if "kv_tokens_transferred" in r else ""
        routing = (r.get("routing", "") + (", local auto" if r.get("local_prefill") == "auto" else "")
                   if r["prefix_caching"] else "")
        rows.append(f"| {r['workload']} | {r['mode']} | {'on' if r['prefix_caching'] else 'off'} | "
                    f"{routing} | {r['prompt_tokens']} | "
                    f"{r['prefill_tokens_computed']} ({r['prefill_tokens_computed'] / r['prompt_tokens']:.0%}) | "
                    f"{sent} | {r['ttft_mean_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p90_s']:.2f} | "
                    f"{r['wall_s']:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
