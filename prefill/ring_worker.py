"""A prefill worker spanning a context-parallel group: the leader and its helpers.

    router ──PrefillRequest──▶ leader (prefill rank p)          helpers (one GPU each, same weights)
                                 │ prompt >= min_tokens?
                                 ├─ no:  PrefillWorker.run_step, on this GPU alone (as before)
                                 └─ yes: RING
    RING:  blocks for the whole prompt ─▶ TransferPlan to the decode rank ─▶ RingStep(ids) to every
           helper (Ray, msgpack) ─▶ all cp ranks run ring_prefill on their zigzag slices; every
           slice's KV passes through the leader's ring and lands in its cache; after each layer
           the leader's KVSender streams that layer's whole-prompt KV to the decode rank
           ─▶ the leader samples the first token (it holds the prompt's last position)
           ─▶ PlanDone + TokenOutput(first token), blocks freed

The decode side sees an ordinary prefill worker. Ring prompts run one at a time, each as a
step of its own between the leader's ordinary steps; they wait (in order) for KV blocks.
"""
from __future__ import annotations

import queue
from collections import deque
from dataclasses import replace
from typing import Callable

import torch

from decode.sampler import sample
from disagg.config import EngineConfig, ModelConfig
from disagg.engine.model_runner import ModelRunner
from disagg.messages import PlanDone, PrefillRequest, RingStep, TokenOutput, TransferPlan, WorkerLoad, params_from_dict
from kvtransfer.transfer import _SendPlan, slot_mapping
from prefill.ring_prefill import ring_prefill
from prefill.worker import PrefillWorker


class RingPrefillWorker(PrefillWorker):
    """The leader of a context-parallel prefill group (group rank 0)."""

    def __init__(self, cfg: EngineConfig, rank: int, channel, codec, send_control: Callable[[int, object], None],
                 group, send_ring_step: Callable[[RingStep], None], min_tokens: int):
        """group: the torch.distributed group {leader, helpers}; send_ring_step(msg) delivers a RingStep
        to every helper; prompts of at least min_tokens tokens are prefilled by the whole group."""
        super().__init__(cfg, rank, channel, codec, send_control)
        self.group = group
        self.send_ring_step = send_ring_step
        self.min_tokens = min_tokens
        self.ring_inbox: queue.Queue = queue.Queue()
        self.ring_waiting: deque[PrefillRequest] = deque()
        self.next_step = 0
        self.ring_prefills = 0

    def submit(self, msg: PrefillRequest) -> None:
        if self.group is not None and len(msg.prompt_token_ids) >= self.min_tokens:
            self.ring_inbox.put(("add", msg))
        else:
            super().submit(msg)

    def set_ring(self, group) -> None:
        """A new ring group (after a member restarted; steps count from 0 again, as on the helpers),
        or None: a member is gone, every prompt is prefilled here alone until the ring is re-formed."""
        self.group = group
        self.next_step = 0

    def abort(self, request_id: str) -> None:
        self.ring_inbox.put(("abort", request_id))
        super().abort(request_id)

    def load(self) -> WorkerLoad:
        w = super().load()
        ring = list(self.ring_waiting)
        return replace(w, num_waiting=w.num_waiting + len(ring) + self.ring_inbox.qsize(),
                       queued_prompt_tokens=w.queued_prompt_tokens + sum(len(m.prompt_token_ids) for m in ring))

    def run_step(self) -> None:
        try:
            while True:
                kind, payload = self.ring_inbox.get_nowait()
                if kind == "add":
                    if len(payload.prompt_token_ids) >= self.max_model_len:
                        self._emit([TokenOutput(payload.request_id, [], len(payload.prompt_token_ids), 0, "error",
                                                error=f"prompt of {len(payload.prompt_token_ids)} tokens exceeds "
                                                      f"the maximum context length of {self.max_model_len}")])
                    else:
                        self.ring_waiting.append(payload)
                else:
                    self.ring_waiting = deque(m for m in self.ring_waiting if m.request_id != payload)
        except queue.Empty:
            pass
        if self.group is None:              # the ring is down: the waiting prompts go the single-GPU way
            while self.ring_waiting:
                super().submit(self.ring_waiting.popleft())
        if self.ring_waiting and self._ring(self.ring_waiting[0]):
            self.ring_waiting.popleft()
        super().run_step()

    def _ring(self, m: PrefillRequest) -> bool:
        """Prefill one prompt across the group; False (nothing done) while its KV blocks do not fit."""
        rid, ids, S = m.request_id, list(m.prompt_token_ids), len(m.prompt_token_ids)
        if self.bm.allocate_slots(rid, S) is None:
            return False
        try:
            dest = m.dest_rank
            pid = self.next_plan_id[dest]
            self.next_plan_id[dest] += 1
            # The ring computes the whole prompt; only positions past the decode worker's cached prefix go out.
            start = min(m.num_dest_cached_tokens, S - 1)
            self.send_control(dest, TransferPlan(self.rank, pid, [rid], [S - start], self.codec.name,
                                                 start_tokens=[start]))
            dev, table, bs = self.runner.device, [self.bm.block_table(rid)], self.bm.block_size
            slots = slot_mapping(table, [S], bs, dev)
            send = _SendPlan(dest, slot_mapping(table, [S - start], bs, dev, starts=[start]))
            self.send_ring_step(RingStep(self.next_step, ids))
            self.next_step += 1
            self.sender.reap()
            self.sender.begin([send])
            try:
                with torch.inference_mode():
                    h = ring_prefill(self.runner.model, self.runner.kv_caches, torch.tensor(ids, device=dev),
                                     self.group, slots, layer_hook=self.sender.on_layer)
                    logits = self.runner.model.compute_logits(h)
            finally:
                self.sender.end()
            params = params_from_dict(m.params)
            res = sample(logits, [replace(params, max_tokens=1)], [0])
        finally:
            self.bm.free(rid)
        self.ring_prefills += 1
        if getattr(send, "failed", False):        # the decode peer is gone: the router re-dispatches it
            self._emit([TokenOutput(rid, [], 0, 0, "retry", error=f"KV send to rank {dest} failed")])
            return True
        first, lp = res.token_ids[0], res.logprobs[0]
        self.send_control(dest, PlanDone(self.rank, pid, [first], [m.params], [ids]))
        self._emit([TokenOutput(rid, [first], S, 1, None, [list(lp)] if lp is not None else [])])
        return True


