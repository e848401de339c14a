"""Collect the served model's own response lengths on the prompt sets (length-predictor data).

    python benchmarks/collect_lengths.py --out benchmarks/results/smollm2_lengths.jsonl \
        --per-source 250 --max-tokens 512

Runs our colocated engine (greedy, the deployment's default chat template) over a seeded
sample of each source's prompts, in large continuous batches, and appends one JSON line per
answered prompt: source, id, prompt, prompt_tokens, response_tokens, finish_reason.
Re-running resumes (prompts already in the file are skipped). Answers that hit --max-tokens
are recorded with finish_reason "length" (a censored length).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="benchmarks/results/smollm2_lengths.jsonl")
    ap.add_argument("--per-source", type=int, default=250)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="folder holding prompts/ (default ../shared/data)")
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    args = ap.parse_args()

    import torch
    from tqdm import tqdm

    from disagg.cli import resolve_model
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.llm_engine import LLMEngine
    from disagg.request import SamplingParams
    from router.prompt_sets import iter_prompts

    by_src = defaultdict(list)
    for r in iter_prompts(args.data_dir):
        by_src[r["source"]].append(r)
    rnd = random.Random(args.seed)
    todo = []
    for src in sorted(by_src):
        rs = by_src[src]
        rnd.shuffle(rs)
        todo.extend(rs[:args.per_source])
    rnd.shuffle(todo)      # mix sources so a partial file is still a fair sample
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(json.loads(l)["source"], json.loads(l)["id"]) for l in f if l.strip()}
    todo = [r for r in todo if (r["source"], r["id"]) not in done]
    model_dir, _ = resolve_model(args.model)
    eng = LLMEngine(EngineConfig(model_dir, dtype="float32", cache=CacheConfig(block_size=16, cpu_kv_gib=3.0),
                                 scheduler=SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=args.budget)),
                    detokenize=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    pending = list(todo)
    live = {}
    bar = tqdm(total=len(todo), desc="answering", unit="prompt")
    t0, ntok = time.perf_counter(), 0
    with open(args.out, "a") as f:
        while pending or live:
            while pending and len(live) < args.batch:
                r = pending.pop()
                ids = eng.tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}])
                if len(ids) > args.max_prompt_tokens:
                    bar.update(1)
                    continue
                req = eng.add_request(ids, params)
                live[req.request_id] = (r, req)
            for out in eng.step():
                ntok += len(out.new_token_ids)
                if out.finished:
                    r, req = live.pop(out.request_id)
                    f.write(json.dumps({"source": r["source"], "id": r["id"], "prompt": r["prompt"],
                                        "prompt_tokens": req.num_prompt_tokens,
                                        "response_tokens": req.num_output_tokens,
                                        "finish_reason": req.finish_reason.value}) + "\n")
                    f.flush()
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{ntok / (time.perf_counter() - t0):.0f}")
    bar.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
