"""A disaggregated cluster on Ray, seen by the HTTP server as one engine.

`DisaggEngine` has the AsyncEngine interface (start/stop/healthy/stats/generate), so
router/server.py serves both modes. Bring-up:

    ray.init (local, or --address) -> placement group, one bundle per worker (GPU or CPU)
    -> actors -> rank 0 picks the store address -> all ranks join torch.distributed
    -> handshakes checked pairwise -> link bandwidth and codec speed measured
    -> codec chosen (--kv-codec auto) -> worker loops start -> output pollers start

A request (router side), in the ordering policy's order over the requests waiting here:
pick a decode worker (most free KV after reserving the predicted length, net of what its
ledger already promised; 503 if none has room before the deadline, 400 at once if the
prompt can never fit) -> conditional disaggregation (router.policy.should_prefill_locally:
the transfer costs more than computing the prompt where it will be decoded, or there is
no prefill pool) -> either PrefillRequest to the decode worker itself, which streams every
token, or Reserve there and PrefillRequest to the prefill worker with the fewest queued
prompt tokens, whose first token comes back from the prefill side and the rest from the
decode side. The router detokenizes and applies stop strings (and then aborts the decode
side). `--prefill 0` makes every decode worker a colocated replica behind this router.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

import ray

from disagg.config import EngineConfig, ModelConfig
from disagg.deploy.actor import WorkerActor
from disagg.deploy.config_codec import engine_config_to_dict
from disagg.engine.async_engine import EngineDeadError, EngineStats
from disagg.engine.detokenizer import IncrementalDetokenizer
from disagg.messages import (PrefillRequest, Reserve, ReserveReply, TokenOutput, WorkerLoad, decode, decode_many,
                             encode, params_to_dict)
from disagg.model.tokenizer import Tokenizer
from disagg.request import FinishReason, RequestOutput, SamplingParams
from kvtransfer.codec_select import AUTO_CANDIDATES, choose_codec
from kvtransfer.handshake import check_compatible
from router.policy import (QueueItem, blocks_for, decode_preference, make_ordering, pick_prefill, reserved_blocks,
                           should_prefill_locally)


@dataclass(frozen=True)
class ClusterConfig:
    engine: EngineConfig
    num_prefill: int = 1
    num_decode: int = 1
    kv_codec: str = "auto"
    address: str | None = None          # existing Ray cluster; None starts a local one
    reserve_timeout_s: float = 30.0     # how long a request may wait for decode KV before a 503
    use_gpus: bool | None = None        # None: when the Ray cluster has GPUs
    local_prefill: str = "auto"         # auto: cost-based (should_prefill_locally); never; always
    local_prefill_threshold: int = 256  # prompt tokens that ride along a decode step almost free
    prefill_cp: int = 1                 # GPUs per prefill worker: prompts >= prefill_cp_min_tokens use ring attention
    prefill_cp_min_tokens: int = 4096

    def __post_init__(self):
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError("--prefill must be at least 0 and --decode at least 1")
        if self.kv_codec not in ("auto", "none", "fp8", "int8", "int4"):
            raise ValueError("--kv-codec must be one of none, fp8, int8, int4, auto")
        if self.local_prefill not in ("auto", "never", "always"):
            raise ValueError("--local-prefill must be one of auto, never, always")
        if self.num_prefill == 0 and self.local_prefill == "never":
            raise ValueError("--local-prefill never needs a prefill pool (--prefill >= 1)")
        if self.local_prefill_threshold < 0:
            raise ValueError("--local-prefill-threshold must be >= 0")
        if self.prefill_cp < 1 or self.prefill_cp_min_tokens < 1:
            raise ValueError("--prefill-cp and --prefill-cp-min-tokens must be at least 1")


@dataclass
class _Stream:
    request_id: str
    prompt_len: int
    detok: IncrementalDetokenizer
    max_tokens: int
    q: asyncio.Queue = field(default_factory=asyncio.Queue)
    decode_rank: int | None = None
    prefill_rank: int | None = None     # None: prefilled on the decode worker (or not dispatched yet)
    first_seen: bool = False
    buffered: list = field(default_factory=list)
    num_out: int = 0
    done: bool = False


class DisaggEngine:
    def __init__(self, cfg: ClusterConfig, tokenizer: Tokenizer, log=print):
        self.cfg = cfg
        self.tok = tokenizer
        self.log = log
        self.error: str | None = None
        self.codec: str | None = None
        self.link: dict = {}
        self.streams: dict[str, _Stream] = {}
        self.loads: dict[int, WorkerLoad] = {}
        self.stats = EngineStats(0, 0, 0.0, 0)
        self.transfer: dict[str, float] = {}
        self._tasks: list[asyncio.Task] = []
        self._ids = itertools.count()
        self._started_ray = False
        self._waiting: dict[str, QueueItem] = {}
        self.local_prefills = 0
        self.codec_ratio = 1.0
        self.pg = None
        self.helpers: dict = {}           # rank -> context-parallel helper actor (no router traffic)
        mc = ModelConfig.from_dir(cfg.engine.model_dir)
        self._kv_bytes_per_token = mc.kv_bytes_per_token(cfg.engine.torch_dtype)   # raw; the codec scales it
        self._num_params = mc.num_params
        sc = cfg.engine.scheduler
        self.ordering = make_ordering(sc.ordering, **({} if sc.ordering == "fcfs" else dict(
            aging_rate=sc.aging_rate, max_wait_s=sc.max_wait_s)))

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
        use_gpu = c.use_gpus if c.use_gpus is not None else gpus >= c.num_prefill * c.prefill_cp + c.num_decode
        n = c.num_prefill * c.prefill_cp + c.num_decode     # ranks P+D.. : the prefill workers' ring helpers
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
            role = ("prefill" if rank < c.num_prefill else "decode" if rank < c.num_prefill + c.num_decode
                    else "prefill_cp")
            if use_gpu:
                opts = dict(num_gpus=1, num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=rank))
            else:         # CPU workers: nothing to pin; they share the host's cores
                opts = dict(num_gpus=0, num_cpus=0)
            self.actors[rank] = WorkerActor.options(**opts).remote(role, rank)
        self.prefill_ranks = list(range(c.num_prefill))
        self.decode_ranks = list(range(c.num_prefill, c.num_prefill + c.num_decode))
        init = ray.get(self.actors[0].address.remote(c.address is None))
        threads = 0 if use_gpu else 1
        for line in ray.get([a.setup.remote(engine_config_to_dict(ecfg), c.num_prefill, c.num_decode, init, threads,
                                            c.prefill_cp) for a in self.actors.values()]):
            self.log(f"  {line}")
        self.helpers = {r: self.actors.pop(r) for r in range(c.num_prefill + c.num_decode, n)}
        self._choose_codec()
        hs = {r: decode(b) for r, b in zip(self.actors, ray.get([a.handshake.remote(self.codec)
                                                                  for a in self.actors.values()]))}
        for p in self.prefill_ranks:
            for d in self.decode_ranks:
                check_compatible(hs[p], hs[d])
        handles = {d: self.actors[d] for d in self.decode_ranks}
        for line in ray.get([a.start.remote(self.codec, handles if r in self.prefill_ranks else {},
                                            ring=self._ring_of(r))
                             for r, a in self.actors.items()] + [h.start.remote(self.codec, {})
                                                                 for h in self.helpers.values()]):
            self.log(f"  {line}")

    def _ring_of(self, rank: int) -> dict | None:
        """A prefill worker's helpers (ranks P + D + p*(cp-1) ..., as kvtransfer.channel numbers them)."""
        c = self.cfg
        if c.prefill_cp == 1 or rank not in self.prefill_ranks:
            return None
        first = c.num_prefill + c.num_decode + rank * (c.prefill_cp - 1)
        return {"helpers": [self.helpers[first + j] for j in range(c.prefill_cp - 1)],
                "min_tokens": c.prefill_cp_min_tokens}

    def _choose_codec(self) -> None:
        c = self.cfg
        if not self.prefill_ranks:       # colocated replicas: no KV moves
            self.codec, self.codec_ratio = "none", 1.0
            self.log("  no prefill pool: every decode worker prefills its own requests")
            return
        p, d = self.prefill_ranks[0], self.decode_ranks[0]
        nbytes = 64 * 2**20 if c.use_gpus is not False else 16 * 2**20
        bw = ray.get([self.actors[p].measure_bandwidth.remote(d, nbytes),
                      self.actors[d].measure_bandwidth.remote(p, nbytes)])[0]
        self.link = {"pair": [p, d], "bandwidth_bytes_per_s": bw}
        if c.kv_codec != "auto":
            self.codec = c.kv_codec
            self._set_codec_ratio()
            self.log(f"  KV link {p}->{d}: {bw / 1e9:.2f} GB/s; codec {self.codec} (as asked)")
            return
        speeds = ray.get(self.actors[p].codec_speed.remote(list(AUTO_CANDIDATES), 2048))
        self.codec, times = choose_codec(speeds, bw)
        self._set_codec_ratio()
        self.link["handoff_s"] = times
        self.log(f"  KV link {p}->{d}: {bw / 1e9:.2f} GB/s; per-layer handoff "
                 + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()) + f" -> codec {self.codec}")

    def _set_codec_ratio(self) -> None:
        from kvtransfer.codec import get_codec
        mc = ModelConfig.from_dir(self.cfg.engine.model_dir)
        self.codec_ratio = get_codec(self.codec).compression_ratio((2, 1024, mc.num_kv_heads, mc.head_dim),
                                                                   self.cfg.engine.torch_dtype)

    # ------------------------------------------------------------------ AsyncEngine interface
    @property
    def healthy(self) -> bool:
        return self.error is None and bool(self._tasks)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll_outputs(r)) for r in self.actors]
        self._tasks.append(loop.create_task(self._poll_loads()))

    def stop(self, timeout: float = 10.0) -> None:
        for t in self._tasks:
            t.cancel()
        try:
            ray.get([a.stop.remote() for a in self.actors.values()], timeout=timeout)
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
        if not self.healthy:
            raise EngineDeadError(self.error or "cluster is not running")
        st = _Stream(request_id, len(prompt_ids), IncrementalDetokenizer(self.tok, prompt_ids, params.stop),
                     params.max_tokens)
        self.streams[request_id] = st
        try:
            predicted = predicted_len if predicted_len is not None else float(params.max_tokens)
            st.decode_rank, local = await self._dispatch(request_id, len(prompt_ids), predicted, params.max_tokens)
            msg = PrefillRequest(request_id, list(prompt_ids), params_to_dict(params), st.decode_rank, predicted)
            if local:
                st.first_seen = True          # every token comes from the decode worker
                self.local_prefills += 1
                await self.actors[st.decode_rank].control.remote(encode(msg))
            else:
                st.prefill_rank = pick_prefill([self.loads[r] for r in self.prefill_ranks if r in self.loads]) \
                    if all(r in self.loads for r in self.prefill_ranks) \
                    else self.prefill_ranks[next(self._ids) % len(self.prefill_ranks)]
                self._bump_load(st.prefill_rank, tokens=len(prompt_ids))
                await self.actors[st.prefill_rank].submit.remote(encode(msg))
            while True:
                out = await st.q.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            self.streams.pop(request_id, None)
            if not st.done:          # cancelled or failed: free both sides
                if st.decode_rank is not None:
                    self.actors[st.decode_rank].abort.remote(request_id)
                if st.prefill_rank is not None:
                    self.actors[st.prefill_rank].abort.remote(request_id)

    # ------------------------------------------------------------------ dispatch
    async def _dispatch(self, rid: str, prompt_len: int, predicted: float, max_tokens: int) -> tuple[int, bool]:
        """(decode rank, prefill it there?) once a decode worker has room for this request, taken in
        the router's ordering (FCFS, or shortest-predicted-first with aging) over every request
        waiting here. 400 at once if the prompt can never fit; 503 after the reserve deadline."""
        now = time.monotonic()
        self._waiting[rid] = QueueItem(rid, now, prompt_len, predicted)
        deadline = now + self.cfg.reserve_timeout_s
        delay = 0.005
        bs = self.cfg.engine.cache.block_size
        need_prompt = blocks_for(prompt_len + 1, bs)
        try:
            while True:
                self._check_fits(need_prompt)
                items = list(self._waiting.values())
                head = items[self.ordering.pick(items, time.monotonic())].request_id
                if head == rid:      # strict order: only the policy's choice may take capacity
                    loads = [self.loads.get(r) or WorkerLoad(r, "decode", 0, 0, 0, 1 << 30, 1 << 30)
                             for r in self.decode_ranks]
                    # Room for the prediction net of each worker's ledger; failing that, for the prompt.
                    prefs = decode_preference(loads, prompt_tokens=prompt_len, predicted_len=predicted,
                                              block_size=bs, committed={w.rank: w.committed_blocks for w in loads}) \
                        or decode_preference(loads, need_prompt)
                    promise = reserved_blocks(prompt_len, predicted, 0, bs, max_tokens=max_tokens)
                    for rank in prefs:
                        if self._prefill_here(prompt_len, rank):
                            self._bump_load(rank, tokens=prompt_len, committed=promise)
                            return rank, True
                        reply = decode(await self.actors[rank].reserve.remote(encode(
                            Reserve(rid, prompt_len, predicted, max_tokens))), ReserveReply)
                        self._bump_load(rank, free_blocks=reply.free_blocks,
                                        committed=promise - need_prompt if reply.ok else 0)
                        if reply.ok:
                            return rank, False
                if time.monotonic() > deadline:
                    from router.openai_api import APIError
                    raise APIError(503, "no decode worker has KV-cache room for this request; retry later",
                                   "server_error", headers={"Retry-After": "2"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
        finally:
            self._waiting.pop(rid, None)

    def _check_fits(self, need_blocks: int) -> None:
        """A prompt bigger than every decode worker's whole KV cache can never run: 400 now."""
        totals = [self.loads[r].total_blocks for r in self.decode_ranks if r in self.loads]
        if len(totals) == len(self.decode_ranks) and need_blocks > max(totals):
            from router.openai_api import APIError
            bs = self.cfg.engine.cache.block_size
            raise APIError(400, f"the prompt needs {need_blocks * bs} tokens of KV cache; the largest decode "
                                f"worker holds {max(totals) * bs}", "invalid_request_error", param="messages")

    def _prefill_here(self, prompt_len: int, rank: int) -> bool:
        """Conditional disaggregation (router.policy.should_prefill_locally), from the workers'
        reported loads, their measured prefill cost and the measured link."""
        mode = self.cfg.local_prefill
        if not self.prefill_ranks or mode == "always":
            return True
        if mode == "never" or rank not in self.loads:
            return False
        pl = [self.loads[r] for r in self.prefill_ranks if r in self.loads]
        if not pl:
            return False
        c = max(w.prefill_s_per_token for w in pl) or self._default_prefill_s_per_token()
        x = self._kv_bytes_per_token / self.codec_ratio / max(self.link.get("bandwidth_bytes_per_s", 0), 1.0)
        return should_prefill_locally(prompt_len, self.loads[rank], pl, x, c, self.cfg.local_prefill_threshold)

    def _default_prefill_s_per_token(self) -> float:
        """Before any prefill was measured: 2 FLOPs per parameter per token at a modest rate."""
        rate = 2e14 if self.cfg.use_gpus is not False and self.pg is not None else 5e10
        return 2 * self._num_params / rate

    def _bump_load(self, rank: int, tokens: int = 0, free_blocks: int | None = None, committed: int = 0) -> None:
        """Until the worker's next report, count what was just sent or promised to it."""
        w = self.loads.get(rank)
        if w is not None:
            self.loads[rank] = replace(w, num_waiting=w.num_waiting + (tokens > 0),
                                       queued_prompt_tokens=w.queued_prompt_tokens + tokens,
                                       free_blocks=w.free_blocks if free_blocks is None else free_blocks,
                                       committed_blocks=w.committed_blocks + max(committed, 0))

    # ------------------------------------------------------------------ output path
    async def _poll_outputs(self, rank: int) -> None:
        actor = self.actors[rank]
        try:
            while True:
                for m in decode_many(await actor.take_outputs.remote(0.2), TokenOutput):
                    self._route(rank, m)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a dead worker fails its requests, the cluster reports it
            self.error = f"worker {rank} failed: {type(e).__name__}: {e}"
            for st in list(self.streams.values()):
                if rank in (st.decode_rank, st.prefill_rank) and not st.done:
                    st.done = True
                    st.q.put_nowait(EngineDeadError(self.error))

    def _route(self, rank: int, m: TokenOutput) -> None:
        st = self.streams.get(m.request_id)
        if st is None or st.done:
            return
        if m.error or m.finish_reason == "error":
            st.done = True
            st.q.put_nowait(RuntimeError(m.error or "request failed"))
            if st.decode_rank is not None:
                self.actors[st.decode_rank].abort.remote(m.request_id)
            return
        from_prefill = rank in self.prefill_ranks
        if not from_prefill and not st.first_seen:
            st.buffered.append(m)      # the decode side overtook the prefill's first token
            return
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
        st.num_out += len(m.new_token_ids)
        if st.detok.stopped and reason is None:
            reason = FinishReason.STOP
            self.actors[st.decode_rank].abort.remote(st.request_id)
        if reason is not None:
            st.detok.flush()
            st.done = True
        out = RequestOutput(st.request_id, list(m.new_token_ids), reason, st.prompt_len, st.num_out,
                            [tuple(x) for x in m.new_logprobs], new_text=st.detok.delta(final=reason is not None))
        st.q.put_nowait(out)

    async def _poll_loads(self) -> None:
        while True:
            try:
                refs = {r: a.load.remote() for r, a in self.actors.items()}
                for r, ref in refs.items():
                    self.loads[r] = decode(await ref, WorkerLoad)
                dec = [self.loads[r] for r in self.decode_ranks]
                total = sum(w.total_blocks for w in dec)
                self.stats = EngineStats(sum(w.num_running for w in dec), sum(w.num_waiting for w in dec) + sum(
                    self.loads[r].num_waiting for r in self.prefill_ranks),
                    1 - sum(w.free_blocks for w in dec) / max(total, 1), total)
                stats = await asyncio.gather(*[self.actors[r].transfer_stats.remote() for r in self.actors])
                self.transfer = {
                    "bytes_raw": sum(s["bytes_raw"] for s, r in zip(stats, self.actors) if r in self.prefill_ranks),
                    "bytes_wire": sum(s["bytes_wire"] for s, r in zip(stats, self.actors) if r in self.prefill_ranks),
                    "seconds": sum(s["seconds"] for s, r in zip(stats, self.actors) if r in self.decode_ranks),
                    "plans": sum(s["plans"] for s, r in zip(stats, self.actors) if r in self.decode_ranks),
                    "failures": sum(s["failures"] for s in stats),
                    "local_prefills": self.local_prefills}
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self.error = f"cannot reach a worker: {type(e).__name__}: {e}"
            await asyncio.sleep(0.25)

    # ------------------------------------------------------------------ tests and tools
    def check_integrity(self) -> None:
        ray.get([a.check_integrity.remote() for a in self.actors.values()])


def _cpu_engine(cfg: EngineConfig) -> EngineConfig:
    from dataclasses import replace
    return replace(cfg, device="cpu", use_triton=False, use_cuda_graphs=False)
