"""Prefill worker: computes prompts, samples the first token, streams the KV to decode workers.

Lifecycle of a request here (its deadline is the decode side's transfer_timeout_s, which
runs from the TransferPlan; the router's reserve deadline covers the time before):

    QUEUED (inbox) ─▶ WAITING ─▶ RUNNING (one or more prefill chunks)
        ─▶ final chunk: TransferPlan sent to the decode rank, KV streamed layer by layer
           during that step's forward, first token sampled
        ─▶ DONE: PlanDone to the decode rank, TokenOutput(first token) to the router,
           blocks freed (the send buffers hold their own copy of the KV)
        ─▶ or, when a send to the decode rank raised (the peer is gone): "retry" to the
           router instead, which dispatches the request again; the batch's other plans go on
    An abort (client gone, or the router gave up on the attempt) frees it in any state.

A prompt longer than the step budget is prefilled in chunks over several steps; only
its final chunk's step streams KV, and then the whole prompt's KV for each layer.
The worker runs on one thread (`run_step` in a loop); `submit` and `take_outputs` are
safe to call from others.
"""
from __future__ import annotations

import queue
import time
from collections import defaultdict
from dataclasses import replace
from typing import Callable

from decode.block_manager import BlockManager
from decode.scheduler import Scheduler
from disagg.config import EngineConfig, ModelConfig
from disagg.engine.model_runner import ModelRunner
from disagg.messages import Outbox, PlanDone, PrefillRequest, TokenOutput, TransferPlan, WorkerLoad, params_from_dict
from disagg.request import Request
from kvtransfer.transfer import KVSender, _SendPlan, slot_mapping


