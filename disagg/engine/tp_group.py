"""A worker spanning a tensor-parallel group: the leader (TP rank 0) and its followers, one GPU each.

    router ──▶ leader (prefill or decode worker, as without TP: scheduler, block manager, sampling)
                 │ before every collective of the group: TPStep ══ broadcast (worker group) ══▶ followers
                 ▼                                                                              ▼
               exec: the step's schedule (+ the prefill's KV send plans)   ──▶  all ranks run execute(); the
                     all-reduces inside the forward keep them in lockstep        leader alone samples
               sync: new KV receive plans (decode)                         ──▶  all ranks post them, drain what
                     then one all-reduce of every pending plan's state            landed, and agree on which plans
                                                                                 are complete (on every rank)
               idle: a heartbeat (a follower waits in a collective; 30 s of silence keeps it under the timeout)
               stop: followers leave their loop

Followers never talk to the router. They hold a shard of the weights and a KV cache of their
heads, with the same number of blocks as the leader (agreed when the runners are built), so the
leader's block ids mean the same on every rank; the scheduler's requests reach them only as the
step's token ids, positions and block tables. KV moves rank to rank (kvtransfer/reshard.py): each
prefill rank sends its slices after each layer (the layer hook runs on every rank), each decode
rank receives its own; a decode plan is complete when all ranks of the group hold all their slices
(the sync all-reduce), and only then does the leader admit its requests.

Wire format of a TPStep broadcast: one fixed-size uint8 buffer [8-byte length | msgpack ...], and a
second broadcast with the rest when a message is larger (long block tables in big batches).
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.distributed as dist

from decode.scheduler import ScheduledRequest, SchedulerOutput
from disagg.engine.model_runner import _token_slice
from disagg.messages import TPStep, decode, encode
from disagg.model.tensor_parallel import TensorParallel, TPModelRunner
from kvtransfer import groups
from kvtransfer.transfer import FAILED, PENDING, KVReceiver, KVSender, _SendPlan

CAPACITY = 1 << 16          # bytes of the first broadcast of a TPStep
HEARTBEAT_S = 30.0


# ---------------------------------------------------------------------- schedules as plain data
class _StepTokens:
    """What ModelRunner._prepare reads of a request: this step's token ids, placed as outputs after
    `start` prompt tokens (so _token_slice(req, start, n) returns them)."""
    __slots__ = ("num_prompt_tokens", "prompt_token_ids", "output_token_ids")

    def __init__(self, start: int, token_ids: list[int]):
        self.num_prompt_tokens, self.prompt_token_ids, self.output_token_ids = start, [], token_ids


def schedule_items(sched: SchedulerOutput) -> list:
    return [[s.start, s.num_tokens, list(s.block_table), _token_slice(s.request, s.start, s.num_tokens)]
            for s in sched.scheduled]


def schedule_from_items(items: list) -> SchedulerOutput:
    """A follower's copy of the leader's step; nothing samples on it."""
    return SchedulerOutput([ScheduledRequest(_StepTokens(start, toks), n, table, start=start, samples=False)
                            for start, n, table, toks in items])


# ---------------------------------------------------------------------- the group's control channel
class TPGroup:
    def __init__(self, tp: TensorParallel, device: torch.device):
        self.tp = tp
        self.dev = device if device.type == "cuda" else torch.device("cpu")    # NCCL on GPU, gloo on CPU

    def send(self, msg: TPStep) -> None:
        data = encode(msg)
        head = len(data).to_bytes(8, "little") + data[:CAPACITY - 8]
        buf = torch.zeros(CAPACITY, dtype=torch.uint8)
        buf[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        groups.broadcast(self.tp.group, buf.to(self.dev), 0)
        if len(data) > CAPACITY - 8:
            rest = torch.frombuffer(bytearray(data[CAPACITY - 8:]), dtype=torch.uint8)
            groups.broadcast(self.tp.group, rest.to(self.dev), 0)

    def recv(self) -> TPStep:
        buf = torch.empty(CAPACITY, dtype=torch.uint8, device=self.dev)
        groups.broadcast(self.tp.group, buf, 0)
        b = buf.cpu().numpy().tobytes()
        n = int.from_bytes(b[:8], "little")
        data = b[8:8 + min(n, CAPACITY - 8)]
        if n > CAPACITY - 8:
            rest = torch.empty(n - (CAPACITY - 8), dtype=torch.uint8, device=self.dev)
            groups.broadcast(self.tp.group, rest, 0)
            data += rest.cpu().numpy().tobytes()
        return decode(data, TPStep)

    def sync_landed(self, receiver: KVReceiver) -> list[tuple]:
        """Every rank of the group, with the same pending plans in the same order: advance them, and
        retire those complete on all ranks (or failed on any). Returns KVReceiver.finish's list."""
        states = receiver.progress()
        n = len(states)
        # one MIN all-reduce: [terminal here? ..., -state ...] -> terminal everywhere, worst state anywhere
        t = torch.tensor([int(s != PENDING) for s in states] + [-s for s in states], dtype=torch.int32)
        t = t.to(self.dev)
        groups.all_reduce(self.tp.group, t, op=dist.ReduceOp.MIN)
        t = t.tolist()
        final = []
        for p, everywhere, worst in zip(list(receiver.pending), t[:n], t[n:]):
            worst = -worst
            if worst == FAILED or everywhere:
                final.append((p, worst))
        return receiver.finish(final)


