"""Continuous-batching scheduler with chunked prefill: policy over plain data.

Lifecycle of a request in this scheduler (colocated engine and decode worker):

    WAITING ──admit (blocks + budget)──▶ RUNNING ──eos / stop / max_tokens──▶ FINISHED
       ▲                                   │
       └──── preempted (blocks freed, ─────┘
             recomputed from scratch; youngest first)

Every step has a token budget (`max_num_batched_tokens`). Running requests go first,
in admission order: a decoding request takes 1 token, a request still in prefill takes
the next chunk of its prompt. Then waiting requests are admitted, FCFS, while the
budget, `max_num_seqs` and free blocks allow. The scheduler thinks in tokens; the
block manager answers in block ids; the model runner sees only the output dataclass.

Prefix caching (when the block manager has it on). A request admitted with nothing computed
first looks up the longest cached prefix of its tokens, in full blocks and never the whole
of them (at least one token must run to sample from): those blocks head its table and
`num_computed_tokens` starts after them, so only the uncached suffix is computed. After each
step the full blocks a request has computed are keyed (`update`), and they stay cached when
it finishes, is aborted or preempted (a preempted request usually finds its own blocks
again). Keys are per request, computed once per block (decode/prefix_cache.py), salted by
`params.cache_salt`.

Admission order. Preempted requests go first, in queue order (they already waited and
hold output). The rest go in queue order (FCFS: `add` order) by default, or in the order
of an `OrderingPolicy` (router.policy, e.g. shortest-predicted-first with aging), asked
once per step with `now = clock()` over `QueueItem(request_id, arrival_time,
num_prompt_tokens, predicted_len(request))`. Admission is strict in that order: when the
next request does not fit, nobody behind it is admitted (no skipping, so the policy's
no-starvation bound holds).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from decode.block_manager import BlockManager
from decode.prefix_cache import PrefixCacheStats, block_hashes
from disagg.config import SchedulerConfig
from disagg.request import FinishReason, Request
from router.policy import OrderingPolicy, QueueItem


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int            # tokens computed for it in this step
    block_table: list[int]     # the request's blocks after allocation
    start: int | None = None   # num_computed_tokens when scheduled (snapshot: plain data after update())
    samples: bool = False      # does this step reach the end of the known tokens (so it samples one)?

    def __post_init__(self):
        if self.start is None:
            self.start = self.request.num_computed_tokens
            self.samples = self.start + self.num_tokens == self.request.num_tokens

    @property
    def is_decode(self) -> bool:
        """One new token over a cached prefix: served by the paged decode kernel."""
        return self.num_tokens == 1


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)   # decodes first, then prefill chunks
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_decode(self) -> int:
        return sum(1 for s in self.scheduled if s.is_decode)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


def _max_tokens(req: Request) -> float:
    return float(req.params.max_tokens)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager, max_model_len: int,
                 ordering: OrderingPolicy | None = None, clock: Callable[[], float] = time.monotonic,
                 predicted_len: Callable[[Request], float] = _max_tokens):
        """ordering: None keeps queue order (FCFS, as requests were added). Otherwise the policy
        orders the waiting requests that were never preempted, at `now = clock()` (the clock of
        `Request.arrival_time`: time.monotonic, or a simulator's). predicted_len(request) gives
        its predicted response length in tokens (default: its max_tokens, an upper bound); for
        a table of predictions pass e.g. `lambda r: table.get(r.request_id, r.params.max_tokens)`."""
        self.cfg = cfg
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.ordering = ordering
        self.clock = clock
        self.predicted_len = predicted_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.block_hashes: dict[str, list[bytes]] = {}    # request id -> keys of its full blocks so far
        self.prefix_stats = PrefixCacheStats()

    # ------------------------------------------------------------------ queues
    def add(self, req: Request) -> None:
        if req.num_prompt_tokens == 0:
            raise ValueError("empty prompt")
        if req.num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"prompt of {req.num_prompt_tokens} tokens does not fit the "
                             f"maximum context length of {self.max_model_len} tokens")
        if self.bm.blocks_for(req.num_prompt_tokens + 1) > self.bm.num_blocks:
            raise ValueError(f"prompt of {req.num_prompt_tokens} tokens does not fit the KV cache "
                             f"({self.bm.num_blocks} blocks of {self.bm.block_size})")
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is and free its blocks."""
        for i, r in enumerate(self.running):
            if r.request_id == request_id:
                del self.running[i]
                return self._finish(r, FinishReason.ABORT)
        for r in self.waiting:
            if r.request_id == request_id:
                self.waiting.remove(r)
                return self._finish(r, FinishReason.ABORT)
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while self.bm.allocate_slots(req.request_id, req.num_computed_tokens + n) is None:
                victim = self.running[-1]   # youngest admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n, list(self.bm.block_table(req.request_id))))
                scheduled_ids.add(req.request_id)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: it was the youngest, nothing left behind it

        # Admit waiting requests only when nothing was preempted this step (no thrash).
        room = self.cfg.max_num_seqs - len(self.running)
        for req in (self._admission_order(room) if not out.preempted and room > 0 else []):
            if budget <= 0:
                break
            cached = self._cached_prefix(req)
            start = req.num_computed_tokens if cached is None else len(cached) * self.bm.block_size
            n = min(req.num_tokens - start, budget)
            if self.bm.allocate_slots(req.request_id, start + n, cached or ()) is None:
                break
            if cached is not None:
                self.prefix_stats.record(req.num_tokens, start)
            req.num_computed_tokens = start
            if self.waiting[0] is req:
                self.waiting.popleft()
            else:
                self.waiting.remove(req)
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, list(self.bm.block_table(req.request_id))))
            budget -= n
        out.scheduled.sort(key=lambda s: not s.is_decode)  # stable: decodes first
        return out

    def _admission_order(self, room: int) -> list[Request]:
        """The first `room` waiting requests in admission order (see the module docstring)."""
        if self.ordering is None:
            return list(itertools.islice(self.waiting, room))
        preempted = [r for r in self.waiting if r.num_preemptions > 0]
        if len(preempted) >= room:
            return preempted[:room]
        fresh = [r for r in self.waiting if r.num_preemptions == 0]
        now = self.clock()
        items = [QueueItem(r.request_id, r.arrival_time, r.num_prompt_tokens, float(self.predicted_len(r)))
                 for r in fresh]
        return preempted + [fresh[i] for i in self.ordering.order(items, now)][:room - len(preempted)]

    # ------------------------------------------------------------------ prefix cache
    def _keys(self, req: Request, num_blocks: int) -> list[bytes]:
        """Keys of the request's first `num_blocks` full blocks (each block hashed once)."""
        known = self.block_hashes.get(req.request_id, [])
        if len(known) < num_blocks:
            end = num_blocks * self.bm.block_size
            toks = req.prompt_token_ids if end <= req.num_prompt_tokens else req.all_token_ids
            known = self.block_hashes[req.request_id] = block_hashes(
                toks, self.bm.block_size, req.params.cache_salt, known=known, limit=num_blocks)
        return known if len(known) == num_blocks else known[:num_blocks]

    def _cached_prefix(self, req: Request) -> list[int] | None:
        """Cached blocks that can head a request that holds nothing yet (None: no lookup, because the
        cache is off or the request already holds blocks: a decode worker's transferred request)."""
        if not self.bm.enable_prefix_caching or req.num_computed_tokens or self.bm.has(req.request_id):
            return None
        return self.bm.lookup(self._keys(req, (req.num_tokens - 1) // self.bm.block_size))

    def _cache_computed(self, req: Request) -> None:
        """Key the full blocks whose KV this request has computed (cheap unless a block just filled)."""
        full = req.num_computed_tokens // self.bm.block_size
        if full:
            self.bm.cache_blocks(req.request_id, self._keys(req, full))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.bm.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance counters after the step ran; append sampled tokens; return newly finished requests."""
        finished = []
        for s in out.scheduled:
            req = s.request
            if req.finished:        # aborted while the step ran
                continue
            req.num_computed_tokens += s.num_tokens
            if self.bm.enable_prefix_caching:
                self._cache_computed(req)
            tok = sampled.get(req.request_id)
            if tok is None:
                continue
            req.output_token_ids.append(tok)
            reason = self.stop_reason(req)
            if reason is not None:
                self.running.remove(req)
                finished.append(self._finish(req, reason))
        return finished

    def stop_reason(self, req: Request) -> FinishReason | None:
        p = req.params
        tok = req.output_token_ids[-1]
        if not p.ignore_eos and tok in req.eos_token_ids:
            return FinishReason.STOP
        if tok in p.stop_token_ids:
            return FinishReason.STOP
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        if self.bm.blocks_for(req.num_tokens) > self.bm.num_blocks:
            return FinishReason.LENGTH   # could never fit the cache, even alone
        return None

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """End a running request from outside (a stop string matched)."""
        for r in self.running:
            if r.request_id == request_id:
                self.running.remove(r)
                return self._finish(r, reason)
        return None

    def _finish(self, req: Request, reason: FinishReason) -> Request:
        req.finish_reason = reason
        self.bm.free(req.request_id)            # its keyed blocks stay cached (evictable)
        self.block_hashes.pop(req.request_id, None)
        return req