class RingHelper:
    """A context-parallel helper rank: a model replica that runs its slice of each ring prefill its
    leader starts, in the leader's order. It caches nothing and talks only to its group."""

    def __init__(self, cfg: EngineConfig, rank: int, group):
        self.rank = rank
        self.group = group
        self.model_cfg = ModelConfig.from_dir(cfg.model_dir)
        max_len = cfg.scheduler.max_model_len or self.model_cfg.max_position_embeddings
        one_block = replace(cfg, use_cuda_graphs=False, cache=replace(cfg.cache, num_blocks=1))
        self.runner = ModelRunner(one_block, self.model_cfg, max_len)
        self.inbox: queue.Queue = queue.Queue()
        self.early: dict[int, RingStep] = {}
        self.next_step = 0
        self.steps = 0
        self.failed_steps = 0

    def submit(self, msg: RingStep) -> None:
        self.inbox.put(msg)

    def set_group(self, group) -> None:
        """The ring re-formed (called between steps): steps count from 0 again; older ones are void."""
        self.group = group
        self.next_step = 0
        self.early.clear()
        while not self.inbox.empty():
            self.inbox.get_nowait()

    def run_step(self) -> None:
        try:
            msg = self.inbox.get(timeout=0.05)
        except queue.Empty:
            return
        self.early[msg.step_id] = msg            # Ray may deliver two calls out of order
        while self.next_step in self.early:
            m = self.early.pop(self.next_step)
            self.next_step += 1
            r = self.runner
            try:
                ring_prefill(r.model, r.kv_caches, torch.tensor(m.prompt_token_ids, device=r.device), self.group)
            except Exception:  # noqa: BLE001 - a ring member died: wait for the ring to be re-formed
                self.failed_steps += 1
                self.early.clear()
                return
            self.steps += 1