# ---------------------------------------------------------------------- leader
class TPLeader:
    """TP rank 0's side of the group: the runner, KV sender and receiver of a leader announce each
    collective to the followers first. Everything here runs on the worker's engine thread."""

    def __init__(self, tp: TensorParallel, device: torch.device, reshard=None):
        self.tp = tp
        self.group = TPGroup(tp, device)
        self.reshard = reshard
        self.sends: list = []           # staged by the sender for the next exec
        self.posts: list = []           # staged by the receiver for the next sync
        self.last = time.monotonic()
        self.steps = 0

    def broadcast(self, msg: TPStep) -> None:
        self.group.send(msg)
        self.last = time.monotonic()
        self.steps += 1

    def heartbeat(self) -> None:
        if time.monotonic() - self.last > HEARTBEAT_S:
            self.broadcast(TPStep("idle"))

    def stop(self) -> None:
        self.broadcast(TPStep("stop"))

    def make_runner(self, cfg, model_cfg, max_model_len: int, progress: bool = False) -> TPModelRunner:
        return _LeaderRunner(cfg, model_cfg, max_model_len, self.tp, progress=progress, leader=self)

    def make_sender(self, *args, **kw) -> KVSender:
        return _LeaderSender(self, *args, **kw)

    def make_receiver(self, *args, **kw) -> KVReceiver:
        return _LeaderReceiver(self, *args, **kw)


class _LeaderRunner(TPModelRunner):
    def __init__(self, *args, leader: TPLeader, **kw):
        self.leader = leader
        super().__init__(*args, **kw)

    def execute(self, sched, layer_hook=None):
        sends, self.leader.sends = self.leader.sends, []
        self.leader.broadcast(TPStep("exec", items=schedule_items(sched), sends=sends))
        return super().execute(sched, layer_hook)


class _LeaderSender(KVSender):
    def __init__(self, leader: TPLeader, *args, **kw):
        self.leader = leader
        super().__init__(*args, **kw)

    def begin(self, plans: list[_SendPlan]) -> None:
        self.leader.sends = [[p.dest, p.slots.cpu().tolist()] for p in plans]
        super().begin(plans)

    def on_layer(self, layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        super().on_layer(layer, k_cache, v_cache)
        rs = self.leader.reshard
        if rs is None:
            return
        el = k_cache.element_size()     # the followers' slices, counted here so the worker's stats are whole
        for p in self.plans:
            T = p.slots.numel()
            for nh in rs.others_heads(p.dest):
                self.stats.bytes_raw += 2 * T * nh * self.d * el
                self.stats.bytes_wire += self.codec.payload_nbytes((2, T, nh, self.d), k_cache.dtype)


class _LeaderReceiver(KVReceiver):
    MIN_SYNC_S = 0.001              # while only waiting on transfers, sync the group at most this often

    def __init__(self, leader: TPLeader, *args, **kw):
        self.leader = leader
        self._last_sync = 0.0
        super().__init__(*args, **kw)

    def post(self, src, plan_id, request_ids, num_tokens, slots) -> None:
        self.leader.posts.append([src, plan_id, list(num_tokens), slots.tolist()])
        super().post(src, plan_id, request_ids, num_tokens, slots)

    def poll(self) -> list[tuple]:
        if not self.pending or (not self.leader.posts and time.monotonic() - self._last_sync < self.MIN_SYNC_S):
            return []
        posts, self.leader.posts = self.leader.posts, []
        self.leader.broadcast(TPStep("sync", posts=posts))
        self._last_sync = time.monotonic()
        return self.leader.group.sync_landed(self)


# ---------------------------------------------------------------------- follower
class TPFollower:
    """TP rank > 0 of a prefill or decode worker: runs what its leader announces, nothing else."""

    def __init__(self, cfg, role: str, channel, codec, tp: TensorParallel, reshard, progress: bool = False):
        from disagg.config import ModelConfig
        self.role = role
        self.tp = tp
        mc = ModelConfig.from_dir(cfg.model_dir)
        max_len = cfg.scheduler.max_model_len or mc.max_position_embeddings
        if role == "prefill_tp":        # as PrefillWorker builds its runner
            cfg = replace(cfg, use_cuda_graphs=False)
        elif mc.sliding_window:         # as LLMEngine (the decode worker's engine) does
            max_len = min(max_len, mc.sliding_window)
        self.runner = TPModelRunner(cfg, mc, max_len, tp, progress=progress)
        r, lc = self.runner, self.runner.model_cfg           # lc: this rank's shard of the heads
        self.group = TPGroup(tp, r.device)
        self.sender = self.receiver = None
        if role == "prefill_tp":
            self.sender = KVSender(channel, codec, lc.num_kv_heads, lc.head_dim, routes=reshard.send_routes)
        else:
            self.receiver = KVReceiver(channel, codec, r.kernels, r.kv_caches, lc.num_kv_heads, lc.head_dim,
                                       r.dtype, r.device, routes=reshard.recv_routes if reshard else None)
        self.steps = 0
        self.stopped = False

    def run_step(self) -> None:
        if self.stopped:
            time.sleep(0.05)
            return
        msg = self.group.recv()
        self.steps += 1
        if msg.kind == "exec":
            sched = schedule_from_items(msg.items)
            if self.sender is None:
                self.runner.execute(sched)
                return
            self.sender.reap()
            self.sender.begin([_SendPlan(dest, torch.tensor(slots, dtype=torch.long).to(self.runner.device))
                               for dest, slots in msg.sends])
            try:
                self.runner.execute(sched, layer_hook=self.sender.on_layer)
            finally:
                self.sender.end()
        elif msg.kind == "sync":
            for src, pid, ntok, slots in msg.posts:
                self.receiver.post(src, pid, [], ntok, torch.tensor(slots, dtype=torch.long))
            self.group.sync_landed(self.receiver)
        elif msg.kind == "stop":
            self.stopped = True

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.reap(block=True)
