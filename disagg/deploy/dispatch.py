"""The cluster router's dispatcher: which request goes next, and to which workers.

State it keeps (router side, no Ray here): the workers' last reported `WorkerLoad`
(corrected for what was sent since), which ranks are dead, and the requests waiting for
decode KV. Decisions come from router.policy's pure functions:

    acquire(request)   waits, in the ordering policy's order over every waiting request,
                       until a live decode worker has room; then conditional
                       disaggregation decides where the prompt is computed:
        ─▶ (d, local=True)    PrefillRequest goes to decode worker d itself
        ─▶ (d, local=False)   Reserve on d succeeded; the caller picks a prefill worker

Cache-aware routing (when `prefix` is a router.prefix_index.PrefixIndex): the prompt's block
keys, matched against the mirror of what each worker holds, weigh in every decision: the
decode pick ranks held blocks as headroom, conditional disaggregation counts only uncached
tokens, the prefill pick weighs cached tokens against queued tokens. Reserve always carries
the prompt (when given); the decode worker's real hit comes back in `dest_cached[rid]`.

Deadlines: a request waits at most `reserve_timeout_s` here (then 503 with Retry-After);
a prompt no decode worker could ever hold is a 400 at once; with no live decode worker
it is a 503 at once.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from disagg.messages import Reserve, ReserveReply, WorkerLoad
from router.openai_api import APIError
from router.prefix_index import PrefixIndex
from router.policy import (OrderingPolicy, QueueItem, blocks_for, decode_preference, pick_prefill, reserved_blocks,
                           should_prefill_locally)

ReserveFn = Callable[[int, Reserve], Awaitable[ReserveReply]]


class Dispatcher:
    def __init__(self, prefill_ranks: list[int], decode_ranks: list[int], ordering: OrderingPolicy, *,
                 block_size: int, kv_bytes_per_token: float, default_prefill_s_per_token: float,
                 local_prefill: str = "auto", local_prefill_threshold: int = 256, reserve_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.prefill_ranks, self.decode_ranks = list(prefill_ranks), list(decode_ranks)
        self.ordering = ordering
        self.block_size = block_size
        self.kv_bytes_per_token = kv_bytes_per_token        # on the wire, after the codec
        self.default_c = default_prefill_s_per_token
        self.local_prefill, self.threshold = local_prefill, local_prefill_threshold
        self.reserve_timeout_s = reserve_timeout_s
        self.clock = clock
        self.link_bytes_per_s = 0.0
        self.loads: dict[int, WorkerLoad] = {}
        self.dead: set[int] = set()
        self.waiting: dict[str, QueueItem] = {}
        self._rr = itertools.count()
        self.prefix: PrefixIndex | None = None     # cache-aware routing; None: least-loaded picks
        self.dest_cached: dict[str, int] = {}      # request id -> prompt tokens its decode worker holds (Reserve)
        self.prompts_seen: dict[int, int] = {}     # prefill rank -> first tokens received from it
        self.first_backoff_s, self.max_backoff_s = 0.005, 0.1    # a waiter's re-check interval, doubling
        self._wake: asyncio.Event | None = None    # set (and replaced) when a waiter may now proceed

    def _notify(self) -> None:
        """Wake every waiting acquire: the head left, or a load changed."""
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    async def _wait(self, timeout: float) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # ------------------------------------------------------------------ liveness
    def live(self, ranks: list[int]) -> list[int]:
        return [r for r in ranks if r not in self.dead]

    @property
    def any_decode_alive(self) -> bool:
        return bool(self.live(self.decode_ranks))

    # ------------------------------------------------------------------ decisions
    async def acquire(self, rid: str, prompt_len: int, predicted: float, max_tokens: int, reserve: ReserveFn,
                      force_local: bool = False, prompt_ids: list[int] | None = None, cache_salt: str | None = None,
                      keys: list[bytes] | None = None) -> tuple[int, bool]:
        """(decode rank, prefill there?) once a live decode worker has room; see the module doc.
        prompt_ids / cache_salt go in the Reserve (the decode worker reuses the prefix it holds);
        keys (self.keys(...)) make the decisions cache-aware."""
        now = self.clock()
        self.waiting[rid] = QueueItem(rid, now, prompt_len, predicted)
        deadline = now + self.reserve_timeout_s
        delay = self.first_backoff_s
        bs = self.block_size
        need_prompt = blocks_for(prompt_len + 1, bs)
        try:
            while True:
                self.check_fits(need_prompt)
                items = list(self.waiting.values())
                head = items[self.ordering.pick(items, self.clock())].request_id
                if head == rid:      # strict order: only the policy's choice may take capacity
                    loads = [self.loads.get(r) or WorkerLoad(r, "decode", 0, 0, 0, 1 << 30, 1 << 30)
                             for r in self.live(self.decode_ranks)]
                    held = self.cached_tokens(self.live(self.decode_ranks), keys, prompt_len)
                    held_blocks = {r: t // bs for r, t in held.items()}
                    # Room for the prediction net of each worker's ledger; failing that, for the prompt.
                    prefs = decode_preference(loads, prompt_tokens=prompt_len, predicted_len=predicted,
                                              block_size=bs, committed={w.rank: w.committed_blocks for w in loads},
                                              cached_blocks=held_blocks) \
                        or decode_preference(loads, need_prompt, cached_blocks=held_blocks)
                    promise = reserved_blocks(prompt_len, predicted, 0, bs, max_tokens=max_tokens)
                    for rank in prefs:
                        if force_local or self.prefill_here(prompt_len, rank, keys, held.get(rank, 0)):
                            self.bump(rank, tokens=prompt_len - held.get(rank, 0), committed=promise)
                            return rank, True
                        try:
                            reply = await reserve(rank, Reserve(rid, prompt_len, predicted, max_tokens,
                                                                list(prompt_ids or []), cache_salt))
                        except Exception:  # noqa: BLE001 - that worker is gone; the caller learns it elsewhere
                            continue
                        self.bump(rank, free_blocks=reply.free_blocks,
                                  committed=promise - need_prompt if reply.ok else 0)
                        if reply.ok:
                            self.dest_cached[rid] = reply.num_cached_tokens
                            return rank, False
                if self.clock() > deadline:
                    raise APIError(503, "no decode worker has KV-cache room for this request; retry later",
                                   "server_error", headers={"Retry-After": "2"})
                # Wait for a change (the head leaving, a load report) or, failing that, re-check after
                # a backoff. A sleep alone made the queue move at one request per backoff (up to 100 ms
                # each): the disaggregated pool saturated near 12 req/s on four H200s.
                await self._wait(delay)
                delay = min(delay * 2, self.max_backoff_s)
        finally:
            self.waiting.pop(rid, None)
            self._notify()

    def check_fits(self, need_blocks: int) -> None:
        """No live decode worker: 503 now. A prompt bigger than every live decode worker's whole
        KV cache can never run: 400 now."""
        live = self.live(self.decode_ranks)
        if not live:
            raise APIError(503, "no decode worker is alive; retry later", "server_error",
                           headers={"Retry-After": "5"})
        totals = [self.loads[r].total_blocks for r in live if r in self.loads]
        if len(totals) == len(live) and need_blocks > max(totals):
            bs = self.block_size
            raise APIError(400, f"the prompt needs {need_blocks * bs} tokens of KV cache; the largest decode "
                                f"worker holds {max(totals) * bs}", "invalid_request_error", param="messages")

    def prefill_here(self, prompt_len: int, rank: int, keys: list[bytes] | None = None, held: int = 0) -> bool:
        """Conditional disaggregation (router.policy.should_prefill_locally), from the workers'
        reported loads, their measured prefill cost and the measured link; with keys, on the tokens
        neither the decode worker (`held`) nor each prefill worker is believed to hold."""
        live_p = self.live(self.prefill_ranks)
        if not live_p or self.local_prefill == "always":
            return True
        if self.local_prefill == "never" or rank not in self.loads:
            return False
        pl = [self.loads[r] for r in live_p if r in self.loads]
        if not pl:
            return False
        c = max(w.prefill_s_per_token for w in pl) or self.default_c
        x = self.kv_bytes_per_token / max(self.link_bytes_per_s, 1.0)
        return should_prefill_locally(prompt_len, self.loads[rank], pl, x, c, self.threshold,
                                      decode_cached_tokens=held,
                                      prefill_cached_tokens=self.cached_tokens(live_p, keys, prompt_len))

    def pick_prefill(self, keys: list[bytes] | None = None, prompt_len: int = 0) -> int:
        """The live prefill worker with the fewest queued prompt tokens (round robin until all reported);
        with keys, the one where this prompt's uncached tokens plus the queue are fewest."""
        live = self.live(self.prefill_ranks)
        if not live:
            raise APIError(503, "no prefill worker is alive; retry later", "server_error",
                           headers={"Retry-After": "5"})
        if all(r in self.loads for r in live):
            return pick_prefill([self.loads[r] for r in live], prompt_len,
                                self.cached_tokens(live, keys, prompt_len))
        held = self.cached_tokens(live, keys, prompt_len)
        if held and max(held.values()) > 0:
            return max(live, key=lambda r: held[r])
        return live[next(self._rr) % len(live)]

    # ------------------------------------------------------------------ prefix cache mirror
    def keys(self, token_ids: list[int], cache_salt: str | None = None) -> list[bytes]:
        """The block keys the workers would give these tokens ([] without cache-aware routing)."""
        return self.prefix.keys(token_ids, cache_salt) if self.prefix is not None else []

    def cached_tokens(self, ranks: list[int], keys: list[bytes] | None, num_tokens: int) -> dict[int, int]:
        """{rank: leading prompt tokens it is believed to hold} ({} without keys)."""
        if self.prefix is None or not keys:
            return {}
        for r in ranks:
            if r in self.loads:
                self.prefix.set_capacity(r, self.loads[r].total_blocks)
        return self.prefix.match_tokens(ranks, keys, num_tokens)

    def holds(self, rank: int, keys: list[bytes]) -> None:
        """Record that `rank` now holds these blocks (it was sent their tokens)."""
        if self.prefix is not None and keys:
            self.prefix.insert(rank, keys)

    def bump(self, rank: int, tokens: int = 0, free_blocks: int | None = None, committed: int = 0) -> None:
        """Until the worker's next report, count what was just sent or promised to it."""
        w = self.loads.get(rank)
        if w is not None:
            self.loads[rank] = replace(w, num_waiting=w.num_waiting + (tokens > 0),
                                       queued_prompt_tokens=w.queued_prompt_tokens + tokens,
                                       free_blocks=w.free_blocks if free_blocks is None else free_blocks,
                                       committed_blocks=w.committed_blocks + max(committed, 0))
        self._notify()

    def prefill_done(self, rank: int, tokens: int) -> None:
        """A prompt's first token came back from prefill worker `rank`: until its next report, stop
        counting the prompt as queued there. (Otherwise a conversation's next turn, sent at once,
        sees its own previous turn as load on the very worker that caches its history, and the
        cache-aware pick goes elsewhere. At worst this under-counts until the next report.)"""
        self.prompts_seen[rank] = self.prompts_seen.get(rank, 0) + 1
        w = self.loads.get(rank)
        if w is not None:
            self.loads[rank] = replace(w, num_waiting=max(0, w.num_waiting - 1),
                                       queued_prompt_tokens=max(0, w.queued_prompt_tokens - tokens))

    def report(self, rank: int, load: WorkerLoad) -> bool:
        """Take a worker's load report, unless it is older than what the router already knows: a
        prefill report counting fewer first tokens emitted than the router received from that worker
        was taken before they went out (it would count their prompts as queued again). False: ignored;
        the next report (a poll later) replaces it."""
        if load.role == "prefill" and load.num_prompts_done < self.prompts_seen.get(rank, 0):
            return False
        self.loads[rank] = load
        self._notify()
        return True
