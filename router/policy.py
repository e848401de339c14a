"""Ordering and dispatch policy: pure functions over plain data, with the clock injected.

Nothing here does I/O or reads a clock: every time-dependent function takes `now`
(seconds, any monotonic origin, the same origin as the items' `arrival`). The
router, the decode scheduler and the simulator run the very same code.

    ordering   which queued request goes next      OrderingPolicy: FCFS, ShortestPredictedFirst
    dispatch   which workers take it               decode_preference, pick_prefill,
                                                   should_prefill_locally (all three weigh
                                                   the prefix each worker holds, if told:
                                                   router/prefix_index.py)
    reserve    how much decode KV it is promised   reserved_blocks

Units: lengths in tokens, KV in blocks, times in seconds.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from disagg.messages import WorkerLoad


# ====================================================================== ordering
@dataclass(frozen=True)
class QueueItem:
    """What ordering needs to know about a queued request."""
    request_id: str
    arrival: float           # when it joined the queue (same clock as `now`)
    prompt_tokens: int
    predicted_len: float     # predicted response length, tokens

    def __post_init__(self):
        if self.prompt_tokens < 0 or not self.predicted_len >= 0:
            raise ValueError(f"{self.request_id}: prompt_tokens and predicted_len must be >= 0")


class OrderingPolicy(ABC):
    """Which queued request goes next. Subclasses define `priority`: smaller goes first.

    Keys must be totally ordered across the items of one queue at one `now`; ties are
    broken by queue position (stable), so equal keys keep queue order.
    """
    name: str = ""

    @abstractmethod
    def priority(self, item: QueueItem, now: float) -> tuple: ...

    def order(self, queue: Sequence[QueueItem], now: float) -> list[int]:
        """Indices into `queue`, first to go first."""
        keys = [self.priority(it, now) for it in queue]
        return sorted(range(len(queue)), key=lambda i: (keys[i], i))

    def pick(self, queue: Sequence[QueueItem], now: float) -> int:
        """Index of the item to go next."""
        if not queue:
            raise ValueError("pick from an empty queue")
        return min(range(len(queue)), key=lambda i: (self.priority(queue[i], now), i))


class FCFS(OrderingPolicy):
    """First come, first served: by arrival time (ties: queue position)."""
    name = "fcfs"

    def priority(self, item: QueueItem, now: float) -> tuple:
        return (item.arrival,)


class ShortestPredictedFirst(OrderingPolicy):
    """Shortest predicted response first, with aging and a hard waiting bound.

    Let w = now - arrival. An item is *overdue* when w >= max_wait_s. Keys:

        overdue:      (0, arrival)                              FCFS among overdue items
        not overdue:  (1, predicted_len - aging_rate * w, arrival)

    so every overdue item goes before every item that is not, and among the rest a
    short prediction goes first, each second of waiting worth `aging_rate` tokens of
    predicted length. Since `- aging_rate * w = aging_rate * arrival - aging_rate * now`,
    the relative order of two non-overdue items never changes with time: an item of
    length L passes a newer one of length L' < L only if it arrived (L - L') / aging_rate
    seconds earlier. Aging is the soft part; the bound is the guarantee:

    Guarantee (no starvation). Once request R has waited max_wait_s, no request that
    arrived after R is picked before it; the only ones still picked ahead of R are
    those that arrived before R and are still queued at arrival(R) + max_wait_s
    (finitely many, picked in arrival order). So R waits at most max_wait_s plus the
    time the consumer takes to take those earlier requests, i.e. at most max_wait_s
    longer than it could have under FCFS. This bounds *order*: it holds as long as
    the consumer takes picks strictly in this order (head-of-line blocking, no
    skipping a pick that does not fit, which decode.scheduler does) and keeps
    consuming; it cannot create capacity.

    aging_rate (tokens/s) and max_wait_s are starting points, to be tuned in the
    simulator against the predictor's error and the SLOs; aging_rate = 0 is plain
    SPF with the bound, max_wait_s = inf removes the bound (starvation possible).
    """
    name = "spf"

    def __init__(self, aging_rate: float = 20.0, max_wait_s: float = 10.0):
        if not aging_rate >= 0:
            raise ValueError("aging_rate must be >= 0 (tokens per second of waiting)")
        if not max_wait_s > 0:
            raise ValueError("max_wait_s must be > 0 (math.inf: no bound)")
        self.aging_rate = aging_rate
        self.max_wait_s = max_wait_s

    def priority(self, item: QueueItem, now: float) -> tuple:
        wait = now - item.arrival
        if wait >= self.max_wait_s:
            return (0, item.arrival, 0.0)
        return (1, item.predicted_len - self.aging_rate * wait, item.arrival)


ORDERINGS: dict[str, type[OrderingPolicy]] = {"fcfs": FCFS, "spf": ShortestPredictedFirst}


def make_ordering(name: str, **kwargs: Any) -> OrderingPolicy:
    """An ordering policy by registry name ('fcfs', 'spf'); kwargs go to its constructor."""
    cls = ORDERINGS.get(name)
    if cls is None:
        raise ValueError(f"unknown ordering policy {name!r}; choose one of {', '.join(sorted(ORDERINGS))}")
    return cls(**kwargs)


# ====================================================================== reservation
def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def reserved_blocks(prompt_tokens: int, predicted_len: float, generated: int, block_size: int,
                    slack: float = 0.25, max_tokens: int | None = None) -> int:
    """Decode KV blocks to hold for a request: its prompt plus the output it is expected to reach.

        generated <  predicted:  prompt + max(ceil(predicted_len), 1)           (the prediction)
        generated >= predicted:  prompt + generated + max(1, ceil(slack * generated))
                                                          (outlived it: grow geometrically)
        either way capped at prompt + max_tokens when given (it can never need more),
        and never below prompt + generated (what it already holds).

    The result is non-decreasing in `generated` (at generated == predicted the margin
    rule takes over from a value >= the prediction), so a reservation never shrinks
    while the request lives. Growing by a fraction of what was generated (not by a
    constant) bounds the re-reservations of one request to
    O(log(actual / predicted) / log(1 + slack)), as for a growing array.
    """
    if block_size < 1:
        raise ValueError("block_size must be positive")
    if prompt_tokens < 0 or generated < 0 or not predicted_len >= 0 or slack < 0:
        raise ValueError("prompt_tokens, predicted_len, generated and slack must be >= 0")
    predicted = max(math.ceil(predicted_len), 1)
    if generated < predicted:
        out = predicted
    else:
        out = generated + max(1, math.ceil(slack * generated))
    if max_tokens is not None:
        out = min(out, max_tokens)
    out = max(out, generated)
    return blocks_for(prompt_tokens + out, block_size)


# ====================================================================== dispatch
def decode_preference(loads: list[WorkerLoad], need_blocks: int = 0, *, prompt_tokens: int = 0,
                      predicted_len: float | None = None, block_size: int | None = None,
                      committed: Mapping[int, int] | None = None,
                      cached_blocks: Mapping[int, int] | None = None) -> list[int]:
    """Decode ranks that can take the request now, most free KV after the reservation first.

    The request needs `need_blocks`, or, when `predicted_len` is given, at least
    reserved_blocks(prompt_tokens, predicted_len, 0, block_size): room for the prompt and
    the *predicted* output, not just the first token. `committed[rank]` (default 0) is KV
    already promised on that rank beyond what its requests hold (their reservations not
    yet grown into; a router-side ledger). A rank qualifies when

        free_blocks - committed[rank] >= need

    and qualifying ranks come by most headroom left after this reservation (ties: lower rank).

    `cached_blocks[rank]` (default 0): blocks of this prompt the rank already holds (its prefix
    cache). They need no transfer and, while another request uses them, no new memory, so in the
    ranking they count as headroom: a conversation goes back to the worker holding its history
    unless another worker has more room than that by more than the history's size. (They do not
    make a rank qualify: evictable blocks are already counted in free_blocks.)
    """
    need = need_blocks
    if predicted_len is not None:
        if block_size is None:
            raise ValueError("block_size is needed to reserve a predicted length")
        need = max(need, reserved_blocks(prompt_tokens, predicted_len, 0, block_size))
    committed, cached = committed or {}, cached_blocks or {}
    left = {w.rank: w.free_blocks - committed.get(w.rank, 0) - need for w in loads}
    ok = [w for w in loads if left[w.rank] >= 0]
    return [w.rank for w in sorted(ok, key=lambda w: (-(left[w.rank] + cached.get(w.rank, 0)), w.rank))]


def pick_prefill(loads: list[WorkerLoad], prompt_tokens: int = 0,
                 cached_tokens: Mapping[int, int] | None = None) -> int:
    """The prefill rank that would finish this prompt first (ties: fewer requests, lower rank).

    Work ahead of the prompt's first token on rank p, in tokens:

        queued_prompt_tokens(p) + prompt_tokens - cached_tokens[p]

    where cached_tokens[p] (default 0) is the prefix of this prompt that p holds in its prefix
    cache. So cache overlap and load are weighed in one unit: a worker holding a 1,000-token
    system prompt wins unless its queue is more than 1,000 tokens longer. Without cached_tokens
    this is the least-loaded pick (fewest queued prompt tokens).
    """
    if not loads:
        raise ValueError("no prefill worker")
    cached = cached_tokens or {}
    return min(loads, key=lambda w: (w.queued_prompt_tokens + prompt_tokens - cached.get(w.rank, 0),
                                     w.num_running + w.num_waiting, w.rank)).rank


def should_prefill_locally(prompt_tokens: int, decode_load: WorkerLoad, prefill_loads: list[WorkerLoad],
                           transfer_cost_per_token_s: float, prefill_cost_per_token_s: float,
                           threshold_tokens: int, *, decode_cached_tokens: int = 0,
                           prefill_cached_tokens: Mapping[int, int] | None = None) -> bool:
    """Conditional disaggregation: prefill on the chosen decode worker instead of the prefill pool?

    Estimated time to first token, linear in tokens (c = prefill_cost_per_token_s,
    x = transfer_cost_per_token_s, P = prompt_tokens, same GPUs on both sides):

        remote = min_p queued_prompt_tokens(p) * c     wait behind the least-loaded prefill queue
                 + P * c + P * x                       compute, then move the KV
        local  = (queued_prompt_tokens(decode) + P) * c     local prefills already queued there, then this one
                 + stall

    stall is what a local prefill costs the requests already decoding there. A decode
    step is memory-bound (it reads all the weights for a handful of tokens), so up to
    `threshold_tokens` prefill tokens ride along in decode steps almost free: stall = 0
    for P <= threshold_tokens. Beyond that the steps turn compute-bound and every
    running request waits for the excess: stall = num_running(decode) * (P - threshold) * c.

    Local wins only when strictly cheaper (ties stay disaggregated). So a short prompt
    goes local whenever moving its KV costs more than the decode worker's local queue,
    and a long prompt goes local only when the prefill pool is backed up by more than
    the transfer saves plus the stall it imposes. With no prefill worker, always local.
    The linear cost ignores attention's quadratic term; it is a dispatch estimate.

    With prefix caching only uncached tokens count: D = decode_cached_tokens (the prefix the
    decode worker holds: neither computed there nor transferred), C_p = prefill_cached_tokens[p]:

        remote = min_p (queued(p) + P - C_p) * c  +  (P - D) * x
        local  = (queued(decode) + P - D) * c  +  num_running(decode) * max(0, P - D - threshold) * c

    so the next turn of a conversation whose history the decode worker kept is cheap to prefill
    there (only the new message), even when the message is long.
    """
    if not prefill_loads:
        return True
    c, x, p = prefill_cost_per_token_s, transfer_cost_per_token_s, prompt_tokens
    cached = prefill_cached_tokens or {}
    d = min(max(decode_cached_tokens, 0), p)
    remote = min(w.queued_prompt_tokens + p - min(cached.get(w.rank, 0), p) for w in prefill_loads) * c \
        + (p - d) * x
    stall = decode_load.num_running * max(0, p - d - threshold_tokens) * c
    local = (decode_load.queued_prompt_tokens + p - d) * c + stall
    return local < remote
