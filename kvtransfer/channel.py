"""The KV channel: torch.distributed point-to-point between prefill and decode ranks.

NCCL between GPUs, gloo on CPU. Ranks: prefill workers 0..P-1, decode workers
P..P+D-1. Every (prefill, decode) pair gets its own two-rank subgroup, so a slow
transfer on one pair never queues another pair's messages behind it (NCCL runs a
communicator's operations in issue order on one stream):

    world  = {p0, p1, d0, d1}
    groups = {(p0,d0), (p0,d1), (p1,d0), (p1,d1)}     created in this order on every rank

With context parallelism (--prefill-cp C > 1) each prefill worker p also has C-1 helper
ranks, numbered after the decode ranks, and one group {p, its helpers} for ring attention
(p is the group's rank 0, the leader; only the leader talks to decode ranks):

    P=1, D=1, C=2:  world = {p0, d1, h2};  pairs = {(p0,d1)};  cp groups = {(p0,h2)}

With tensor parallelism (--prefill-tp / --decode-tp T > 1) each worker w also has T-1
follower ranks, numbered after the ring helpers (prefill workers' first), and one group
{w, its followers} (w is TP rank 0, the leader). KV moves rank to rank: every prefill TP rank
sends each decode TP rank the KV heads they share (kvtransfer/reshard.py), so each such
pair gets a two-rank group:

    P=1, D=1, tp_p=2, tp_d=1, Hkv=2:  world = {p0, d1, p0'2};  pairs = {(p0,d1), (d1,p0'2)}
                                      tp groups = {(p0, p0'2)}

Within a pair, messages are matched in issue order; the sender and the receiver both
follow the plan order (TransferPlan.plan_id), so no tags are needed for NCCL. gloo
gets the layer index as its tag as a second guard.

There is no global world: every group is built on the driver's store under a name with an
epoch (kvtransfer/groups.py), so a restarted rank rejoins. At epoch e it builds its groups
with the live peers only; each live peer calls build_pair(rank, e) to build its side, then
install_pair() swaps it in, aborting the old group (its pending operations fail at once):

    decode 3 restarts (epoch 2):  d3: KVChannel(..., epoch=2, peers={0, 1})
                                  p0: install_pair(3, build_pair(3, 2))   p1: the same
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kvtransfer import groups


@dataclass(frozen=True)
class ChannelConfig:
    rank: int
    num_prefill: int
    num_decode: int
    init_method: str             # tcp://HOST:PORT of the store (groups.serve_store, in the driver)
    backend: str | None = None   # None: nccl when the device is CUDA, else gloo
    timeout_s: float = 600.0
    prefill_cp: int = 1          # ranks per prefill worker (context parallelism): the leader + helpers
    prefill_tp: int = 1          # ranks per prefill worker (tensor parallelism): the leader + followers
    decode_tp: int = 1           # ranks per decode worker (tensor parallelism)
    num_kv_heads: int = 0        # the model's; decides which TP rank pairs share KV heads (0: all of them)
    host_store: bool = False     # this rank hosts the store itself (tools without a driver process)
    listen_host: str = "127.0.0.1"   # where this rank's gloo connections listen (the node's IP across nodes)

    @property
    def world_size(self) -> int:
        return (self.num_prefill * (self.prefill_cp + self.prefill_tp - 1)
                + self.num_decode * self.decode_tp)

    @property
    def prefill_ranks(self) -> list[int]:
        return list(range(self.num_prefill))

    @property
    def decode_ranks(self) -> list[int]:
        return list(range(self.num_prefill, self.num_prefill + self.num_decode))

    def cp_ranks(self, prefill_rank: int) -> list[int]:
        """The context-parallel group of a prefill worker: itself (the leader), then its helpers."""
        first = self.num_prefill + self.num_decode + prefill_rank * (self.prefill_cp - 1)
        return [prefill_rank] + list(range(first, first + self.prefill_cp - 1))

    def tp_of(self, worker: int) -> int:
        return self.prefill_tp if worker < self.num_prefill else self.decode_tp

    def tp_ranks(self, worker: int) -> list[int]:
        """The tensor-parallel group of a worker: itself (TP rank 0, the leader), then its followers."""
        P, D = self.num_prefill, self.num_decode
        base = P * self.prefill_cp + D                      # after the ring helpers
        if worker < P:
            first = base + worker * (self.prefill_tp - 1)
        else:
            first = base + P * (self.prefill_tp - 1) + (worker - P) * (self.decode_tp - 1)
        return [worker] + list(range(first, first + self.tp_of(worker) - 1))

    def worker_of(self, rank: int) -> tuple[int, int]:
        """(worker, TP rank in it) of a rank that belongs to a worker's TP group."""
        for w in self.prefill_ranks + self.decode_ranks:
            ranks = self.tp_ranks(w)
            if rank in ranks:
                return w, ranks.index(rank)
        raise ValueError(f"rank {rank} is no worker's TP rank (a ring helper?)")

    def role_of(self, rank: int) -> str:
        """prefill | decode (a worker, TP rank 0) | prefill_cp (ring helper) | prefill_tp | decode_tp (followers)."""
        P, D = self.num_prefill, self.num_decode
        if rank < P + D:
            return "prefill" if rank < P else "decode"
        if rank < P * self.prefill_cp + D:
            return "prefill_cp"
        return "prefill_tp" if self.worker_of(rank)[0] < P else "decode_tp"

    def pairs(self) -> list[tuple[int, int]]:
        """The point-to-point pairs (lower rank first) that get a two-rank group, in creation order:
        for every (prefill, decode) worker pair, the TP rank pairs that share KV heads."""
        from kvtransfer.reshard import slice_plan
        if self.num_kv_heads:
            shared = [(s.src, s.dst) for s in slice_plan(self.num_kv_heads, self.prefill_tp, self.decode_tp)]
        else:
            shared = [(i, j) for i in range(self.prefill_tp) for j in range(self.decode_tp)]
        out = []
        for p in self.prefill_ranks:
            for d in self.decode_ranks:
                for i, j in shared:
                    a, b = self.tp_ranks(p)[i], self.tp_ranks(d)[j]
                    out.append((min(a, b), max(a, b)))
        return out

    def worker_groups(self) -> list[list[int]]:
        """Collective groups inside one worker spanning several ranks (a prefill leader and its ring
        helpers, or a worker and its TP followers), in creation order; a rank belongs to at most one."""
        groups = [self.cp_ranks(p) for p in self.prefill_ranks] if self.prefill_cp > 1 else []
        return groups + [self.tp_ranks(w) for w in self.prefill_ranks + self.decode_ranks if self.tp_of(w) > 1]