class PrefillWorker:
    def __init__(self, cfg: EngineConfig, rank: int, channel, codec,
                 send_control: Callable[[int, object], None], tp=None, reshard=None):
        """send_control(dest_rank, message) delivers a TransferPlan / PlanDone to a decode rank,
        in call order per destination (the deploy layer provides it). tp: a TPLeader when this worker
        spans a tensor-parallel group (disagg/engine/tp_group.py); reshard: the KV routes when either
        end is tensor-parallel (kvtransfer/reshard.py)."""
        self.cfg = cfg
        self.rank = rank
        self.model_cfg = ModelConfig.from_dir(cfg.model_dir)
        self.max_model_len = cfg.scheduler.max_model_len or self.model_cfg.max_position_embeddings
        self.runner = (tp.make_runner if tp else ModelRunner)(replace(cfg, use_cuda_graphs=False), self.model_cfg,
                                                               self.max_model_len)
        lc = self.runner.model_cfg           # this rank's shard of the KV heads under TP
        self.bm = BlockManager(self.runner.num_blocks, cfg.cache.block_size,
                               enable_prefix_caching=cfg.cache.enable_prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler, self.bm, self.max_model_len)
        self.sender = (tp.make_sender if tp else KVSender)(channel, codec, lc.num_kv_heads, lc.head_dim,
                                                           routes=reshard.send_routes if reshard else None)
        self.codec = codec
        self.send_control = send_control
        self.dest: dict[str, int] = {}
        self.dest_cached: dict[str, int] = {}    # leading prompt tokens the decode side holds: not sent
        self.orig_params: dict[str, dict] = {}
        self.next_plan_id: dict[int, int] = defaultdict(int)
        self.inbox: queue.Queue = queue.Queue()
        self.outbox = Outbox()
        self.s_per_token = 0.0      # moving average of step seconds per prompt token (steps of >= 64 tokens)
        self.prompts_done = 0

    # ------------------------------------------------------------------ cross-thread API
    def submit(self, msg: PrefillRequest) -> None:
        self.inbox.put(("add", msg))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def take_outputs(self, timeout: float = 0.5) -> list[TokenOutput]:
        return self.outbox.take(timeout)

    def _emit(self, items: list[TokenOutput]) -> None:
        self.prompts_done += sum(1 for t in items if t.new_token_ids)   # first tokens, counted before they go out
        self.outbox.put(items)

    def load(self) -> WorkerLoad:
        queued = sum(r.num_tokens - r.num_computed_tokens for r in list(self.scheduler.waiting))
        queued += sum(r.num_tokens - r.num_computed_tokens for r in list(self.scheduler.running))
        pc = self.scheduler.prefix_stats
        return WorkerLoad(self.rank, "prefill", self.scheduler.num_running, self.scheduler.num_waiting + self.inbox.qsize(),
                          queued, self.bm.num_free_blocks, self.bm.num_blocks, prefill_s_per_token=self.s_per_token,
                          prefix_cache_queries=pc.queries, prefix_cache_hits=pc.hits,
                          num_prompts_done=self.prompts_done)

    # ------------------------------------------------------------------ engine thread
    def _drain_inbox(self, block: bool) -> None:
        errors = []
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
            while True:
                kind, payload = item
                if kind == "add":
                    m: PrefillRequest = payload
                    params = params_from_dict(m.params)
                    req = Request(m.request_id, list(m.prompt_token_ids), replace(params, max_tokens=1))
                    try:
                        self.scheduler.add(req)
                        self.dest[m.request_id] = m.dest_rank
                        self.dest_cached[m.request_id] = m.num_dest_cached_tokens
                        self.orig_params[m.request_id] = m.params
                    except ValueError as e:
                        errors.append(TokenOutput(m.request_id, [], len(m.prompt_token_ids), 0, "error", error=str(e)))
                elif kind == "abort":
                    if self.scheduler.abort(payload) is not None:
                        self.dest.pop(payload, None)
                        self.dest_cached.pop(payload, None)
                        self.orig_params.pop(payload, None)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        self._emit(errors)

    def run_step(self) -> None:
        self._drain_inbox(block=not self.scheduler.has_unfinished())
        self.sender.reap()
        sched = self.scheduler.schedule()
        if not sched:
            return
        # Requests whose prompt completes in this step, grouped by destination, in batch order.
        finishing: dict[int, list] = defaultdict(list)
        for s in sched.scheduled:
            if s.samples:
                finishing[self.dest[s.request.request_id]].append(s)
        plans, sends = {}, []
        for dest, items in finishing.items():
            pid = self.next_plan_id[dest]
            self.next_plan_id[dest] += 1
            rids = [s.request.request_id for s in items]
            # positions start..P-1: the decode worker already holds the first `start` (prefix cache)
            starts = [min(self.dest_cached.get(r, 0), s.request.num_prompt_tokens - 1) for r, s in zip(rids, items)]
            ntok = [s.request.num_prompt_tokens - st for s, st in zip(items, starts)]
            plans[dest] = (pid, rids, items)
            self.send_control(dest, TransferPlan(self.rank, pid, rids, ntok, self.codec.name, start_tokens=starts))
            slots = slot_mapping([s.block_table for s in items], ntok, self.bm.block_size, self.runner.device,
                                 starts=starts)
            sends.append(_SendPlan(dest, slots))
        self.sender.begin(sends)
        t0 = time.perf_counter()
        try:
            result = self.runner.execute(sched, layer_hook=self.sender.on_layer)
        finally:
            self.sender.end()
        if (n := sched.num_batched_tokens) >= 64:   # sampled tokens are on the host: the step is done
            rate = (time.perf_counter() - t0) / n
            self.s_per_token = rate if not self.s_per_token else 0.8 * self.s_per_token + 0.2 * rate
        finished = self.scheduler.update(sched, result.sampled)
        outs = []
        failed = {sp.dest for sp in sends if sp.failed}
        for dest, (pid, rids, items) in plans.items():
            if dest in failed:               # the decode peer is gone: the router re-dispatches these
                outs.extend(TokenOutput(r, [], 0, 0, "retry", error=f"KV send to rank {dest} failed")
                            for r in rids)
                continue
            first = [result.sampled[r] for r in rids]
            self.send_control(dest, PlanDone(self.rank, pid, first, [self.orig_params[r] for r in rids],
                                             [s.request.prompt_token_ids for s in items]))
            for s, tok in zip(items, first):
                lp = result.logprobs.get(s.request.request_id)
                outs.append(TokenOutput(s.request.request_id, [tok], s.request.num_prompt_tokens, 1, None,
                                        [list(lp)] if lp is not None else []))
        for req in finished:
            self.dest.pop(req.request_id, None)
            self.dest_cached.pop(req.request_id, None)
            self.orig_params.pop(req.request_id, None)
        self._emit(outs)

    def reset_peer(self, dest: int, epoch: int = 0) -> None:
        """Decode rank `dest` restarted (called between steps) under `epoch`: its new process numbers
        plans from 0, and a request still bound for its old process is retried by the router
        (normally the router has aborted them all already). A decode worker sends this side no
        transfer messages, so there is no epoch to check here."""
        self.next_plan_id[dest] = 0
        for rid in [r for r, d in self.dest.items() if d == dest]:
            if self.scheduler.abort(rid) is not None:
                self._emit([TokenOutput(rid, [], 0, 0, "retry", error=f"decode rank {dest} restarted")])
            self.dest.pop(rid, None)
            self.dest_cached.pop(rid, None)
            self.orig_params.pop(rid, None)

    def shutdown(self) -> None:
        self.sender.reap(block=True)
