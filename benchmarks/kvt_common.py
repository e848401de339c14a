"""Helpers for benchmarks/bench_kvtransfer.py: the two-process control plane and the staged channel.

Control plane: a TCPStore hosted by the parent process (so partial results survive a child that
dies or hangs). It carries barriers, small values (timestamps), each rank's results per section
and the failure flags that let a rank blocked on a receive give up when its peer failed:

    bar/<section>/<name>     barrier counters          fail/<section>/<rank>   a rank's section failed
    val/<section>/<name>     JSON values               dead/<rank>             set by the parent on exit != 0
    res/<rank>/<section>     a rank's section results  errors/<rank>           a rank's error list (JSON)
    info/<rank>              machine facts             done/<rank>             the rank finished

Every wait here polls and checks, every 250 ms, the section deadline and the peer's flags, so no
wait blocks forever. Device work is never awaited with torch.cuda.synchronize() while a receive
may be pending (it would wait on the NCCL stream too): completion of transfers is polled with
Work.is_completed(), compute with the current stream.

StagedChannel: gloo moves host tensors only, so for gloo with GPU tensors the payload is copied
device -> pinned host before the send and host -> device after the receive (both copies are part
of the measured time, as they would be in a worker using gloo).
"""
from __future__ import annotations

import json
import time
from datetime import timedelta

import torch
import torch.distributed as dist


class PeerFailed(RuntimeError):
    """The peer rank failed the current section."""


class PeerDead(RuntimeError):
    """The peer process exited: nothing more can be exchanged."""


class SectionTimeout(RuntimeError):
    pass


def now_wall() -> float:
    """Wall clock shared by both processes of one host (CLOCK_REALTIME)."""
    return time.time()


class Control:
    def __init__(self, host: str, port: int, rank: int, timeout_s: float = 600.0):
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                                   wait_for_workers=False)
        self.rank = rank
        self.peer = 1 - rank
        self.section = "init"
        self.deadline: float | None = None
        self._last = 0.0
        # gloo completions are observed by waiter threads (kvtransfer.channel._Waiter) that need the
        # GIL: a busy spin would hold it for a whole switch interval (5 ms) per check. yield_s > 0
        # sleeps that long in each spin, which lets them run.
        self.yield_s: float | None = None

    # ---------------------------------------------------------------- sections
    def begin(self, section: str, budget_s: float) -> None:
        self.section = section
        self.deadline = time.monotonic() + budget_s
        self.barrier("start")

    def fail(self, msg: str) -> None:
        self.store.set(f"fail/{self.section}/{self.rank}", msg[:2000])

    def failed(self, section: str, rank: int) -> bool:
        return self.store.check([f"fail/{section}/{rank}"])

    def check(self, force: bool = False) -> None:
        """Raise if the section ran out of time or the peer failed / died (rate-limited)."""
        t = time.monotonic()
        if not force and t - self._last < 0.25:
            return
        self._last = t
        if self.deadline is not None and t > self.deadline:
            raise SectionTimeout(f"section {self.section!r} ran past its time budget")
        if self.store.check([f"dead/{self.peer}"]):
            raise PeerDead(f"rank {self.peer} exited")
        if self.store.check([f"fail/{self.section}/{self.peer}"]):
            raise PeerFailed(f"rank {self.peer} failed section {self.section!r}")

    def wait_until(self, pred, what: str = "") -> None:
        """Spin on pred() (on the timed path: no sleep unless yield_s), checking flags every 250 ms."""
        while not pred():
            self.check()
            self.relax()

    def relax(self) -> None:
        if self.yield_s is not None:
            time.sleep(self.yield_s)

    # ---------------------------------------------------------------- rendezvous / values
    def barrier(self, name: str) -> None:
        key = f"bar/{self.section}/{name}"
        self.store.add(key, 1)
        while int(self.store.add(key, 0)) < 2:
            self.check()
            time.sleep(50e-6)

    def put(self, name: str, value) -> None:
        self.store.set(f"val/{self.section}/{name}", json.dumps(value))

    def get(self, name: str):
        key = f"val/{self.section}/{name}"
        while not self.store.check([key]):
            self.check()
            time.sleep(100e-6)
        return json.loads(self.store.get(key))

    def report(self, key: str, value) -> None:
        self.store.set(key, json.dumps(value, default=str))