class _WaitedWork:
    """A gloo Work whose completion a waiter thread observes.

    gloo's point-to-point Work only reports completion once wait() has run, so polling
    is_completed() would never see a landed message. One waiter thread per peer calls
    wait() in issue order (a pair's messages complete in order) and sets a flag.
    """

    def __init__(self, work):
        self.work = work
        self.done = threading.Event()
        self.error: BaseException | None = None

    def is_completed(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        ok = self.done.wait(timeout)
        if self.error is not None:
            raise self.error
        return ok


class _Waiter(threading.Thread):
    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.q: queue.Queue = queue.Queue()
        self.start()

    def run(self) -> None:
        while True:
            w = self.q.get()
            if w is None:
                return
            try:
                w.work.wait()
            except BaseException as e:  # noqa: BLE001 - surfaced to the poller
                w.error = e
            w.done.set()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class KVChannel:
    def __init__(self, cfg: ChannelConfig, device: torch.device, epoch: int = 0, peers: set[int] | None = None,
                 worker_group: bool = True):
        """Build this rank's pair groups (with `peers` only, when given: the live ones) and, when
        worker_group, its ring group, all under `epoch`."""
        self.cfg = cfg
        if device.type == "cuda" and device.index is None:   # NCCL wants an indexed device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.backend = cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
        if self.backend == "nccl":
            # Shared hosts: NVLink multicast must stay off (see the device notes); harmless elsewhere.
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        if cfg.host_store:
            from urllib.parse import urlparse
            u = urlparse(cfg.init_method)
            self._hosted = dist.TCPStore(u.hostname, u.port, is_master=True, wait_for_workers=False,
                                         timeout=timedelta(seconds=cfg.timeout_s))
        self.store = groups.connect_store(cfg.init_method, cfg.timeout_s)
        self.groups: dict[tuple[int, int], dist.ProcessGroup] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self._waiters: dict[tuple[str, int], _Waiter] = {}
        for a, b in cfg.pairs():
            if cfg.rank in (a, b) and (peers is None or (b if cfg.rank == a else a) in peers):
                self.groups[(a, b)] = self._build("pair", [a, b], epoch)
        self.cp_group: dist.ProcessGroup | None = None     # this rank's worker group (ring), if any
        if worker_group:
            self.cp_group = self.build_worker_group(epoch)

    def _build(self, kind: str, ranks: list[int], epoch: int) -> dist.ProcessGroup:
        return groups.build_group(self.store, groups.group_name(kind, ranks, epoch), ranks.index(self.rank),
                                  len(ranks), self.backend, self.device, self.cfg.timeout_s, self.cfg.listen_host)

    def build_worker_group(self, epoch: int) -> dist.ProcessGroup | None:
        """This rank's worker group (its ring: leader first), built under `epoch` with every member."""
        for ranks in self.cfg.worker_groups():
            if self.rank in ranks:
                return self._build("group", ranks, epoch)
        return None

    # ------------------------------------------------------------------ re-forming a pair
    def build_pair(self, peer: int, epoch: int) -> dist.ProcessGroup:
        """A new group with `peer` (which builds its side under the same epoch), warmed up; not yet
        used: install_pair() swaps it in. Blocks until the peer is there."""
        a, b = min(self.rank, peer), max(self.rank, peer)
        if (a, b) not in self.cfg.pairs():
            raise ValueError(f"rank {self.rank} has no KV channel to rank {peer}")
        pg = self._build("pair", [a, b], epoch)
        t = torch.zeros(1, dtype=torch.uint8, device=self.device)
        (pg.send([t], 1, 999) if self.rank == a else pg.recv([t], 0, 999)).wait()
        self._sync()
        return pg

    def install_pair(self, peer: int, pg: dist.ProcessGroup) -> None:
        """Use `pg` for `peer` from now on; the old group is aborted (what is pending on it fails)
        and gloo's waiter threads for that peer are replaced (an old one may sit on a dead work)."""
        key = (min(self.rank, peer), max(self.rank, peer))
        old = self.groups.get(key)
        self.groups[key] = pg
        for kind in ("send", "recv"):
            w = self._waiters.pop((kind, peer), None)
            if w is not None:
                w.q.put(None)
        groups.abort(old)

    def drop_peer(self, peer: int) -> None:
        """The peer is gone: abort its group, so nothing waits on it until the timeout."""
        groups.abort(self.groups.get((min(self.rank, peer), max(self.rank, peer))))

    def _track(self, work, kind: str, peer: int):
        if self.backend != "gloo":
            return work            # NCCL: is_completed() queries the CUDA event; wait() orders streams
        key = (kind, peer)
        if key not in self._waiters:
            self._waiters[key] = _Waiter(f"kv-{kind}-{peer}")
        w = _WaitedWork(work)
        self._waiters[key].q.put(w)
        return w

    @property
    def rank(self) -> int:
        return self.cfg.rank

    def _group(self, peer: int) -> tuple[dist.ProcessGroup, int]:
        """(the pair's group, the peer's group rank: the lower rank is 0)."""
        key = (self.rank, peer) if self.rank < peer else (peer, self.rank)
        try:
            return self.groups[key], int(peer > self.rank)
        except KeyError:
            raise ValueError(f"rank {self.rank} has no KV channel to rank {peer}") from None

    def isend(self, t: torch.Tensor, peer: int, tag: int = 0):
        self.bytes_sent += t.numel() * t.element_size()
        pg, dst = self._group(peer)
        work = pg.send([t], dst, tag if self.backend == "gloo" else 0)
        return self._track(work, "send", peer)

    def irecv(self, t: torch.Tensor, peer: int, tag: int = 0):
        self.bytes_received += t.numel() * t.element_size()
        pg, src = self._group(peer)
        work = pg.recv([t], src, tag if self.backend == "gloo" else 0)
        return self._track(work, "recv", peer)

    def warmup(self) -> None:
        """Exchange one byte on every pair this rank belongs to, so that NCCL creates each pair's
        communicator now (it does so lazily, blocking until both ends arrive) rather than on the
        first KV transfer. Every rank walks the pairs in the same global order, which cannot
        deadlock: it is one sequential schedule of blocking exchanges."""
        t = torch.zeros(1, dtype=torch.uint8, device=self.device)
        for (p, d) in sorted(self.groups):
            if self.rank == p:
                self.isend(t, d, tag=999).wait()
            else:
                self.irecv(t, p, tag=999).wait()
        if self.cp_group is not None:      # the ring group's communicator, now rather than on a prompt
            groups.barrier(self.cp_group, self.device)
        self._sync()
        self.bytes_sent = self.bytes_received = 0

    def measure_bandwidth(self, peer: int, nbytes: int = 64 * 2**20, iters: int = 5) -> float:
        """One-way bandwidth to/from `peer` in bytes/s; both ends call it at the same time.

        The lower rank sends, the higher receives, then the receiver acks, so both sides
        time the same transfers. Returns the median over `iters` transfers.
        """
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        ack = torch.zeros(1, dtype=torch.uint8, device=self.device)
        sender = self.rank < peer
        times = []
        for i in range(iters + 1):          # first round warms up the connection
            self._sync()
            t0 = time.perf_counter()
            if sender:
                self.isend(buf, peer, tag=1000 + i).wait()
                self.irecv(ack, peer, tag=2000 + i).wait()
            else:
                self.irecv(buf, peer, tag=1000 + i).wait()
                self.isend(ack, peer, tag=2000 + i).wait()
            self._sync()
            if i:
                times.append(time.perf_counter() - t0)
        self.bytes_sent = self.bytes_received = 0
        times.sort()
        return nbytes / times[len(times) // 2]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        for w in self._waiters.values():
            w.q.put(None)
        self.groups, self.cp_group = {}, None
