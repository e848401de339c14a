"""Simulated workers: the real Scheduler and BlockManager on the simulation's clock.

    SimWorker (role colocated | prefill | decode)
        sched  decode.scheduler.Scheduler      the real one; clock() = simulated time
        bm     decode.block_manager.BlockManager
    a step:   schedule() -> duration from the PerfModel -> STEP_END event -> update()

Roles mirror the real workers: `colocated` is LLMEngine (disagg/engine/llm_engine.py: add_request
caps max_tokens to the context); `decode` adds DecodeWorker's reservation (prompt + 1 blocks),
its ledger (WorkerLoad.committed_blocks) and add_prefilled (the request joins holding its first
token); `prefill` is PrefillWorker (max_tokens = 1; the final chunk's step encodes and streams the
KV, which adds the codec's encode time to that step).

Coalesced decode steps (a "window"). When every running request is decoding, the step budget
holds them all and nothing waiting can be admitted (queue empty, max_num_seqs reached, or FCFS
with a head that does not fit: free blocks only shrink while decoding), the next steps are
known in advance: each running request gains one token per step, until the first of them
finishes or the free blocks run out. A window plans those m steps at once (their durations
one by one, in the same float order as single steps) and applies them at its end. Anything
that reads or changes the worker before then (a dispatch, an arriving request or KV) first
`touch`es it: the steps that ended are applied, the one in progress becomes an ordinary step
(its blocks allocated, as schedule() would have), and the window ends with it. Single steps and
windows therefore give the same schedule and the same times (tests/unit/test_sim*.py checks);
only block ids differ, which nothing observes.

Event order at equal times: arrivals and landed KV (0) before step ends (1) before router
retries (2). A touch from a priority-0 event treats a step ending at that instant as still
running; from a priority-2 event as done, the next one started.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from decode.block_manager import BlockManager
from decode.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from disagg.config import SchedulerConfig
from disagg.messages import WorkerLoad
from disagg.request import Request
from router.policy import OrderingPolicy, reserved_blocks

MIN_WINDOW = 2          # fewer steps than this: an ordinary step


class SimScheduler(Scheduler):
    """The real scheduler; only its prefix-cache keys are stand-ins. Simulated prompts are
    placeholders that share nothing, so block j of request r is named by (r, j) exactly as its
    chained sha256 would name it (decode/prefix_cache.py): a preempted request finds its own
    blocks again, no two requests share one. This saves a sha256 per block per worker."""

    def _keys(self, req: Request, num_blocks: int) -> list:
        known = self.block_hashes.get(req.request_id)
        if known is None:
            known = self.block_hashes[req.request_id] = []
        if len(known) < num_blocks:
            rid = req.request_id
            known.extend((rid, j) for j in range(len(known), num_blocks))
        return known if len(known) == num_blocks else known[:num_blocks]


def step_shape(out: SchedulerOutput) -> tuple[int, int, list[tuple[int, int]], int]:
    """What a step costs depends on: (decoding requests, KV tokens they read, prefill chunks
    [(new tokens, cached tokens)], the longest decode context)."""
    b = k = m = 0
    chunks = []
    for s in out.scheduled:
        if s.is_decode:
            b += 1
            k += s.start + 1
            m = max(m, s.start + 1)
        else:
            chunks.append((s.num_tokens, s.start))
    return b, k, chunks, m


@dataclass
class _Window:
    ends: list[float]          # end time of each planned step
    durs: list[float]
    reqs: list[Request]        # the running requests, in order
    c0: list[int]              # their num_computed_tokens at the start
    held0: list[int]           # their blocks at the start
    used0: int                 # blocks in use at the start (before step 0's allocation)


class SimWorker:
    def __init__(self, sim, rank: int, role: str, perf, sched_cfg: SchedulerConfig, num_blocks: int,
                 block_size: int, max_model_len: int, ordering: OrderingPolicy | None):
        self.sim, self.rank, self.role, self.perf = sim, rank, role, perf
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=sim.cfg.prefix_caching)
        self.predicted: dict[str, float] = {}
        self.sched = SimScheduler(sched_cfg, self.bm, max_model_len, ordering=ordering, clock=sim.clock,
                                  predicted_len=lambda r: self.predicted.get(r.request_id,
                                                                             float(r.params.max_tokens)))
        self.max_model_len = max_model_len
        self.inflight: SchedulerOutput | None = None
        self.inflight_exec = 0.0
        self.step_end = 0.0                       # when the ordinary step in flight ends
        self.window: _Window | None = None
        self.epoch = 0
        self.charge = 0.0                         # decode: KV decode + scatter owed to the next step
        self.reserved: set[str] = set()           # decode: blocks held, KV not yet here
        self.ledger: dict[str, tuple[int, float, int]] = {}
        self.s_per_token = 0.0                    # prefill: moving average, as PrefillWorker measures it
        self.dest: dict[str, int] = {}            # prefill: request -> decode rank
        # statistics
        self.busy_s = self.batch_s = self.kv_block_s = 0.0
        self.steps = self.windows = self.preemptions = self.peak_blocks = self.local_prefills = 0

    # ------------------------------------------------------------------ state the router reads
    @property
    def busy(self) -> bool:
        return self.inflight is not None or self.window is not None

    def busy_until(self, now: float) -> float:
        """When the step in progress at `now` ends (now if idle)."""
        w = self.window
        if w is not None:
            j = bisect.bisect_right(w.ends, now)
            return w.ends[j] if j < len(w.ends) else now
        return self.step_end if self.inflight is not None else now

    def load(self, now: float | None = None, after_steps: bool = False) -> WorkerLoad:
        """As DecodeWorker.load / PrefillWorker.load report it at `now`. Inside a window this is
        computed as touch(now, after_steps) would leave the worker, without ending the window."""
        sch, bm = self.sched, self.bm
        queued = sum(r.num_tokens - r.num_computed_tokens for r in sch.waiting)
        if self.role == "prefill":
            queued += sum(r.num_tokens - r.num_computed_tokens for r in sch.running)
            return WorkerLoad(self.rank, "prefill", sch.num_running, sch.num_waiting, queued, bm.num_free_blocks,
                              bm.num_blocks, prefill_s_per_token=self.s_per_token)
        free, extra = bm.num_free_blocks, {}
        w = self.window
        if w is not None and now is not None:
            j = (bisect.bisect_right if after_steps else bisect.bisect_left)(w.ends, now)
            bs = bm.block_size
            for r, c, h in zip(w.reqs, w.c0, w.held0):
                held = max(h, -(-(c + j + 1) // bs))      # step j's allocation is made
                free -= held - len(bm.block_table(r.request_id))
                extra[r.request_id] = (j, held)
        return WorkerLoad(self.rank, "decode", sch.num_running, sch.num_waiting + len(self.reserved), queued,
                          free, bm.num_blocks, committed_blocks=self._committed(extra))

    def _committed(self, window: dict | None = None) -> int:
        """DecodeWorker._update_ledger: blocks promised beyond what each live request holds.
        window: request id -> (tokens it gained, blocks it holds) in a window not yet applied."""
        total, bs = 0, self.bm.block_size
        for rid, (prompt, predicted, max_tokens) in list(self.ledger.items()):
            req = self.sim.live.get(rid)
            if req is None or (req.finished and rid not in self.reserved):
                del self.ledger[rid]
                continue
            gained, held = window.get(rid, (0, None)) if window else (0, None)
            promised = reserved_blocks(prompt, predicted or 1, req.num_output_tokens + gained, bs,
                                       max_tokens=max_tokens)
            total += max(0, promised - (len(self.bm.block_table(rid)) if held is None else held))
        return total

    # ------------------------------------------------------------------ requests in
    def add_local(self, req: Request, predicted: float) -> None:
        """LLMEngine.add_request (a colocated engine, or a prompt the router prefills here)."""
        self.sched.add(req)
        self.predicted[req.request_id] = predicted
        if self.role == "decode":
            self.ledger[req.request_id] = (req.num_prompt_tokens, predicted, req.params.max_tokens)
        self.kick(self.sim.now)

    def reserve(self, rid: str, prompt_tokens: int, predicted: float, max_tokens: int) -> bool:
        """DecodeWorker.reserve: blocks for the prompt and the first token, or nothing."""
        if prompt_tokens >= self.max_model_len or self.bm.allocate_slots(rid, prompt_tokens + 1) is None:
            return False
        self.reserved.add(rid)
        self.ledger[rid] = (prompt_tokens, predicted, max_tokens)
        return True

    def add_prefilled(self, req: Request, charge_s: float) -> bool:
        """LLMEngine.add_prefilled with valid KV: joins WAITING holding its first token.
        Returns True if that token already ends it."""
        self.reserved.discard(req.request_id)
        req.num_computed_tokens = req.num_prompt_tokens
        self.charge += charge_s
        if self.sched.stop_reason(req) is not None:
            self.sched._finish(req, self.sched.stop_reason(req))
            return True
        self.sched.waiting.append(req)
        self.kick(self.sim.now)
        return False

    def submit_prefill(self, req: Request, dest: int) -> None:
        self.sched.add(req)
        self.dest[req.request_id] = dest
        self.kick(self.sim.now)

    # ------------------------------------------------------------------ stepping
    def kick(self, now: float) -> None:
        if not self.busy and self.sched.has_unfinished():
            self.start(now)

    def start(self, now: float) -> None:
        if self.role != "prefill" and self.sim.coalesce and self._plan_window(now):
            return
        for _ in range(4):                        # a step that only preempted: schedule again at once
            out = self.sched.schedule()
            self.preemptions += len(out.preempted)
            if out or not out.preempted:
                break
        if not out:
            return                                # idle until a request, KV or free blocks arrive
        dur = self.perf.step_time(*step_shape(out)) + self.charge
        if self.sim.step_log is not None:
            self.sim.step_log.append((self.rank, now, [(s.request.request_id, s.num_tokens) for s in out.scheduled]))
        self.charge = 0.0
        if self.role == "prefill":
            dur += self.sim.encode_cost(self, out)
        self._account(dur, len(out.scheduled))
        self.inflight, self.inflight_exec = out, dur
        self.step_end = now + dur
        self.sim.push(now + dur, 1, "step", self, self.epoch)

    def _account(self, dur: float, batch: int) -> None:
        used = self.bm.num_blocks - self.bm.num_free_blocks
        self.busy_s += dur
        self.batch_s += batch * dur
        self.kv_block_s += used * dur
        self.steps += 1
        self.peak_blocks = max(self.peak_blocks, used)

    def on_step_end(self, now: float, epoch: int) -> None:
        if epoch != self.epoch:
            return                                # superseded by a touch
        if self.window is not None:
            w = self.window
            self.window = None
            self._apply(w, len(w.ends))
        else:
            out, self.inflight = self.inflight, None
            sampled = {s.request.request_id: 0 for s in out.scheduled if s.samples}
            finished = self.sched.update(out, sampled)
            self.sim.step_done(self, out, finished, now, self.inflight_exec)
        self.kick(now)

    # ------------------------------------------------------------------ windows
    def _plan_window(self, now: float) -> bool:
        sch, bm = self.sched, self.bm
        run = sch.running
        b = len(run)
        cfg = sch.cfg
        if b == 0 or b > cfg.max_num_batched_tokens:
            return False
        # Steps until the first request finishes (Scheduler.stop_reason after j more tokens).
        steps_left = 1 << 62
        cap = min(self.max_model_len, bm.num_blocks * bm.block_size + 1)
        for r in run:
            n_out = len(r.output_token_ids)
            n_tok = len(r.prompt_token_ids) + n_out
            if n_tok - r.num_computed_tokens != 1 or not n_out:
                return False
            left = min(r.params.max_tokens - n_out, cap - n_tok)
            if left < steps_left:
                steps_left = left
        if sch.waiting and b < cfg.max_num_seqs and b < cfg.max_num_batched_tokens:
            # Something could be admitted unless FCFS's head does not fit (and never will while
            # the running requests only grow). Other orderings may change their head with time.
            if sch.ordering is not None:
                return False
            head = sch.waiting[0]
            n = min(head.num_tokens - head.num_computed_tokens, cfg.max_num_batched_tokens - b)
            if bm.can_allocate(head.request_id, head.num_computed_tokens + n):
                return False
        m = steps_left - 1                        # the finishing step runs as an ordinary step
        if m < MIN_WINDOW:
            return False
        free = bm.num_free_blocks
        c0 = [r.num_computed_tokens for r in run]
        held = [len(bm.block_table(r.request_id)) for r in run]
        bs = bm.block_size

        def need(steps: int) -> int:              # new blocks for `steps` steps
            return sum(max(0, -(-(c + steps) // bs) - h) for c, h in zip(c0, held))
        if need(m) > free:                        # largest m that fits (need is monotone)
            lo, hi = 0, m
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if need(mid) <= free else (lo, mid - 1)
            m = lo
            if m < MIN_WINDOW:
                return False
        # Steps past the next arrival would be cut short by it (every arrival touches the workers
        # it may go to): plan up to the step in progress then.
        horizon = self.sim.next_arrival
        k0 = sum(c0) + b
        m0 = max(c0) + 1
        dt = self.perf.decode_time
        d = dt(b, k0, m0) + self.charge
        t = now + d
        durs, ends = [d], [t]
        for j in range(1, m):
            if t >= horizon:
                break
            d = dt(b, k0 + j * b, m0 + j)
            t += d
            durs.append(d)
            ends.append(t)
        if len(ends) < MIN_WINDOW:
            return False
        self.charge = 0.0
        self.window = _Window(ends, durs, list(run), c0, held, bm.num_blocks - free)
        self.windows += 1
        self.sim.push(ends[-1], 1, "step", self, self.epoch)
        return True

    def touch(self, now: float, after_steps: bool) -> None:
        """Bring a window up to `now`: steps that ended are applied; the one in progress becomes an
        ordinary step (after_steps: a step ending exactly now counts as ended, as it does for a
        priority-2 event)."""
        w = self.window
        if w is None:
            return
        j = (bisect.bisect_right if after_steps else bisect.bisect_left)(w.ends, now)
        self.window = None
        self.epoch += 1
        self._apply(w, j)
        if j == len(w.ends):                      # cannot happen (its step end came first); be safe
            self.kick(now)
            return
        bm, bs = self.bm, self.bm.block_size
        for r in w.reqs:                          # step j's allocation, as schedule() makes it
            if r.num_computed_tokens + 1 > len(bm.block_table(r.request_id)) * bs:
                bm.allocate_slots(r.request_id, r.num_computed_tokens + 1)
        out = SchedulerOutput([ScheduledRequest(r, 1, list(bm.block_table(r.request_id))) for r in w.reqs])
        self._account(w.durs[j], len(w.reqs))
        self.inflight, self.inflight_exec = out, w.durs[j]
        self.step_end = w.ends[j]
        self.sim.push(w.ends[j], 1, "step", self, self.epoch)

    def _apply(self, w: _Window, j: int) -> None:
        """The first j steps of a window: tokens, KV blocks, statistics, token times."""
        if j == 0:
            return
        bm, bs, b = self.bm, self.bm.block_size, len(w.reqs)
        cross = [0] * j                           # new blocks allocated at step i (for the KV integral)
        zeros = [0] * j
        keyed = bm.enable_prefix_caching
        for r, c, h in zip(w.reqs, w.c0, w.held0):
            r.num_computed_tokens = c + j
            r.output_token_ids.extend(zeros)
            first = max(h * bs - c, 0)            # step whose allocation needs block h + 1
            if first < j:
                bm.allocate_slots(r.request_id, c + j)
                for i in range(first, j, bs):
                    cross[i] += 1
            if keyed and (c + j) // bs > c // bs:
                self.sched._cache_computed(r)     # what update() does after each step
        used = w.used0
        for i in range(j):
            used += cross[i]
            d = w.durs[i]
            self.busy_s += d
            self.batch_s += b * d
            self.kv_block_s += used * d
        self.steps += j
        self.peak_blocks = max(self.peak_blocks, used)
        self.sim.window_tokens(w.reqs, w.ends, j)