def read_json_key(store, key: str):
    if not store.check([key]):
        return None
    try:
        return json.loads(store.get(key))
    except Exception:  # noqa: BLE001 - a half-written value from a killed child
        return None


# -------------------------------------------------------------------- staged channel
class PinnedPool:
    """Pinned host buffers by size, reused once their transfer completed."""

    def __init__(self):
        self.free: dict[int, list[torch.Tensor]] = {}

    def get(self, n: int) -> torch.Tensor:
        lst = self.free.get(n)
        if lst:
            return lst.pop()
        return torch.empty(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())

    def put(self, t: torch.Tensor) -> None:
        self.free.setdefault(t.numel(), []).append(t)


class _StagedSend:
    def __init__(self, work, host: torch.Tensor, pool: PinnedPool):
        self.work, self.host, self.pool = work, host, pool

    def _release(self) -> None:
        if self.host is not None:
            self.pool.put(self.host)
            self.host = None

    def is_completed(self) -> bool:
        done = self.work.is_completed()
        if done:
            self._release()
        return done

    def wait(self, timeout=None):
        self.work.wait()
        self._release()
        return True


class _StagedRecv:
    def __init__(self, work, host: torch.Tensor, dev: torch.Tensor, pool: PinnedPool):
        self.work, self.host, self.dev, self.pool = work, host, dev, pool

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self, timeout=None):
        self.work.wait()
        if self.host is not None:
            # async from pinned memory on the current stream: the decode that follows is ordered after it
            self.dev.copy_(self.host.view(self.dev.dtype).view(self.dev.shape), non_blocking=True)
            if self.dev.is_cuda:
                # the pinned buffer may be reused only once the copy ran: record an event, recycle lazily
                ev = torch.cuda.Event()
                ev.record()
                self.pool.pending.append((ev, self.host))
            else:
                self.pool.put(self.host)
            self.host = None
        return True


class StagedChannel:
    """isend / irecv of device tensors over a gloo KVChannel through pinned host buffers."""

    def __init__(self, ch):
        self.ch = ch
        self.pool = PinnedPool()
        self.pool.pending = []          # (event, buffer) of H2D copies in flight

    def _recycle(self) -> None:
        keep = []
        for ev, buf in self.pool.pending:
            if ev.query():
                self.pool.put(buf)
            else:
                keep.append((ev, buf))
        self.pool.pending = keep

    def isend(self, t: torch.Tensor, peer: int, tag: int = 0):
        self._recycle()
        flat = t.reshape(-1).view(torch.uint8)
        host = self.pool.get(flat.numel())
        host.copy_(flat)                # blocks the host until the producer (the encode) and the copy ran
        return _StagedSend(self.ch.isend(host, peer, tag=tag), host, self.pool)

    def irecv(self, t: torch.Tensor, peer: int, tag: int = 0):
        self._recycle()
        n = t.numel() * t.element_size()
        host = self.pool.get(n)
        return _StagedRecv(self.ch.irecv(host, peer, tag=tag), host, t, self.pool)


class RecordingChannel:
    """Pass-through that remembers the works it issued (to await sends the KVSender dropped)."""

    def __init__(self, ch):
        self.ch = ch
        self.works: list = []

    def isend(self, t, peer, tag=0):
        w = self.ch.isend(t, peer, tag=tag)
        self.works.append(w)
        return w

    def irecv(self, t, peer, tag=0):
        w = self.ch.irecv(t, peer, tag=tag)
        self.works.append(w)
        return w

    def all_completed(self) -> bool:
        self.works = [w for w in self.works if not w.is_completed()]
        return not self.works


def fresh_pair_group(ch) -> None:
    """Give the KV channel a new (0, 1) group (both ranks call it, after a failed section, so
    operations left pending on the old one cannot match new ones): the same re-forming a restarted
    worker goes through (KVChannel.build_pair / install_pair: a new epoch, the old group aborted,
    fresh gloo waiter threads)."""
    ch.fresh_epoch = getattr(ch, "fresh_epoch", 0) + 1
    peer = 1 - ch.rank
    ch.install_pair(peer, ch.build_pair(peer, ch.fresh_epoch))
