"""The Request type: state is counters, not modes.

    all_token_ids = prompt_token_ids + output_token_ids
    num_computed_tokens: how many of all_token_ids have KV in the cache.

A request needs `num_tokens - num_computed_tokens` more tokens of forward pass; when
a step brings num_computed_tokens up to num_tokens, that step samples a new token.
Prefill vs decode is not a mode: a request "is decoding" when one token is left.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "stop"          # eos or a stop string
    LENGTH = "length"      # max_tokens or the model's context
    ABORT = "abort"        # cancelled by the client or the server
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0: no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None          # top-n logprobs to return per token (None: none)
    # Not a sampling knob: the tenant's prefix-cache salt (requests with different salts never share
    # cached KV). It rides here so it reaches every worker inside the params already sent.
    cache_salt: str | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise ValueError("cache_salt must be a non-empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)  # per token: (logprob, [(id, logprob), ...]) when asked
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    output_text: str = ""               # filled by the detokenizer when stop strings are set

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]


@dataclass
class RequestOutput:
    """What one engine step reports for one request: the tokens it gained."""
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    new_logprobs: list = field(default_factory=list)
    new_text: str = ""
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
