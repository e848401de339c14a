"""Discrete-event simulation of a deployment: the real policy code on a simulated clock.

    trace (disagg.traces.TraceRequest) ──▶ router ──▶ prefill workers ──KV──▶ decode workers
                                            │  router.policy: ordering (FCFS / SPF), decode_preference,
                                            │  pick_prefill, should_prefill_locally, reserved_blocks
                                            └─ decode.scheduler.Scheduler + decode.block_manager.BlockManager
                                               in every worker (disagg/sim/workers.py), step times from a
                                               PerfModel (disagg/sim/perf_model.py) instead of GPUs

Topologies (as `disagg serve` runs them):
    --prefill 0 --decode 1   the colocated engine (LLMEngine: no router queue, requests go straight in)
    --prefill 0 --decode M   M colocated replicas behind one router (every prompt prefills where it decodes)
    --prefill N --decode M   disaggregated (disagg/deploy/cluster.py's DisaggEngine._dispatch, with
                             conditional disaggregation per --local-prefill)

A disaggregated request: the router's ordering picks the head of its queue (strictly in order);
decode_preference ranks the decode workers by headroom after the predicted reservation net of
their ledgers; should_prefill_locally decides local vs remote; remote means Reserve (prompt + 1
blocks) on the decode worker and the prompt to pick_prefill's worker. The final chunk's step
encodes each layer (added to that step), streams it (PerfModel.transfer_tail_s) and samples the
first token, which reaches the client control_latency_s later; the request joins the decode
worker when both its KV and its first token are there, and the KV decode + scatter is charged
to that worker's next step.

Differences from the real system, on purpose: loads are read live (the router polls them every
0.25 s and corrects its view with its own bookkeeping); a blocked router retries when a decode
worker frees KV (the real one polls every 5-100 ms); links are not shared between transfers;
the HTTP front door and detokenization cost nothing.
"""
from __future__ import annotations

import heapq
import itertools
import math
import random
from array import array
from dataclasses import dataclass, field

from disagg.config import SchedulerConfig
from disagg.request import Request, SamplingParams
from disagg.sim.perf_model import PerfModel
from disagg.sim.workers import SimWorker
from disagg.traces import TraceRequest
from router.policy import (QueueItem, blocks_for, decode_preference, make_ordering, pick_prefill,
                           should_prefill_locally)


@dataclass(frozen=True)
class SimConfig:
    num_prefill: int = 0
    num_decode: int = 1
    kv_codec: str = "none"                # none | fp8 | int8 | int4
    policy: str = "fcfs"                  # fcfs | spf (router and engines, as --scheduling-policy)
    aging_rate: float = 20.0
    max_wait_s: float = 10.0
    local_prefill: str = "auto"           # auto | never | always
    local_prefill_threshold: int = 256
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    block_size: int = 16
    num_blocks: int | None = None         # KV blocks per decode / colocated worker (None: the perf model's)
    gpu_memory_utilization: float = 0.90
    control_latency_s: float = 1e-3       # a control message between processes (Ray)
    # HTTP front door (parse, router, first SSE chunk): client TTFT minus the router's own phases,
    # 2.8-3.8 ms on an H200 host (benchmarks/bench_handoff.py); 0 for the bare engine (sim_fidelity)
    frontdoor_s: float = 3e-3
    reserve_timeout_s: float = 30.0       # router: waiting longer for decode KV is a 503
    predictor: str = "max_tokens"         # max_tokens | fixed:N | noisy:SIGMA (log-normal error)
    prefix_caching: bool = True           # as the engine's default: a preempted request finds its blocks
    coalesce: bool = True                 # plan runs of decode steps at once (same results, faster)
    seed: int = 0

    def __post_init__(self):
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError("--prefill must be >= 0 and --decode >= 1")
        if self.kv_codec not in ("none", "fp8", "int8", "int4"):
            raise ValueError("--kv-codec must be none, fp8, int8 or int4")
        if self.local_prefill not in ("auto", "never", "always"):
            raise ValueError("--local-prefill must be auto, never or always")
        if self.num_prefill == 0 and self.local_prefill == "never":
            raise ValueError("--local-prefill never needs a prefill pool")
        predictions(self.predictor, [1], 0)       # validates the spec

    @property
    def engine_mode(self) -> bool:
        return self.num_prefill == 0 and self.num_decode == 1


