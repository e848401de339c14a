"""A cluster of prefill and decode workers on Ray, seen by the HTTP server as one engine.

`DisaggEngine` has the AsyncEngine interface (start/stop/healthy/stats/generate), so
router/server.py serves both modes. Bring-up:

    ray.init (local, or --address) -> placement group, one bundle per worker (GPU or CPU)
    -> this process hosts the KV channel's store -> actors (max_restarts) build their groups
    -> handshakes checked pairwise -> link bandwidth and codec speed measured
    -> codec chosen (--kv-codec auto) -> worker loops start -> output and load pollers start

Lifecycle of a request, router side (each state's deadline on the right; the worker-side
states are in prefill/worker.py and decode/worker.py):

    QUEUED      waits for decode KV in the ordering policy's     reserve_timeout_s -> 503
                order (disagg/deploy/dispatch.py)                 never fits -> 400 at once
       │        decode worker d chosen; local or remote prefill
       ▼
    PREFILL     on prefill worker p (KV streamed to d), or on d    transfer_timeout_s on d ->
       │        itself (conditional disaggregation)                 RETRY
       ▼
    DECODE      tokens stream from d (the first from p when        client disconnect -> abort,
       │        remote); stop strings applied here                  KV freed on every worker
       ▼
    FINISHED    (length / stop / abort)

    RETRY       a worker of the attempt died, or its transfer failed or timed out: the
                attempt is aborted on the live workers (freeing its KV) and the request is
                dispatched again as a new attempt (wire id rid#k) with the prompt plus the
                tokens already streamed, prefilled on a live decode worker: the client's
                stream just continues. At most MAX_ATTEMPTS; with no live decode worker the
                request ends with a clear error (503) and /health answers 503.
                Meanwhile Ray restarts the dead worker and disagg/deploy/recovery.py re-admits it.

The router detokenizes and applies stop strings (and then aborts the decode side).
`--prefill 0` makes every decode worker a colocated replica behind this router.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

import ray

from disagg.config import EngineConfig, ModelConfig
from disagg.deploy.actor import WorkerActor
from disagg.deploy.bringup import choose_cluster_codec
from disagg.deploy.cluster_config import ClusterConfig
from disagg.deploy.config_codec import engine_config_to_dict
from disagg.deploy.dispatch import Dispatcher
from disagg.deploy.hops import HopTimes
from disagg.deploy.recovery import Recovery
from disagg.engine.async_engine import EngineDeadError, EngineStats
from disagg.engine.detokenizer import IncrementalDetokenizer
from disagg.messages import (PrefillRequest, Reserve, ReserveReply, TokenOutput, WorkerLoad, decode, decode_many,
                             encode, params_to_dict)
from disagg.model.tokenizer import Tokenizer
from disagg.request import FinishReason, RequestOutput, SamplingParams
from kvtransfer.groups import serve_store
from kvtransfer.handshake import check_compatible
from router.policy import make_ordering
from router.prefix_index import PrefixIndex


MAX_ATTEMPTS = 4     # a request is dispatched at most this many times (worker deaths, failed transfers)


class _Retry(Exception):
    """Queued into a stream: its current attempt failed (a worker died, a transfer failed); dispatch
    it again, replaying the prompt plus what was generated so far."""


@dataclass
class _Stream:
    """Router-side state of one request. Each dispatch is an *attempt* with its own wire id
    (`rid`, then `rid#2`, ...), so a worker that still holds a failed attempt never confuses it
    with the retry."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    predicted: float
    detok: IncrementalDetokenizer
    q: asyncio.Queue = field(default_factory=asyncio.Queue)
    wire_id: str = ""
    attempt: int = 0
    decode_rank: int | None = None
    prefill_rank: int | None = None     # None: prefilled on the decode worker (or not dispatched yet)
    first_seen: bool = False
    buffered: list = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    t: dict = field(default_factory=dict)      # hops.py: this attempt's timestamps (first attempt, remote)

    @property
    def num_out(self) -> int:
        return len(self.token_ids)


