"""Shortest-predicted-first against FCFS (and oracle lengths) under overload, in the real engine.

    python benchmarks/bench_policy.py [--requests 300] [--load 1.5]

What runs: the colocated LLMEngine (scheduler, block manager, model runner) on a tiny
random Llama model (so a CPU can overload it in seconds; the policy effect does not depend
on the weights). Arrivals: the Azure LLM conversation trace's inter-arrival times, rescaled so
the offered load is --load times what the engine sustains (measured first, in the same run).
Each arrival takes a held-out prompt from the collected SmolLM2 answers
(results/smollm2_lengths.jsonl): the response is forced to exactly SmolLM2's true length
(ignore_eos), the prompt length is the real prompt's token count. The predictor is trained on
the other prompts (router/predictor.py), so "spf" uses honest held-out predictions; "oracle"
uses the true lengths; "fcfs" none.
Reports mean / P90 / P99 end-to-end latency, TTFT, and P99 time per output token per policy.

Time is virtual (so other load on the machine cannot bias one policy): each engine step
advances the clock by a cost model fitted to our H200 measurements of a Llama-3-8B-shaped
model (benchmarks/RESULTS.md): 4.8 ms + 0.03 ms per decoding sequence + 0.025 ms per
prefill token. The scheduler's aging reads the same clock.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def azure_gaps(path: str, n: int, seed: int) -> list[float]:
    with open(path) as f:
        ts = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in csv.DictReader(f)]
    gaps = [(b - a).total_seconds() for a, b in zip(ts, ts[1:])]
    start = random.Random(seed).randrange(0, len(gaps) - n)
    return gaps[start:start + n]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


STEP_MS, PER_SEQ_MS, PER_PREFILL_TOKEN_MS = 4.8, 0.03, 0.025


def run(model_dir, items, arrivals, policy, max_seqs, max_wait_s):
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.llm_engine import LLMEngine
    from disagg.request import SamplingParams
    eng = LLMEngine(EngineConfig(model_dir, dtype="float32", device="cpu",
                                 cache=CacheConfig(block_size=16, num_blocks=8192),
                                 scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=4096,
                                                           max_model_len=4096,
                                                           ordering="fcfs" if policy == "fcfs" else "spf",
                                                           max_wait_s=max_wait_s)),
                    detokenize=False)
    clock = [0.0]
    eng.scheduler.clock = lambda: clock[0]
    real_schedule = eng.scheduler.schedule

    def schedule():     # charge the step's modelled cost to the virtual clock
        out = real_schedule()
        if out:
            prefill = sum(s.num_tokens for s in out.scheduled if not s.is_decode)
            clock[0] += (STEP_MS + PER_SEQ_MS * out.num_decode + PER_PREFILL_TOKEN_MS * prefill) / 1e3
        return out
    eng.scheduler.schedule = schedule
    rnd = random.Random(1)
    pending = list(range(len(items)))
    first, done = {}, {}
    rid_of = {}
    wall = time.monotonic()
    while len(done) < len(items):
        if not eng.has_unfinished() and pending:
            clock[0] = max(clock[0], arrivals[pending[0]])
        while pending and arrivals[pending[0]] <= clock[0]:
            i = pending.pop(0)
            it = items[i]
            ids = [rnd.randrange(3, 380) for _ in range(it["prompt_tokens"])]
            pred = {"fcfs": None, "oracle": float(it["response_tokens"]), "spf": it["predicted"]}[policy]
            req = eng.add_request(ids, SamplingParams(max_tokens=it["response_tokens"], temperature=0,
                                                      ignore_eos=True), predicted_len=pred)
            req.arrival_time = arrivals[i]
            rid_of[req.request_id] = i
        for out in eng.step():
            i = rid_of[out.request_id]
            if i not in first and out.new_token_ids:
                first[i] = clock[0]
            if out.finished:
                done[i] = clock[0]
    e2e = [done[i] - arrivals[i] for i in range(len(items))]
    ttft = [first[i] - arrivals[i] for i in range(len(items))]
    tpot = [(done[i] - first[i]) / max(items[i]["response_tokens"] - 1, 1) for i in range(len(items))
            if items[i]["response_tokens"] > 1]
    return {"policy": policy, "mean_e2e_s": sum(e2e) / len(e2e), "p50_e2e_s": pct(e2e, 50),
            "p90_e2e_s": pct(e2e, 90), "p99_e2e_s": pct(e2e, 99), "mean_ttft_s": sum(ttft) / len(ttft),
            "p90_ttft_s": pct(ttft, 90), "p99_tpot_ms": 1e3 * pct(tpot, 99), "virtual_s": clock[0],
            "wall_s": time.monotonic() - wall}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default=os.path.join(ROOT, "benchmarks/results/smollm2_lengths.jsonl"))
    ap.add_argument("--trace", default=os.path.join(os.path.dirname(ROOT),
                                                    "shared/data/traces/azure2023/AzureLLMInferenceTrace_conv.csv"))
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--load", type=float, default=1.5, help="offered load / sustainable throughput")
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--max-response", type=int, default=1024, help="cap the forced lengths")
    ap.add_argument("--max-wait-s", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from conftest import build_tiny_checkpoint
    from router.predictor import evaluate, train
    rows = [json.loads(l) for l in open(args.lengths)]
    rnd = random.Random(args.seed)
    rnd.shuffle(rows)
    n_test = max(args.requests, len(rows) // 5)
    test, train_rows = rows[:n_test], rows[n_test:]
    pred = train(train_rows)
    quality = evaluate(pred, test)
    items = []
    for r in test[:args.requests]:
        items.append({"prompt_tokens": min(r["prompt_tokens"], 1024),
                      "response_tokens": max(1, min(r["response_tokens"], args.max_response)),
                      "predicted": float(pred.predict(r["prompt"], r["prompt_tokens"]))})
    d = build_tiny_checkpoint(tempfile.mkdtemp(), "llama_gqa")
    import json as _j
    cfg = _j.load(open(os.path.join(d, "config.json")))
    cfg["max_position_embeddings"] = 4096
    _j.dump(cfg, open(os.path.join(d, "config.json"), "w"))

    # Capacity: all of a sample at once (no arrival gaps): tokens per virtual second at full batch.
    t = time.monotonic()
    ncal = min(len(items), 2 * args.max_seqs)
    cal = run(d, items[:ncal], [0.0] * ncal, "fcfs", args.max_seqs, args.max_wait_s)
    tok_s = sum(i["response_tokens"] for i in items[:ncal]) / cal["virtual_s"]
    req_s = tok_s / (sum(i["response_tokens"] for i in items) / len(items))
    gaps = azure_gaps(args.trace, len(items), args.seed)
    scale = (len(gaps) / sum(gaps)) / (args.load * req_s)      # trace rate -> load x capacity
    arrivals, acc = [], 0.0
    for g in gaps:
        arrivals.append(acc)
        acc += g * scale
    print(f"capacity ~{req_s:.1f} req/s ({tok_s:.0f} tok/s, calibrated in {time.monotonic() - t:.0f}s); "
          f"offered {args.load:.1f}x over {arrivals[-1]:.0f}s; predictor held-out tau {quality['kendall_tau']:.3f}",
          flush=True)
    results = []
    for policy in ("fcfs", "spf", "oracle"):
        r = run(d, items, arrivals, policy, args.max_seqs, args.max_wait_s)
        results.append(r)
        print(f"{policy:7s} mean e2e {r['mean_e2e_s']:6.2f}s  p90 {r['p90_e2e_s']:6.2f}s  p99 {r['p99_e2e_s']:6.2f}s  "
              f"mean ttft {r['mean_ttft_s']:6.2f}s  p99 tpot {r['p99_tpot_ms']:6.2f}ms", flush=True)
    base = results[0]
    out = {"requests": len(items), "load": args.load, "clock": "virtual",
           "step_cost_ms": {"base": STEP_MS, "per_decode_seq": PER_SEQ_MS, "per_prefill_token": PER_PREFILL_TOKEN_MS}, "capacity_req_s": req_s, "max_seqs": args.max_seqs,
           "predictor_heldout": quality, "results": results,
           "spf_vs_fcfs_mean_e2e": 1 - results[1]["mean_e2e_s"] / base["mean_e2e_s"],
           "oracle_vs_fcfs_mean_e2e": 1 - results[2]["mean_e2e_s"] / base["mean_e2e_s"],
           "spf_p99_tpot_vs_fcfs": results[1]["p99_tpot_ms"] / base["p99_tpot_ms"] - 1}
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=1))
    with open(os.path.join(ROOT, "benchmarks/results/policy_cpu.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