def predictions(spec: str, outputs: list[int], seed: int) -> list[float]:
    """Predicted response lengths. Traces carry lengths, not prompt text, so the learned predictor
    cannot run; these stand in for it. max_tokens: what the real router uses without a predictor
    (a trace replay sends max_tokens = the recorded length, so it is exact); fixed:N; noisy:SIGMA:
    the true length times exp(SIGMA * N(0, 1)) (a predictor's log-error)."""
    kind, _, arg = spec.partition(":")
    if kind == "max_tokens":
        return [float(o) for o in outputs]
    if kind == "fixed":
        return [float(arg or 256)] * len(outputs)
    if kind == "noisy":
        rng, sigma = random.Random(seed), float(arg or 0.5)
        return [max(1.0, o * math.exp(sigma * rng.gauss(0.0, 1.0))) for o in outputs]
    raise ValueError(f"unknown predictor {spec!r} (max_tokens, fixed:N, noisy:SIGMA)")


@dataclass
class SimResult:
    cfg: SimConfig
    trace: list[TraceRequest]
    arrival: list[float]
    first: list[float]
    done: list[float]
    num_out: list[int]
    failed: dict[int, str]
    itl_values: array
    itl_weights: array
    workers: list[SimWorker]
    end_s: float
    stopped_early: bool = False
    stats: dict = field(default_factory=dict)


