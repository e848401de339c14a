"""Readers for the prompt sets in ../shared/data (single-turn user prompts with their source).

Used to collect the served model's own response lengths (the length predictor's training
data) and by benchmarks. Each record: {"source", "id", "prompt"}.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
from typing import Iterator


def default_data_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(here), "shared", "data")


def _jsonl(path: str) -> Iterator[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield json.loads(line)


def iter_prompts(data_dir: str | None = None) -> Iterator[dict]:
    d = os.path.join(data_dir or default_data_dir(), "prompts")
    for ver in ("v0.1", "v2.0"):
        for r in _jsonl(os.path.join(d, "arena-hard", ver, "question.jsonl")):
            p = r.get("prompt")
            if p is None and r.get("turns"):
                p = r["turns"][0]["content"] if isinstance(r["turns"][0], dict) else r["turns"][0]
            if isinstance(p, str):
                yield {"source": f"arena-hard-{ver}", "id": str(r.get("uid", r.get("question_id"))), "prompt": p}
    for i, r in enumerate(_jsonl(os.path.join(d, "ifeval", "input_data.jsonl"))):
        yield {"source": "ifeval", "id": str(r.get("key", i)), "prompt": r["prompt"]}
    for name in ("en_100_text.jsonl", "prompt_lottery_en_250_text.jsonl"):
        for i, r in enumerate(_jsonl(os.path.join(d, "oasst", name))):
            yield {"source": "oasst", "id": f"{name}:{i}", "prompt": r if isinstance(r, str) else r.get("text", "")}
    for r in _jsonl(os.path.join(d, "mt-bench", "question.jsonl")):
        yield {"source": "mt-bench", "id": str(r["question_id"]), "prompt": r["turns"][0]}
    with open(os.path.join(d, "xstest", "xstest_prompts.csv"), newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            yield {"source": "xstest", "id": r["id"], "prompt": r["prompt"]}
    for i, r in enumerate(_jsonl(os.path.join(d, "hh-rlhf", "harmless-base_test.jsonl.gz"))):
        text = r["chosen"]
        first = text.split("\n\nHuman: ", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
        if first:
            yield {"source": "hh-rlhf", "id": str(i), "prompt": first}
