"""Decode worker: receives prefilled requests' KV into its paged cache and decodes them.

Lifecycle of a request here (deadlines are the router's; see router.dispatch):

    RESERVED   blocks for prompt + 1 allocated on the router's Reserve (with prefix caching, the
               longest cached prefix of the prompt is reused, and only the rest is transferred)
       │  TransferPlan from the prefill rank (processed in plan_id order per source):
       ▼  one irecv per layer posted into payload buffers
    RECEIVING  poll(): landed layers are decoded and scattered into the reserved blocks
       │  all layers landed + PlanDone (first token) arrived
       ▼
    WAITING / RUNNING in the engine's scheduler, holding its first token;
       checksum mismatch: the KV is discarded and the prompt recomputed here
       (never served from corrupt KV)
       ▼
    FINISHED   TokenOutputs streamed to the router; blocks freed

An abort while RECEIVING keeps the blocks until the plan lands (a receive in flight
still scatters into them), then frees them.

Failures (every request ends; none is served from corrupt or partial KV):
    checksum mismatch       the KV is discarded and the prompt recomputed here
    receive failed          (the prefill peer is gone) reservation freed, "retry" to the router
    not landed in time      (transfer_timeout_s) "retry" to the router at once; the blocks stay
                            held until the receives complete or fail, as for an abort
    the router re-dispatches a retried request (prompt + tokens so far) to a live worker.

A request the router chose to prefill here (conditional disaggregation: PrefillRequest
with dest_rank == this rank) skips RESERVED/RECEIVING: it joins the engine's WAITING
queue with its prompt and is prefilled in this worker's own (chunked) batches.

The reservation ledger. Reserve allocates only prompt + 1 blocks; the rest of a
request's expected KV (prompt + predicted output, router.policy.reserved_blocks) is a
promise recorded here and reported as WorkerLoad.committed_blocks = sum over live
requests of max(0, promised - held), recomputed after every step. A request that outlives
its prediction keeps running; its promise grows with what it generated (the policy's
geometric margin), so the router's view of this worker's headroom is corrected.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict

import torch

from disagg.config import EngineConfig
from disagg.engine.llm_engine import LLMEngine
from disagg.messages import (Outbox, PlanDone, PrefillRequest, Reserve, ReserveReply, TokenOutput, TransferPlan,
                             WorkerLoad, params_from_dict)
from kvtransfer.transfer import KVReceiver, slot_mapping
from router.policy import reserved_blocks


class DecodeWorker:
    def __init__(self, cfg: EngineConfig, rank: int, channel, codec, transfer_timeout_s: float = 30.0,
                 tp=None, reshard=None):
        """tp: a TPLeader when this worker spans a tensor-parallel group (disagg/engine/tp_group.py);
        reshard: the KV routes when either end is tensor-parallel (kvtransfer/reshard.py)."""
        self.rank = rank
        self.transfer_timeout_s = transfer_timeout_s
        self.engine = LLMEngine(cfg, detokenize=False, make_runner=tp.make_runner if tp else None)
        r = self.engine.runner
        lc = r.model_cfg                     # this rank's shard of the KV heads under TP
        self.receiver = (tp.make_receiver if tp else KVReceiver)(
            channel, codec, r.kernels, r.kv_caches, lc.num_kv_heads, lc.head_dim, r.dtype, r.device,
            routes=reshard.recv_routes if reshard else None)
        self.codec = codec
        self.inbox: queue.Queue = queue.Queue()
        self.outbox = Outbox()
        self._reserve_lock = threading.Lock()
        self._reserves_waiting = 0                 # Reserve calls queued on the lock (they go first)
        self._count_lock = threading.Lock()
        self.reserved: set[str] = set()
        self.aborted: set[str] = set()
        self.plans: dict[int, dict[int, TransferPlan]] = defaultdict(dict)    # src -> plan_id -> plan
        self.next_plan: dict[int, int] = defaultdict(int)
        self.peer_epoch: dict[int, int] = defaultdict(int)     # src -> epoch of its current process
        self.done_msgs: dict[tuple[int, int], PlanDone] = {}
        self.landed: dict[tuple[int, int], tuple] = {}                          # (src, pid) -> (plan, ok)
        self.fallbacks = 0
        self.local_prefills = 0
        self.ledger: dict[str, tuple[int, float, int]] = {}    # rid -> (prompt tokens, predicted, max_tokens)
        self.committed = 0                                       # engine thread writes, load() reads

    # ------------------------------------------------------------------ cross-thread API
    def reserve(self, msg: Reserve) -> ReserveReply:
        # The block manager belongs to the engine thread; reservations take this lock, and so does
        # the engine thread's step (see run_step), so the two never interleave.
        with self._count_lock:
            self._reserves_waiting += 1
        try:
            with self._reserve_lock:
                return self._reserve(msg)
        finally:
            with self._count_lock:
                self._reserves_waiting -= 1

    def _reserve(self, msg: Reserve) -> ReserveReply:
        cached = 0
        try:
            if msg.prompt_token_ids:     # reuse the prefix this worker holds: only the rest is sent
                got = self.engine.reserve_prefix(msg.request_id, list(msg.prompt_token_ids), msg.cache_salt)
                ok, cached = got is not None, got or 0
            else:
                ok = self.engine.reserve(msg.request_id, msg.num_prompt_tokens)
        except ValueError:
            ok = False
        if ok:
            self.reserved.add(msg.request_id)
            self.ledger[msg.request_id] = (msg.num_prompt_tokens, msg.predicted_len, msg.max_tokens)
        return ReserveReply(msg.request_id, ok, self.engine.block_manager.num_free_blocks, cached)

    def control(self, msg) -> None:
        """TransferPlan / PlanDone from a prefill rank, a PrefillRequest to prefill here, or an
        abort (request id string)."""
        self.inbox.put(msg)

    def take_outputs(self, timeout: float = 0.5) -> list[TokenOutput]:
        return self.outbox.take(timeout)

    def _emit(self, items: list[TokenOutput]) -> None:
        self.outbox.put(items)

    def load(self) -> WorkerLoad:
        sch, bm = self.engine.scheduler, self.engine.block_manager
        queued = sum(r.num_tokens - r.num_computed_tokens for r in list(sch.waiting))
        return WorkerLoad(self.rank, "decode", sch.num_running, sch.num_waiting + len(self.reserved), queued,
                          bm.num_free_blocks, bm.num_blocks, committed_blocks=self.committed,
                          prefix_cache_queries=sch.prefix_stats.queries, prefix_cache_hits=sch.prefix_stats.hits)

    def has_work(self) -> bool:
        return (self.engine.has_unfinished() or bool(self.receiver.pending) or not self.inbox.empty()
                or bool(self.landed))

    # ------------------------------------------------------------------ engine thread
    def _apply(self, msg) -> None:
        if isinstance(msg, (TransferPlan, PlanDone)) and msg.epoch < self.peer_epoch[msg.src_rank]:
            # from a prefill process that died and was replaced since (reset_peer): its plan ids
            # would collide with the new process's; its requests go back to the router
            if isinstance(msg, TransferPlan):
                self._give_up([r for r in msg.request_ids if r in self.reserved],
                              f"a plan from prefill rank {msg.src_rank}'s previous process")
            return
        if isinstance(msg, TransferPlan):
            self.plans[msg.src_rank][msg.plan_id] = msg
        elif isinstance(msg, PlanDone):
            self.done_msgs[(msg.src_rank, msg.plan_id)] = msg
        elif isinstance(msg, PrefillRequest):
            self._add_local(msg)
        elif isinstance(msg, str):          # abort
            self._abort(msg)

    def _abort(self, rid: str) -> None:
        if rid in self.reserved:
            self.aborted.add(rid)           # freed when its plan lands (or now, if none is in flight)
            in_flight = any(rid in p.request_ids for p in self.receiver.pending if not p.failed) or any(
                rid in p.request_ids for plans in self.plans.values() for p in plans.values())
            if not in_flight:
                self._drop_reservation(rid)
            return
        out = self.engine.abort(rid)
        if out is not None:
            self._emit([TokenOutput(rid, [], out.num_prompt_tokens, out.num_output_tokens, "abort")])

    def _add_local(self, m: PrefillRequest) -> None:
        params = params_from_dict(m.params)
        try:
            self.engine.add_request(list(m.prompt_token_ids), params, m.request_id,
                                    predicted_len=m.predicted_len or None)
        except ValueError as e:
            self._emit([TokenOutput(m.request_id, [], len(m.prompt_token_ids), 0, "error", error=str(e))])
            return
        self.local_prefills += 1
        self.ledger[m.request_id] = (len(m.prompt_token_ids), m.predicted_len, params.max_tokens)

    def _update_ledger(self) -> None:
        """committed = sum over live requests of (blocks promised - blocks held); see the module doc."""
        bm, reqs = self.engine.block_manager, self.engine.requests
        total = 0
        for rid, (prompt, predicted, max_tokens) in list(self.ledger.items()):
            req = reqs.get(rid)
            if req is None and rid not in self.reserved:
                del self.ledger[rid]         # finished, aborted or released
                continue
            generated = req.num_output_tokens if req is not None else 0
            promised = reserved_blocks(prompt, predicted or 1, generated, bm.block_size,
                                       max_tokens=max_tokens or None)
            held = len(bm.block_table(rid)) if bm.has(rid) else 0
            total += max(0, promised - held)
        self.committed = total

    def _drop_reservation(self, rid: str) -> None:
        self.reserved.discard(rid)
        self.aborted.discard(rid)
        self.engine.release(rid)

    def _retry(self, rids, reason: str) -> None:
        """Tell the router these requests' KV will not be usable here: it dispatches them again."""
        self._emit([TokenOutput(r, [], 0, 0, "retry", error=reason) for r in rids])

    def _give_up(self, rids, reason: str) -> None:
        """Nothing more will land for these requests: free their reservations, and have the router
        re-dispatch those still wanted (reserved and not aborted)."""
        live = [r for r in rids if r in self.reserved and r not in self.aborted]
        for r in rids:
            self._drop_reservation(r)
        self._retry(live, reason)

    def _expire_transfers(self) -> None:
        """A plan not landed within transfer_timeout_s: its requests are retried elsewhere; their blocks
        stay held (as for an abort) until the receives complete or fail, since they may still land."""
        now = time.monotonic()
        for p in self.receiver.pending:
            if now - p.started > self.transfer_timeout_s and not p.expired:
                p.expired = True
                live = [r for r in p.request_ids if r in self.reserved and r not in self.aborted]
                self._retry(live, f"KV transfer from rank {p.src} timed out after {self.transfer_timeout_s:g}s")
                for r in live:
                    self.aborted.add(r)
        for key, (p, ok) in list(self.landed.items()):   # KV here, PlanDone never came (prefill died)
            if now - p.started > self.transfer_timeout_s and key not in self.done_msgs:
                del self.landed[key]
                self._give_up(p.request_ids, f"no first token from prefill rank {p.src} after "
                                             f"{self.transfer_timeout_s:g}s")

    def _post_ready_plans(self) -> None:
        """Post irecvs for each source's plans strictly in plan_id order (the wire order)."""
        for src, plans in self.plans.items():
            while self.next_plan[src] in plans:
                p = plans.pop(self.next_plan[src])
                self.next_plan[src] += 1
                tables = [self.engine.block_table(r) for r in p.request_ids]
                slots = slot_mapping(tables, p.num_tokens, self.engine.block_manager.block_size,
                                     torch.device("cpu"), starts=p.start_tokens)
                self.receiver.post(src, p.plan_id, p.request_ids, p.num_tokens, slots)

    def _admit_landed(self) -> None:
        for pending, ok in self.receiver.poll():
            self.landed[(pending.src, pending.plan_id)] = (pending, ok)
        outs = []
        for key in list(self.landed):
            done = self.done_msgs.pop(key, None)
            if done is None and self.landed[key][1] is not None:
                if not any(r in self.reserved for r in self.landed[key][0].request_ids):
                    del self.landed[key]     # every request of it was aborted meanwhile
                continue                     # KV is here, first tokens not yet
            pending, ok = self.landed.pop(key)
            if ok is None:                   # the receive failed (peer gone): nothing usable landed
                self._give_up(pending.request_ids, f"KV transfer from rank {pending.src} failed")
                continue
            if not ok:
                self.fallbacks += len(pending.request_ids)
            for i, rid in enumerate(pending.request_ids):
                if rid in self.aborted or rid not in self.reserved:
                    self._drop_reservation(rid)
                    continue
                self.reserved.discard(rid)
                params = params_from_dict(done.params[i])
                out = self.engine.add_prefilled(rid, done.prompt_token_ids[i], done.first_tokens[i], params,
                                                kv_ok=ok)
                if out is not None:          # the first token already ended it
                    outs.append(TokenOutput(rid, [], out.num_prompt_tokens, out.num_output_tokens,
                                            out.finish_reason.value))
        self._emit(outs)

    def where(self, rid: str) -> dict:
        """Where this worker holds request `rid` (diagnostics; read without the engine's lock)."""
        eng = self.engine
        req = eng.requests.get(rid)
        return {"reserved": rid in self.reserved, "aborted": rid in self.aborted,
                "planned": [(s, p) for s, ps in list(self.plans.items()) for p, m in list(ps.items())
                            if rid in m.request_ids],
                "receiving": [(p.src, p.plan_id) for p in list(self.receiver.pending) if rid in p.request_ids],
                "landed": [k for k, (p, _) in list(self.landed.items()) if rid in p.request_ids],
                "done_msgs": sorted(self.done_msgs), "next_plan": dict(self.next_plan),
                "peer_epoch": dict(self.peer_epoch),
                "engine": None if req is None else {"finished": req.finished, "computed": req.num_computed_tokens,
                                                    "out": req.num_output_tokens,
                                                    "running": req in eng.scheduler.running,
                                                    "waiting": req in eng.scheduler.waiting}}

    def reset_peer(self, src: int, epoch: int = 0) -> None:
        """Prefill rank `src` restarted (called between steps) under `epoch`: its new process numbers
        plans from 0 on a new group. Whatever its old process left here (plans queued, posted or
        landed without their PlanDone) is dropped, its reservations freed, and the router told to
        retry; its messages still in the inbox, or arriving later, are dropped in _apply (older epoch)."""
        with self._reserve_lock:
            self.peer_epoch[src] = max(self.peer_epoch[src], epoch)
            rids = [r for p in self.plans.pop(src, {}).values() for r in p.request_ids]
            self.next_plan[src] = 0
            for p in [p for p in self.receiver.pending if p.src == src]:
                self.receiver.pending.remove(p)
                rids += p.request_ids
            for key in [k for k in self.landed if k[0] == src]:
                rids += self.landed.pop(key)[0].request_ids
            for key in [k for k in self.done_msgs if k[0] == src]:
                del self.done_msgs[key]
            self._give_up(rids, f"prefill rank {src} restarted")

    def run_step(self) -> None:
        try:
            msg = self.inbox.get(timeout=0.02) if not self.has_work() else self.inbox.get_nowait()
            while True:
                self._apply(msg)
                msg = self.inbox.get_nowait()
        except queue.Empty:
            pass
        # threading.Lock is not fair: right after a step the loop would take it again before a
        # waiting Reserve thread runs, and a Reserve (on the router's critical path) could wait
        # several steps. Let queued ones go first (for at most 5 ms).
        until = time.monotonic() + 0.005
        while self._reserves_waiting and time.monotonic() < until:
            time.sleep(0.00005)
        with self._reserve_lock:
            self._post_ready_plans()
            self._admit_landed()
            self._expire_transfers()
            outs = self.engine.step() if self.engine.has_unfinished() else []
            self._update_ledger()
        if not outs and self.receiver.pending:
            time.sleep(0.0002)   # only waiting on transfers: let the channel's waiter threads run
        self._emit([TokenOutput(o.request_id, o.new_token_ids, o.num_prompt_tokens, o.num_output_tokens,
                                o.finish_reason.value if o.finish_reason else None,
                                [list(lp) for lp in o.new_logprobs]) for o in outs])