class Simulator:
    def __init__(self, trace: list[TraceRequest], cfg: SimConfig, decode_perf: PerfModel,
                 prefill_perf: PerfModel | None = None, stop_after_violations: int | None = None,
                 slo: tuple[float, float] | None = None):
        self.cfg = cfg
        self.trace = trace
        self.now = 0.0
        self.coalesce = cfg.coalesce
        self.heap: list = []
        self._seq = itertools.count()
        n = len(trace)
        self.outputs = [min(q.output_tokens, max(1, cfg.max_model_len - q.prompt_tokens)) for q in trace]
        self.pred = predictions(cfg.predictor, self.outputs, cfg.seed)
        self.arrival = [q.arrival_s for q in trace]
        self.first = [math.nan] * n
        self.last = [0.0] * n
        self.done = [math.nan] * n
        self.num_out = [0] * n
        self.failed: dict[int, str] = {}
        self.itl_v, self.itl_w = array("d"), array("q")
        self.live: dict[str, Request] = {}
        self.queue: dict[str, QueueItem] = {}
        self._retry_at = -1.0
        self.finished = 0
        self.stop_after = stop_after_violations
        self.slo = slo
        self.violations = 0
        self.stopped = False
        self.next_arrival = math.inf
        self.router_free_at = 0.0                 # the router awaits the head's Reserve before the next
        self.step_log: list | None = None         # (rank, start, [(request id, tokens)]) per ordinary step
        sc = SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                             max_model_len=cfg.max_model_len, ordering=cfg.policy, aging_rate=cfg.aging_rate,
                             max_wait_s=cfg.max_wait_s)
        okw = {} if cfg.policy == "fcfs" else dict(aging_rate=cfg.aging_rate, max_wait_s=cfg.max_wait_s)
        self.ordering = make_ordering(cfg.policy, **okw)
        engine_ordering = None if cfg.policy == "fcfs" else self.ordering
        bs = cfg.block_size
        dblocks = cfg.num_blocks or decode_perf.num_kv_blocks(bs, cfg.gpu_memory_utilization)
        if dblocks < 1:
            raise ValueError(f"{decode_perf.describe()}: no memory left for the KV cache")
        self.prefill_perf = prefill_perf or decode_perf
        self.decode_perf = decode_perf
        self.prefills = [SimWorker(self, r, "prefill", self.prefill_perf, sc,
                                   self.prefill_perf.num_kv_blocks(bs, cfg.gpu_memory_utilization), bs,
                                   cfg.max_model_len, None) for r in range(cfg.num_prefill)]
        role = "colocated" if cfg.engine_mode else "decode"
        self.decodes = [SimWorker(self, cfg.num_prefill + i, role, decode_perf, sc, dblocks, bs, cfg.max_model_len,
                                  engine_ordering) for i in range(cfg.num_decode)]
        self.workers = self.prefills + self.decodes
        shape = decode_perf.shape
        self.kv_bytes_per_token = shape.kv_bytes_per_token
        probe = 64 * 2**20                        # the cluster measures its link with 64 MiB messages
        self.link_bw = probe / self.prefill_perf.link.seconds(probe)
        self.codec_ratio = self.prefill_perf.codec_ratio(cfg.kv_codec)
        # DisaggEngine._default_prefill_s_per_token: 2 FLOPs per parameter at 200 TFLOP/s
        self.default_prefill_s_per_token = 2 * (shape.layer_params + shape.embed_params) / 2e14

    def clock(self) -> float:
        return self.now

    def push(self, t: float, prio: int, kind: str, a=None, b=None) -> None:
        heapq.heappush(self.heap, (t, prio, next(self._seq), kind, a, b))

    # ------------------------------------------------------------------ the loop
    def run(self, progress: bool = False) -> SimResult:
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(self.trace), unit="req", desc="simulating", leave=False, mininterval=0.5)
        arrivals = iter(range(len(self.trace)))
        nxt = next(arrivals, None)
        fd = self.cfg.frontdoor_s
        if nxt is not None:
            self.push(self.arrival[nxt] + fd, 0, "arrive", nxt)
            self.next_arrival = self.arrival[nxt] + fd
        done_seen = 0
        while self.heap and not self.stopped:
            t, _, _, kind, a, b = heapq.heappop(self.heap)
            self.now = t
            if kind == "step":
                a.on_step_end(t, b)
            elif kind == "arrive":
                self._arrive(a)
                nxt = next(arrivals, None)
                self.next_arrival = math.inf if nxt is None else self.arrival[nxt] + fd
                if nxt is not None:
                    self.push(self.next_arrival, 0, "arrive", nxt)
            elif kind == "kv":
                self._kv_ready(a, *b)
            elif kind == "local":
                a.touch(t, False)
                a.add_local(*b)
            elif kind == "submit":
                a.submit_prefill(*b)
            elif kind == "retry":
                self._dispatch(after_steps=True)
            if bar is not None and self.finished + len(self.failed) - done_seen >= 256:
                bar.update(self.finished + len(self.failed) - done_seen)
                done_seen = self.finished + len(self.failed)
        if bar is not None:
            bar.update(self.finished + len(self.failed) - done_seen)
            bar.close()
        for i in range(len(self.trace)):
            if math.isnan(self.done[i]) and i not in self.failed:
                self.failed[i] = "stopped" if self.stopped else "unfinished"
        return SimResult(self.cfg, self.trace, self.arrival, self.first, self.done, self.num_out, self.failed,
                         self.itl_v, self.itl_w, self.workers, self.now, self.stopped)

    # ------------------------------------------------------------------ requests
    def _request(self, i: int, max_tokens: int) -> Request:
        """Token ids are placeholders (trace prompts share nothing; workers.SimScheduler keys the
        prefix cache by request and block)."""
        q = self.trace[i]
        return Request(str(i), [0] * q.prompt_tokens,
                       SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_time=self.now)

    def _arrive(self, i: int) -> None:
        if self.trace[i].prompt_tokens >= self.cfg.max_model_len:
            self._fail(i, "400: the prompt does not fit the context (--max-model-len)")
            return
        if self.cfg.engine_mode:
            w = self.decodes[0]
            w.touch(self.now, False)
            req = self._request(i, self.outputs[i])
            try:
                w.add_local(req, self.pred[i])
            except ValueError as e:
                self._fail(i, f"rejected: {e}")
                return
            self.live[req.request_id] = req
            return
        q = self.trace[i]
        self.queue[str(i)] = QueueItem(str(i), self.now, q.prompt_tokens, self.pred[i])
        self._dispatch(after_steps=False)

    def _fail(self, i: int, why: str) -> None:
        self.failed[i] = why
        self._violation()

    def _violation(self) -> None:
        self.violations += 1
        if self.stop_after is not None and self.violations > self.stop_after:
            self.stopped = True

    # ------------------------------------------------------------------ router (DisaggEngine._dispatch)
    def _dispatch(self, after_steps: bool) -> None:
        now, cfg = self.now, self.cfg
        for rid in [r for r, it in self.queue.items() if now - it.arrival > cfg.reserve_timeout_s]:
            del self.queue[rid]
            self._fail(int(rid), "503: no decode KV before the reserve timeout")
        if not self.queue:
            return
        if now < self.router_free_at:             # awaiting a Reserve: the queue moves after it
            if self._retry_at != self.router_free_at:
                self._retry_at = self.router_free_at
                self.push(self.router_free_at, 2, "retry")
            return
        fcfs = cfg.policy == "fcfs"
        while self.queue:
            if fcfs:                              # arrivals are queued in time order
                head = next(iter(self.queue.values()))
            else:
                items = list(self.queue.values())
                head = items[self.ordering.pick(items, now)]
            if not self._try(head, after_steps):
                return
            del self.queue[head.request_id]
            if self.router_free_at > now:
                self._dispatch(after_steps)           # schedules the retry for the rest of the queue
                return

    def _try(self, item: QueueItem, after_steps: bool) -> bool:
        """Dispatch the head now if a decode worker has room; False leaves it queued (strict order).
        Loads are read as of now; only the worker that takes the request is touched."""
        cfg, bs = self.cfg, self.cfg.block_size
        i, p = int(item.request_id), item.prompt_tokens
        loads = [w.load(self.now, after_steps) for w in self.decodes]
        need_prompt = blocks_for(p + 1, bs)
        if need_prompt > max(w.total_blocks for w in loads):
            self._fail(i, "400: the prompt can never fit a decode worker's KV cache")
            return True
        prefs = decode_preference(loads, prompt_tokens=p, predicted_len=item.predicted_len, block_size=bs,
                                  committed={w.rank: w.committed_blocks for w in loads}) \
            or decode_preference(loads, need_prompt)
        by_rank = {w.rank: (w, ld) for w, ld in zip(self.decodes, loads)}
        lat = cfg.control_latency_s
        for rank in prefs:
            w, ld = by_rank[rank]
            w.touch(self.now, after_steps)
            if self._prefill_here(p, ld):
                # the PrefillRequest reaches the worker's inbox one control message later
                req = self._request(i, self.outputs[i])
                self.live[req.request_id] = req
                w.local_prefills += 1
                self.push(self.now + lat, 0, "local", w, (req, item.predicted_len))
                return True
            if w.reserve(item.request_id, p, item.predicted_len, self.outputs[i]):
                # The Reserve RPC takes the decode worker's lock, which its engine holds for a whole
                # step: the reply comes after the step in progress (decode/worker.py). The router
                # awaits it (the queue behind waits too), then sends the prompt to the prefill worker.
                reply = max(self.now + lat, w.busy_until(self.now)) + lat
                self.router_free_at = reply
                self.live[item.request_id] = self._request(i, self.outputs[i])
                pw = self.prefills[pick_prefill([x.load() for x in self.prefills])]
                self.push(reply + lat, 0, "submit", pw, (self._request(i, 1), rank))
                return True
        return False

    def _prefill_here(self, prompt_tokens: int, load) -> bool:
        mode = self.cfg.local_prefill
        if not self.prefills or mode == "always":
            return True
        if mode == "never":
            return False
        pl = [w.load() for w in self.prefills]
        c = max(w.prefill_s_per_token for w in pl) or self.default_prefill_s_per_token
        x = self.kv_bytes_per_token / self.codec_ratio / self.link_bw
        return should_prefill_locally(prompt_tokens, load, pl, x, c, self.cfg.local_prefill_threshold)

    def _capacity_freed(self) -> None:
        if self.queue and self._retry_at != self.now:
            self._retry_at = self.now
            self.push(self.now, 2, "retry")

    # ------------------------------------------------------------------ KV handoff
    def encode_cost(self, w: SimWorker, out) -> float:
        """Seconds the prefill GPU spends encoding the KV of the prompts this step finishes."""
        plans: dict[int, int] = {}
        for s in out.scheduled:
            if s.samples:
                d = w.dest[s.request.request_id]
                plans[d] = plans.get(d, 0) + s.request.num_prompt_tokens
        L = w.perf.shape.num_layers
        return sum(L * w.perf.codec_layer_s(self.cfg.kv_codec, t)[0] for t in plans.values())

    def _prefill_finished(self, w: SimWorker, out, now: float, exec_s: float) -> None:
        if out.num_batched_tokens >= 64:          # PrefillWorker's moving average of s per prompt token
            rate = exec_s / out.num_batched_tokens
            w.s_per_token = rate if not w.s_per_token else 0.8 * w.s_per_token + 0.2 * rate
        plans: dict[int, list] = {}
        for s in out.scheduled:
            if s.samples:
                plans.setdefault(w.dest.pop(s.request.request_id), []).append(s.request)
        codec, lat = self.cfg.kv_codec, self.cfg.control_latency_s
        for dest, reqs in plans.items():
            tokens = sum(r.num_prompt_tokens for r in reqs)
            _, tail = w.perf.transfer_tail_s(tokens, codec, exec_s)
            dec_s = w.perf.shape.num_layers * self.decode_perf.codec_layer_s(codec, tokens)[1]
            ready = now + max(tail, lat)
            dw = self.workers[dest]
            for r in reqs:
                i = int(r.request_id)
                self.token(i, now + lat)
                self.push(ready, 0, "kv", dw, (i, dec_s * r.num_prompt_tokens / tokens))

    def _kv_ready(self, w: SimWorker, i: int, charge: float) -> None:
        w.touch(self.now, False)
        req = self.live[str(i)]
        req.arrival_time = self.now               # add_prefilled makes a new Request now
        req.output_token_ids.append(0)
        if w.add_prefilled(req, charge):
            self._finish(i)
            self._capacity_freed()

    # ------------------------------------------------------------------ bookkeeping
    def step_done(self, w: SimWorker, out, finished: list[Request], now: float, exec_s: float) -> None:
        if w.role == "prefill":
            self._prefill_finished(w, out, now, exec_s)
            return
        for s in out.scheduled:
            if s.samples:
                self.token(int(s.request.request_id), now)
        for r in finished:
            self._finish(int(r.request_id))
        if finished and w.role == "decode":
            self._capacity_freed()

    def token(self, i: int, t: float) -> None:
        if self.num_out[i] == 0:
            self.first[i] = t
            if self.slo is not None and t - self.arrival[i] > self.slo[0]:
                self._violation()
        else:
            self.itl_v.append(t - self.last[i])
            self.itl_w.append(1)
        self.last[i] = t
        self.num_out[i] += 1

    def window_tokens(self, reqs: list[Request], ends: list[float], j: int) -> None:
        t0 = ends[0]
        for r in reqs:
            i = int(r.request_id)
            self.itl_v.append(t0 - self.last[i])
            self.itl_w.append(1)
            self.last[i] = ends[j - 1]
            self.num_out[i] += j
        b = len(reqs)
        for s in range(1, j):
            self.itl_v.append(ends[s] - ends[s - 1])
            self.itl_w.append(b)

    def _finish(self, i: int) -> None:
        self.done[i] = self.now
        self.finished += 1
        self.live.pop(str(i), None)
        if self.slo is not None and self.num_out[i] > 1 and \
                (self.now - self.first[i]) / (self.num_out[i] - 1) > self.slo[1]:
            if self.first[i] - self.arrival[i] <= self.slo[0]:
                self._violation()


def simulate(trace: list[TraceRequest], cfg: SimConfig, decode_perf: PerfModel,
             prefill_perf: PerfModel | None = None, progress: bool = False, **kw) -> SimResult:
    return Simulator(trace, cfg, decode_perf, prefill_perf, **kw).run(progress)