class DisaggEngine:
    def __init__(self, cfg: ClusterConfig, tokenizer: Tokenizer, log=print):
        self.cfg = cfg
        self.tok = tokenizer
        self.log = log
        self.error: str | None = None
        self.codec: str | None = None
        self.link: dict = {}
        self.streams: dict[str, _Stream] = {}        # wire id -> stream
        self.stats = EngineStats(0, 0, 0.0, 0)
        self.transfer: dict[str, float] = {}
        self._worker_stats: dict[int, dict] = {}
        self._tasks: list[asyncio.Task] = []
        self._started_ray = False
        self.local_prefills = 0
        self.retries = 0
        self.hops = HopTimes()
        self.codec_ratio = 1.0
        self.pg = None
        self.actors: dict = {}
        self.helpers: dict = {}           # rank -> ring helper or TP follower actor (no router traffic)
        self.store = self.store_addr = self._setup_args = None    # the KV channel's rendezvous (launch)
        self.recovery = Recovery(self, log)
        self._mc = ModelConfig.from_dir(cfg.engine.model_dir)
        cfg.check_model(self._mc)
        sc = cfg.engine.scheduler
        ordering = make_ordering(sc.ordering, **({} if sc.ordering == "fcfs" else dict(
            aging_rate=sc.aging_rate, max_wait_s=sc.max_wait_s)))
        self.prefill_ranks = list(range(cfg.num_prefill))
        self.decode_ranks = list(range(cfg.num_prefill, cfg.num_prefill + cfg.num_decode))
        self.dispatcher = Dispatcher(self.prefill_ranks, self.decode_ranks, ordering,
                                     block_size=cfg.engine.cache.block_size, kv_bytes_per_token=0.0,
                                     default_prefill_s_per_token=0.0, local_prefill=cfg.local_prefill,
                                     local_prefill_threshold=cfg.local_prefill_threshold,
                                     reserve_timeout_s=cfg.reserve_timeout_s)
        self._set_costs(gpu=False)
        if cfg.engine.cache.enable_prefix_caching and cfg.prefill_routing == "cache_aware":
            self.dispatcher.prefix = PrefixIndex(cfg.engine.cache.block_size)

    def _set_costs(self, gpu: bool) -> None:
        """The dispatcher's cost inputs: wire bytes per token (after the codec), the measured link,
        and, until a prefill is measured, 2 FLOPs per parameter per token at a modest rate."""
        d = self.dispatcher
        d.kv_bytes_per_token = self._mc.kv_bytes_per_token(self.cfg.engine.torch_dtype) / self.codec_ratio
        d.link_bytes_per_s = self.link.get("bandwidth_bytes_per_s", 0.0)
        d.default_c = 2 * self._mc.num_params / (2e14 if gpu else 5e10)

    @property
    def loads(self) -> dict[int, WorkerLoad]:
        return self.dispatcher.loads

    # ------------------------------------------------------------------ bring-up
    def launch(self) -> None:
        """Blocking: start or join Ray, place and set up the workers. Call before start()."""
        c = self.cfg
        if not ray.is_initialized():
            if c.address:
                ray.init(address=c.address, log_to_driver=True)
            else:
                import os
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=True)
                self._started_ray = True
        gpus = ray.cluster_resources().get("GPU", 0)
        layout = c.layout(self._mc.num_kv_heads)
        n = layout.world_size       # ranks P+D.. : ring helpers, then TP followers (kvtransfer/channel.py)
        use_gpu = c.use_gpus if c.use_gpus is not None else gpus >= n
        if use_gpu and gpus < n:
            raise RuntimeError(f"{n} workers need {n} GPUs; the Ray cluster has {gpus:g}")
        ecfg = c.engine if use_gpu else _cpu_engine(c.engine)
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.pg = None
        if use_gpu:   # one GPU per worker, packed onto as few nodes as possible
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            self.pg = placement_group([{"GPU": 1, "CPU": 1}] * n, strategy="PACK")
            ray.get(self.pg.ready(), timeout=120)
        for rank in range(n):
            role = layout.role_of(rank)
            if use_gpu:
                opts = dict(num_gpus=1, num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=rank))
            else:         # CPU workers: nothing to pin; they share the host's cores
                opts = dict(num_gpus=0, num_cpus=0)
            self.actors[rank] = WorkerActor.options(max_restarts=c.max_worker_restarts, max_task_retries=0,
                                                    **opts).remote(role, rank)
        # the store lives here, in the process that outlives every worker: a restarted one rejoins through it
        self.store, self.store_addr = serve_store("127.0.0.1" if c.address is None else ray.util.get_node_ip_address())
        self._setup_args = (engine_config_to_dict(ecfg), 0 if use_gpu else 1)
        for line in ray.get([a.setup.remote(self._setup_args[0], c.num_prefill, c.num_decode, self.store_addr,
                                            self._setup_args[1], c.prefill_cp, c.prefill_tp, c.decode_tp,
                                            loopback=c.address is None)
                             for a in self.actors.values()]):
            self.log(f"  {line}")
        self.helpers = {r: self.actors.pop(r) for r in range(c.num_prefill + c.num_decode, n)}
        choose_cluster_codec(self)
        hs = {r: decode(b) for r, b in zip(self.actors, ray.get([a.handshake.remote(self.codec)
                                                                  for a in self.actors.values()]))}
        for p in self.prefill_ranks:
            for d in self.decode_ranks:
                check_compatible(hs[p], hs[d])
        handles = {d: self.actors[d] for d in self.decode_ranks}
        for line in ray.get([a.start.remote(self.codec, handles if r in self.prefill_ranks else {},
                                            c.transfer_timeout_s, c.kv_fault_rate, ring=self._ring_of(r))
                             for r, a in self.actors.items()] + [h.start.remote(self.codec, {})
                                                                 for h in self.helpers.values()]):
            self.log(f"  {line}")
        self._set_costs(gpu=use_gpu)

    def _ring_of(self, rank: int) -> dict | None:
        """A prefill worker's helpers (ranks P + D + p*(cp-1) ..., as kvtransfer.channel numbers them)."""
        c = self.cfg
        if c.prefill_cp == 1 or rank not in self.prefill_ranks:
            return None
        first = c.num_prefill + c.num_decode + rank * (c.prefill_cp - 1)
        return {"helpers": [self.helpers[first + j] for j in range(c.prefill_cp - 1)],
                "min_tokens": c.prefill_cp_min_tokens}

    # ------------------------------------------------------------------ AsyncEngine interface
    @property
    def healthy(self) -> bool:
        """False after a fatal error, or while no decode worker is alive (/health answers 503)."""
        return self.error is None and bool(self._tasks) and self.dispatcher.any_decode_alive

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll_outputs(r)) for r in self.actors]
        self._tasks.append(loop.create_task(self._poll_loads()))

    def stop(self, timeout: float = 10.0) -> None:
        for t in self._tasks:
            t.cancel()
        live = [a for r, a in self.actors.items() if r not in self.dispatcher.dead]
        try:
            ray.get([a.stop.remote() for a in live], timeout=timeout)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        for a in [*self.actors.values(), *self.helpers.values()]:
            ray.kill(a)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
        if self._started_ray:
            ray.shutdown()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       predicted_len: float | None = None) -> AsyncIterator[RequestOutput]:
        """Dispatch, then stream; on a worker death or a failed transfer, dispatch again with the prompt
        plus what was generated so far (prefilled on a live decode worker), so the stream continues.
        Ends with an error after MAX_ATTEMPTS, or at once when no decode worker is left."""
        if not self.healthy:
            raise EngineDeadError(self.error or "cluster is not running (no live decode worker)")
        predicted = predicted_len if predicted_len is not None else float(params.max_tokens)
        st = _Stream(request_id, list(prompt_ids), params, predicted,
                     IncrementalDetokenizer(self.tok, prompt_ids, params.stop))
        HopTimes.mark(st.t, "arrive")
        try:
            while True:
                await self._start_attempt(st)
                while True:
                    out = await st.q.get()
                    if isinstance(out, _Retry):
                        self._end_attempt(st)
                        self.retries += 1
                        if st.attempt >= MAX_ATTEMPTS:
                            raise RuntimeError(f"request failed after {st.attempt} attempts: {out}")
                        break
                    if isinstance(out, BaseException):
                        raise out
                    yield out
                    if out.finished:
                        return
        finally:
            if not st.done:          # cancelled or failed: free what the current attempt holds
                self._end_attempt(st)
            self.streams.pop(st.wire_id, None)

    async def _start_attempt(self, st: _Stream) -> None:
        st.attempt += 1
        st.wire_id = st.request_id if st.attempt == 1 else f"{st.request_id}#{st.attempt}"
        st.decode_rank = st.prefill_rank = None
        st.first_seen, st.buffered = False, []
        self.streams[st.wire_id] = st
        ids = st.prompt_ids + st.token_ids             # a replay continues from what the client has
        params = replace(st.params, max_tokens=st.params.max_tokens - st.num_out)
        predicted = max(1.0, st.predicted - st.num_out)
        keys = self.dispatcher.keys(ids, params.cache_salt)
        rank, local = await self.dispatcher.acquire(st.wire_id, len(ids), predicted, params.max_tokens,
                                                    self._reserve, force_local=bool(st.token_ids),
                                                    prompt_ids=ids, cache_salt=params.cache_salt, keys=keys)
        st.decode_rank = rank
        if local or st.attempt > 1:
            st.t.clear()                      # only a first, remote prefill has a handoff to time
        else:
            HopTimes.mark(st.t, "dispatched")
        held = self.dispatcher.dest_cached.pop(st.wire_id, 0)     # prompt tokens d holds: not transferred
        msg = encode(PrefillRequest(st.wire_id, ids, params_to_dict(params), rank, predicted, held))
        try:
            if local:
                st.first_seen = True          # every token comes from the decode worker
                self.local_prefills += 1
                await self.actors[rank].control.remote(msg)
            else:
                st.prefill_rank = self.dispatcher.pick_prefill(keys, len(ids))
                self.dispatcher.bump(st.prefill_rank, tokens=len(ids))
                self.dispatcher.holds(st.prefill_rank, keys)
                await self.actors[st.prefill_rank].submit.remote(msg)
                if st.t:
                    HopTimes.mark(st.t, "sent")
        except ray.exceptions.RayError as e:
            self._mark_dead(st.prefill_rank if st.prefill_rank is not None else rank, e)

    def _end_attempt(self, st: _Stream) -> None:
        """Free what the current attempt holds on the workers still alive (best effort)."""
        self.streams.pop(st.wire_id, None)
        for r in (st.decode_rank, st.prefill_rank):
            if r is not None and r not in self.dispatcher.dead:
                self.actors[r].abort.remote(st.wire_id)

    async def _reserve(self, rank: int, msg: Reserve) -> ReserveReply:
        try:
            return decode(await self.actors[rank].reserve.remote(encode(msg)), ReserveReply)
        except ray.exceptions.RayError as e:
            self._mark_dead(rank, e)
            raise

    # ------------------------------------------------------------------ failures
    def _mark_dead(self, rank: int, err: BaseException | str) -> None:
        """A worker is gone: stop sending it work, and re-dispatch every request it touched."""
        if rank in self.dispatcher.dead:
            return
        self.dispatcher.dead.add(rank)
        self.dispatcher.loads.pop(rank, None)
        if self.dispatcher.prefix is not None:
            self.dispatcher.prefix.drop(rank)
        role = "prefill" if rank in self.prefill_ranks else "decode"
        self.log(f"  {role} worker {rank} died: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        for st in list(self.streams.values()):
            # A prefill worker's death matters until the decode worker has shown it holds the
            # request: the prefill sends TransferPlan and PlanDone before the first token, but on
            # other paths (Ray calls from its process, the token through our output poll), so a
            # killed process can lose the former after the latter reached us. Until a token came
            # from the decode worker, retry (a request it did hold is aborted there and replayed).
            # A remote prefill is only ever a first token's source (an attempt with tokens already
            # prefills locally), so "no token from the decode worker yet" is num_out <= 1.
            hit = rank == st.decode_rank or (rank == st.prefill_rank and st.num_out <= 1)
            if hit and not st.done:
                st.q.put_nowait(_Retry(f"{role} worker {rank} died"))
        self.recovery.on_death(rank)

    def readmit(self, rank: int) -> None:
        """A restarted worker rejoined (recovery.py): route to it again and poll its outputs."""
        self.dispatcher.dead.discard(rank)
        self._tasks.append(asyncio.get_running_loop().create_task(self._poll_outputs(rank)))

    # ------------------------------------------------------------------ output path
    async def _poll_outputs(self, rank: int) -> None:
        actor = self.actors[rank]
        try:
            while rank not in self.dispatcher.dead:
                for m in decode_many(await actor.take_outputs.remote(0.2), TokenOutput):
                    self._route(rank, m)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a dead worker's requests are re-dispatched
            self._mark_dead(rank, e)

    def _route(self, rank: int, m: TokenOutput) -> None:
        st = self.streams.get(m.request_id)
        if st is None or st.done:
            return
        if m.finish_reason == "retry":       # a failed transfer: the KV never became usable
            st.q.put_nowait(_Retry(m.error or "KV transfer failed"))
            return
        if m.error or m.finish_reason == "error":
            st.done = True
            st.q.put_nowait(RuntimeError(m.error or "request failed"))
            self._end_attempt(st)
            return
        from_prefill = rank == st.prefill_rank
        if not from_prefill and not st.first_seen:
            st.buffered.append(m)      # the decode side overtook the prefill's first token
            return
        if from_prefill:               # that prompt left the prefill queue (before _emit counts the token)
            self.dispatcher.prefill_done(rank, len(st.prompt_ids) + st.num_out)
        self._emit(st, m)
        if from_prefill:
            st.first_seen = True
            for b in st.buffered:
                self._emit(st, b)
            st.buffered.clear()

    def _emit(self, st: _Stream, m: TokenOutput) -> None:
        if st.done:
            return
        reason = FinishReason(m.finish_reason) if m.finish_reason else None
        for t in m.new_token_ids:
            st.detok.add(t)
        st.token_ids.extend(m.new_token_ids)
        if "sent" in st.t:                  # a remote prefill's handoff, not yet recorded
            HopTimes.mark(st.t, "first")
            if st.num_out >= 2:
                HopTimes.mark(st.t, "second")
            if st.num_out >= 2 or m.finish_reason:
                self.hops.finish(st.t)
        if st.detok.stopped and reason is None:
            reason = FinishReason.STOP
            if st.decode_rank not in self.dispatcher.dead:
                self.actors[st.decode_rank].abort.remote(st.wire_id)
        if reason is not None:
            st.detok.flush()
            st.done = True
            # the decode worker keeps the conversation's blocks: all but the last token has KV there
            self.dispatcher.holds(st.decode_rank, self.dispatcher.keys(st.prompt_ids + st.token_ids[:-1],
                                                                       st.params.cache_salt))
        out = RequestOutput(st.request_id, list(m.new_token_ids), reason, len(st.prompt_ids), st.num_out,
                            [tuple(x) for x in m.new_logprobs], new_text=st.detok.delta(final=reason is not None))
        st.q.put_nowait(out)

    async def _poll_loads(self) -> None:
        while True:
            try:
                live = [r for r in self.actors if r not in self.dispatcher.dead]
                loads = await asyncio.gather(*[self.actors[r].load.remote() for r in live], return_exceptions=True)
                stats = await asyncio.gather(*[self.actors[r].transfer_stats.remote() for r in live],
                                             return_exceptions=True)
                for r, ld, st in zip(live, loads, stats):
                    if isinstance(ld, BaseException) or isinstance(st, BaseException):
                        self._mark_dead(r, ld if isinstance(ld, BaseException) else st)
                    else:
                        self.dispatcher.report(r, decode(ld, WorkerLoad))
                        self._worker_stats[r] = st
                await self.recovery.check_helpers()
                self._update_stats()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the router itself is broken: report it
                self.error = f"load poller failed: {type(e).__name__}: {e}"
            await asyncio.sleep(0.25)

    def _update_stats(self) -> None:
        dec = [self.loads[r] for r in self.decode_ranks if r in self.loads]
        total = sum(w.total_blocks for w in dec)
        self.stats = EngineStats(sum(w.num_running for w in dec), sum(w.num_waiting for w in dec) + sum(
            self.loads[r].num_waiting for r in self.prefill_ranks if r in self.loads),
            1 - sum(w.free_blocks for w in dec) / max(total, 1), total)
        ws = self._worker_stats
        self.transfer = {
            "bytes_raw": sum(s["bytes_raw"] for r, s in ws.items() if r in self.prefill_ranks),
            "bytes_wire": sum(s["bytes_wire"] for r, s in ws.items() if r in self.prefill_ranks),
            "seconds": sum(s["seconds"] for r, s in ws.items() if r in self.decode_ranks),
            "plans": sum(s["plans"] for r, s in ws.items() if r in self.decode_ranks),
            "failures": sum(s["failures"] for s in ws.values()),
            "local_prefills": self.local_prefills,
            "retries": self.retries,
            "dead_workers": len(self.dispatcher.dead) + len(self.recovery.dead_helpers),
            "worker_restarts": dict(self.recovery.restarts)}

    def worker_status(self) -> dict[str, str]:
        return self.recovery.status()

    def prefix_cache_stats(self) -> list[dict]:
        """Prefix-cache counters per worker for /metrics (from the workers' load reports)."""
        return [{"worker": r, "role": w.role, "queries": w.prefix_cache_queries, "hits": w.prefix_cache_hits}
                for r, w in sorted(self.loads.items())]

    # ------------------------------------------------------------------ tests and tools
    def check_integrity(self) -> None:
        """The block managers of every live worker check their own invariants."""
        ray.get([a.check_integrity.remote() for r, a in self.actors.items() if r not in self.dispatcher.dead])


def _cpu_engine(cfg: EngineConfig) -> EngineConfig:
    from dataclasses import replace
    return replace(cfg, device="cpu", use_triton=False, use_cuda_graphs=False)
