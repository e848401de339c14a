"""A stand-in engine for the HTTP front door: same interface as AsyncEngine, no model.

    eng = FakeEngine(tokens_per_request=8, token_delay_s=0.0)
    eng.start()                       # inside the server's event loop, like AsyncEngine
    async for out in eng.generate(prompt_ids, params, request_id): ...

Each request yields min(tokens_per_request, params.max_tokens) outputs of one token each,
either back to back (delay 0: the generator never awaits) or `token_delay_s` apart. Token
ids cycle through [first_id, vocab_size) and their text is " t{id}", what the word-level
test tokenizer (`t3`..`tN`, see `write_word_tokenizer`) decodes them to. Logprobs are made
up but well formed when asked for.

Used by tests (routes where the model does not matter) and by benchmarks/bench_frontdoor.py
(the front door's own overhead). Nothing here imports torch or the engine: the one engine
import (EngineDeadError, for the "engine is dead" path) happens only on that path.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import AsyncIterator

from disagg.request import FinishReason, RequestOutput, SamplingParams


@dataclass
class FakeStats:
    """Same fields as disagg.engine.async_engine.EngineStats (what /metrics reads)."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int


class FakeEngine:
    def __init__(self, tokens_per_request: int = 8, token_delay_s: float = 0.0, vocab_size: int = 384,
                 first_id: int = 3, num_blocks: int = 1024, finish_reason: FinishReason = FinishReason.STOP):
        if tokens_per_request < 1:
            raise ValueError("tokens_per_request must be at least 1")
        if not 0 <= first_id < vocab_size:
            raise ValueError("first_id must lie in [0, vocab_size)")
        self.tokens_per_request = tokens_per_request
        self.token_delay_s = token_delay_s
        self.vocab_size = vocab_size
        self.first_id = first_id
        self.finish_reason = finish_reason       # when the request ends before max_tokens
        self.error: str | None = None
        self._started = False
        self.stats = FakeStats(0, 0, 0.0, num_blocks)
        # counters for tests: what happened to the requests
        self.running: set[str] = set()
        self.num_requests = 0
        self.num_finished = 0
        self.num_aborted = 0
        self.engine_seconds = 0.0                # summed time inside generate() (first call to last yield)

    # ------------------------------------------------------------------ AsyncEngine interface
    @property
    def healthy(self) -> bool:
        return self.error is None and self._started

    def start(self) -> None:
        self._started = True

    def stop(self, timeout: float = 10.0) -> None:
        self._started = False

    def abort(self, request_id: str) -> None:     # AsyncEngine has it; cancellation does the work here
        pass

    def fail(self, message: str = "engine failed: simulated") -> None:
        """Turn unhealthy, as AsyncEngine does after a fatal step error."""
        self.error = message

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       predicted_len: float | None = None) -> AsyncIterator[RequestOutput]:
        """predicted_len (the router's length prediction) is accepted and ignored."""
        if not self.healthy:
            from disagg.engine.async_engine import EngineDeadError   # error path only
            raise EngineDeadError(self.error or "engine is not running")
        t0 = time.perf_counter()
        n = min(self.tokens_per_request, params.max_tokens)
        reason = FinishReason.LENGTH if n == params.max_tokens else self.finish_reason
        span = self.vocab_size - self.first_id
        base = len(prompt_ids)
        self.num_requests += 1
        self.running.add(request_id)
        self.stats.num_running = len(self.running)
        done = False
        try:
            for i in range(n):
                if self.token_delay_s > 0:
                    await asyncio.sleep(self.token_delay_s)
                tid = self.first_id + (base + i) % span
                last = i == n - 1
                lps = []
                if params.logprobs is not None:
                    k = min(params.logprobs, span)
                    alts = [(self.first_id + (base + i + j) % span, -0.25 * (j + 1)) for j in range(k)]
                    lps = [(-0.25, alts)]
                done = last
                yield RequestOutput(request_id, [tid], reason if last else None, len(prompt_ids), i + 1, lps,
                                    new_text=f" t{tid}")
        finally:
            self.running.discard(request_id)
            self.stats.num_running = len(self.running)
            if done:
                self.num_finished += 1
            else:
                self.num_aborted += 1
            self.engine_seconds += time.perf_counter() - t0


def write_word_tokenizer(path: str, vocab: int = 384) -> str:
    """Write tokenizer.json + tokenizer_config.json for a word-level tokenizer over 't3'..'t{vocab-1}'
    (ids 0, 1, 2: <s>, </s>, <unk>) with a plain chat template: what tests/conftest.py's
    write_tiny_tokenizer writes, for callers outside the test tree (benchmarks). Returns `path`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    v = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for i in range(3, vocab):
        v[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=v, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>",
                   "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                                    "{% if add_generation_prompt %}assistant: {% endif %}"}, f)
    return path
