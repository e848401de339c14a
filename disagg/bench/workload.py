"""What to send: trace replays with exact token counts, or prompts from a file.

    trace_workload(load_csv(path, limit=300), rate=8.0, vocab_size=128256)  # Azure trace at 8 req/s
    fixed_workload(n, rate, 1020, 129, vocab_size=128256)                   # AIConfigurator's shape
    dataset_workload(load_prompts("question.jsonl"), n, output_len=128, rate=4.0)

A trace carries token counts only, so a replay sends random token ids of the trace's
prompt length to /v1/completions (the server does not re-tokenize a list of ids, so the
length is exact) with max_tokens = the trace's output length and ignore_eos. Arrivals keep
the trace's own timing, scaled to `rate` when one is given, or are drawn afresh (Poisson or
gamma, `burstiness` as vllm bench serve defines it) when `burstiness` is given.
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import random
from dataclasses import replace

from disagg import traces
from disagg.bench.loadgen import BenchRequest
from disagg.traces import TraceRequest


def arrivals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """n arrival times at `rate` per second (math.inf: all at once), gamma gaps of shape `burstiness`."""
    if math.isinf(rate):
        return [0.0] * n
    return [q.arrival_s for q in traces.synthetic(n, rate, burstiness=burstiness, seed=seed)]


def token_prompt(rng: random.Random, n: int, vocab_size: int, first_id: int = 3) -> list[int]:
    """n random token ids in [first_id, vocab_size): no two prompts share a prefix worth caching."""
    return [rng.randrange(first_id, vocab_size) for _ in range(n)]


def trace_workload(reqs: list[TraceRequest], *, rate: float | None = None, burstiness: float | None = None,
                   vocab_size: int = 32000, max_model_len: int | None = None, seed: int = 0) -> list[BenchRequest]:
    """A trace replay: token-id prompts of the trace's lengths at its own (or rescaled / redrawn) timing."""
    if max_model_len:
        reqs = traces.cap_lengths(reqs, max_model_len)
    if burstiness is not None:
        if rate is None:
            rate = traces.mean_rate(reqs)
        times = arrivals(len(reqs), rate, burstiness, seed)
        reqs = [replace(q, arrival_s=t) for q, t in zip(reqs, times)]
    elif rate is not None:
        reqs = [replace(q, arrival_s=0.0) for q in reqs] if math.isinf(rate) else traces.rescale(reqs, rate)
    t0 = reqs[0].arrival_s if reqs else 0.0
    rng = random.Random(seed)
    return [BenchRequest(token_prompt(rng, q.prompt_tokens, vocab_size), q.output_tokens, q.arrival_s - t0,
                         q.prompt_tokens) for q in reqs]


def fixed_workload(n: int, rate: float, prompt_len: int, output_len: int, *, burstiness: float = 1.0,
                   vocab_size: int = 32000, seed: int = 0) -> list[BenchRequest]:
    """n requests of exactly prompt_len / output_len tokens, Poisson (or gamma) arrivals at `rate`."""
    rng = random.Random(seed + 1)
    return [BenchRequest(token_prompt(rng, prompt_len, vocab_size), output_len, t, prompt_len)
            for t in arrivals(n, rate, burstiness, seed)]


def dataset_workload(prompts: list[str], n: int, *, output_len: int, rate: float, burstiness: float = 1.0,
                     seed: int = 0) -> list[BenchRequest]:
    """n text prompts drawn from `prompts` (shuffled, repeated if there are fewer) at `rate`."""
    if not prompts:
        raise ValueError("no prompts to send")
    rng = random.Random(seed)
    order = list(prompts)
    rng.shuffle(order)
    picked = [order[i % len(order)] for i in range(n)]
    return [BenchRequest(p, output_len, t) for p, t in zip(picked, arrivals(n, rate, burstiness, seed))]


# ---------------------------------------------------------------------- prompt files
_TEXT_KEYS = ("prompt", "text", "question", "instruction", "input")


def _first_user_turn(turns) -> str | None:
    for t in turns:
        if isinstance(t, str):
            return t
        if isinstance(t, dict) and t.get("role", t.get("from", "user")) in ("user", "human"):
            v = t.get("content", t.get("value"))
            if isinstance(v, str):
                return v
    return None


def prompt_of(record) -> str | None:
    """The user prompt in one record of the usual prompt-set layouts (ShareGPT, arena-hard,
    IFEval, MT-Bench turns, OASST strings, hh-rlhf dialogues); None if there is none."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    for k in _TEXT_KEYS:
        if isinstance(record.get(k), str):
            return record[k]
    for k in ("turns", "messages", "conversations"):
        if isinstance(record.get(k), list):
            return _first_user_turn(record[k])
    if isinstance(record.get("chosen"), str):              # hh-rlhf: "\n\nHuman: ... \n\nAssistant: ..."
        return record["chosen"].split("Human: ", 1)[-1].split("\n\nAssistant:", 1)[0].strip() or None
    return None


def load_prompts(path: str) -> list[str]:
    """Prompts from a .jsonl (.gz), a .json list, or a .csv with a `prompt` column."""
    opener = gzip.open if path.endswith(".gz") else open
    base = path[:-3] if path.endswith(".gz") else path
    with opener(path, "rt", encoding="utf-8") as f:
        if base.endswith(".csv"):
            records = [r.get("prompt") for r in csv.DictReader(f)]
        elif base.endswith(".json"):
            data = json.load(f)
            records = data if isinstance(data, list) else [data]
        else:
            records = [json.loads(line) for line in f if line.strip()]
    out = [p for p in (prompt_of(r) for r in records) if p and p.strip()]
    if not out:
        raise ValueError(f"{path}: found no prompts (expected JSONL records with a 'prompt', 'text', "
                         f"'turns' or 'messages' field, or plain strings)")
    return out
