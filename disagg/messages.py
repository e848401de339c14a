"""Control messages between router, prefill and decode workers: small, typed, msgpack.

Every message is a frozen dataclass; `encode` writes `[type tag, field dict]` and
`decode` checks the tag against the registry and the fields against the dataclass, so
a peer can only ever build one of these types from bytes (nothing is unpickled). KV
tensors never travel here: they go through kvtransfer.

Flow of one request in disaggregated mode:

    router ──Reserve──▶ decode d        (d allocates blocks for prompt + 1, or refuses; it keeps a ledger
                                         of the predicted length, reported as WorkerLoad.committed_blocks)
    router ──PrefillRequest(dest=d)──▶ prefill p
    prefill p ──TransferPlan──▶ decode d   (before the batch's forward: which requests, how many tokens)
    prefill p ═══ KV, one message per layer per destination (torch.distributed) ═══▶ decode d
    prefill p ──PlanDone(first tokens)──▶ decode d ; ──TokenOutput(first token)──▶ router
    decode d ──TokenOutput(tokens...)──▶ router ... until finished

Conditional disaggregation (a short prompt, when a transfer costs more than computing it
where it will be decoded): router ──PrefillRequest(dest=d)──▶ decode d itself, which
prefills it in its own batches and streams every token, the first included.

Prefix caching. Reserve carries the prompt; d reuses the longest cached prefix it holds (full
blocks, never the whole prompt) and answers ReserveReply.num_cached_tokens = D. The router
passes D on as PrefillRequest.num_dest_cached_tokens; p computes the prompt over its own cache
and sends only positions D..P-1 (TransferPlan.start_tokens = D, num_tokens = P - D). D comes
from d alone, so the blocks the KV lands in are exactly d's unshared ones. Every new field has
a default that means "no cache" (D = 0), so old and new peers interoperate.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack

from disagg.request import SamplingParams


def params_to_dict(p: SamplingParams) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["stop"] = list(p.stop)
    d["stop_token_ids"] = list(p.stop_token_ids)
    return d


def params_from_dict(d: dict[str, Any]) -> SamplingParams:
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    kw = {k: v for k, v in d.items() if k in names}
    kw["stop"] = tuple(kw.get("stop", ()))
    kw["stop_token_ids"] = tuple(kw.get("stop_token_ids", ()))
    return SamplingParams(**kw)


@dataclass(frozen=True)
class Handshake:
    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    codec: str
    protocol: int = 1


@dataclass(frozen=True)
class Reserve:
    request_id: str
    num_prompt_tokens: int
    predicted_len: float = 0.0     # the router's predicted response length (0: none); sizes the ledger
    max_tokens: int = 0            # the request's output cap (0: unknown)
    prompt_token_ids: list[int] = field(default_factory=list)   # given: reuse a cached prefix of them
    cache_salt: str | None = None  # the request's prefix-cache salt (SamplingParams.cache_salt)


@dataclass(frozen=True)
class ReserveReply:
    request_id: str
    ok: bool
    free_blocks: int
    num_cached_tokens: int = 0     # leading prompt tokens whose KV the decode worker already holds


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    dest_rank: int                 # decode worker's rank in the KV group
    predicted_len: float = 0.0     # the router's predicted response length (0: none)
    num_dest_cached_tokens: int = 0   # leading prompt tokens the decode worker holds (ReserveReply): not sent


@dataclass(frozen=True)
class TransferPlan:
    src_rank: int
    plan_id: int                   # per (src, dst) pair, consecutive: the order of the KV messages
    request_ids: list[str]
    num_tokens: list[int]          # prompt tokens sent for each request, in payload order
    codec: str
    start_tokens: list[int] = field(default_factory=list)   # first position sent per request (empty: all 0)
    epoch: int = 0                 # the sender process's epoch (disagg/deploy/recovery.py): stale if older


@dataclass(frozen=True)
class PlanDone:
    src_rank: int
    plan_id: int
    first_tokens: list[int]        # one per request of the plan, in the same order
    params: list[dict[str, Any]] = field(default_factory=list)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    epoch: int = 0


@dataclass(frozen=True)
class TokenOutput:
    request_id: str
    new_token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    new_logprobs: list = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class WorkerLoad:
    rank: int
    role: str                      # "prefill" | "decode"
    num_running: int
    num_waiting: int
    queued_prompt_tokens: int
    free_blocks: int
    total_blocks: int
    committed_blocks: int = 0      # decode: KV promised to its requests beyond what they hold (the ledger)
    prefill_s_per_token: float = 0.0   # measured prefill cost (moving average; 0: not measured yet)
    prefix_cache_queries: int = 0  # tokens looked up in this worker's prefix cache (cumulative)
    prefix_cache_hits: int = 0     # of which found there: not computed (prefill) or not transferred (decode)
    num_prompts_done: int = 0      # prefill: first tokens emitted so far (monotonic; the router spots stale reports)


@dataclass(frozen=True)
class RingStep:
    """Prefill leader -> each of its context-parallel helpers: prefill this prompt together, now
    (prefill/ring_worker.py). Helpers run steps in step_id order (consecutive per leader)."""
    step_id: int
    prompt_token_ids: list[int]


@dataclass(frozen=True)
class TPStep:
    """A tensor-parallel worker's leader -> its followers, broadcast over the worker group before every
    collective the group runs (disagg/engine/tp_group.py). Plain lists of ints only."""
    kind: str                      # "exec" (a model step) | "sync" (KV landing) | "idle" (heartbeat) | "stop"
    items: list = field(default_factory=list)   # exec: [start, num_tokens, block_table, token_ids] per request
    sends: list = field(default_factory=list)   # exec, prefill: [dest worker, slots] per TransferPlan
    posts: list = field(default_factory=list)   # sync, decode: [src worker, plan_id, num_tokens, slots] per plan


_TYPES = {c.__name__: c for c in (Handshake, Reserve, ReserveReply, PrefillRequest, TransferPlan, PlanDone,
                                  TokenOutput, WorkerLoad, RingStep, TPStep)}


def encode(msg) -> bytes:
    name = type(msg).__name__
    if name not in _TYPES:
        raise TypeError(f"{name} is not a control message")
    return msgpack.packb([name, {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}],
                         use_bin_type=True)


def decode(data: bytes, expect: type | None = None):
    try:
        name, fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - any malformed input is one error
        raise ValueError(f"malformed control message: {e}") from None
    cls = _TYPES.get(name) if isinstance(name, str) else None
    if cls is None or not isinstance(fields, dict):
        raise ValueError(f"unknown control message type {name!r}")
    if expect is not None and cls is not expect:
        raise ValueError(f"expected {expect.__name__}, got {name}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not required <= fields.keys() or not fields.keys() <= names:
        raise ValueError(f"{name}: fields {sorted(fields)} do not match {sorted(names)}")
    return cls(**fields)


def encode_many(msgs: list) -> bytes:
    return msgpack.packb([encode(m) for m in msgs], use_bin_type=True)


def decode_many(data: bytes, expect: type | None = None) -> list:
    items = msgpack.unpackb(data, raw=False)
    if not isinstance(items, list):
        raise ValueError("malformed message batch")
    return [decode(b, expect) for b in items]


class Outbox:
    """Messages a worker's engine thread produces for the router's long poll (thread-safe)."""

    def __init__(self):
        self._items: list = []
        self._cond = threading.Condition()

    def put(self, items: list) -> None:
        if items:
            with self._cond:
                self._items.extend(items)
                self._cond.notify_all()

    def take(self, timeout: float) -> list:
        """Everything queued, waiting up to `timeout` seconds for something to arrive."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            out, self._items = self._items, []
        return out
