"""Layer-wise KV streaming: the sender hooks the prefill forward, the receiver fills the decode cache.

One TransferPlan covers the requests of one prefill batch bound for one decode rank.
Its wire format is one message per layer, in layer order:

    layer l message = codec.encode(kv_l),   kv_l: [2, T, Hkv, D],  T = sum of the plan's num_tokens
                      (K then V; requests concatenated in plan order, tokens in position order;
                      request i sends positions start_i .. P_i - 1, start_i = the prefix its decode
                      worker already holds, 0 without prefix caching)

Sender (prefill): right after layer l has written its KV into the prefill's paged cache,
gather the plan's slots into kv_l, encode, isend. NCCL runs the send on its own stream,
so layer l's transfer overlaps layers l+1.. of the forward.

Receiver (decode): when the plan arrives, post all L irecvs into payload buffers (the
size is a pure function of T); each poll() decodes the layers that have landed and
scatters them into the request's blocks with the same write_kv kernel the model uses.
A plan is complete when all L layers landed; its checksums are read once, then.

    decode cache slots of a plan:  slot_mapping[t] = block_table[pos // bs] * bs + pos % bs

Tensor parallelism (kvtransfer/reshard.py): each end is one rank of its worker, holding some
KV heads. `routes(peer worker)` says which ranks this one exchanges slices with and which of its
own heads each carries; a layer's message per route is codec.encode(kv_l[:, :, heads]). The
default route is the peer worker itself with all heads (one message per layer, as above).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from disagg.kernels import KernelSet
from kvtransfer.channel import KVChannel


def slot_mapping(block_tables: list[list[int]], num_tokens: list[int], block_size: int,
                 device: torch.device, starts: list[int] | None = None) -> torch.Tensor:
    """Slots of positions start .. start + n - 1 of each request (start 0 unless given: a prefix
    the decode worker already holds is not sent). A position with no block (the request's
    reservation was dropped before its plan arrived: an abort racing the plan) gets slot -1:
    its KV must still be received, to keep the wire in step, but is written nowhere."""
    slots = []
    for i, (table, n) in enumerate(zip(block_tables, num_tokens)):
        s = starts[i] if starts else 0
        nt = len(table)
        slots.extend(table[p // block_size] * block_size + p % block_size if p // block_size < nt else -1
                     for p in range(s, s + n))
    return torch.tensor(slots, dtype=torch.long).to(device)


@dataclass
class TransferStats:
    bytes_raw: int = 0            # uncompressed KV bytes
    bytes_wire: int = 0           # payload bytes actually sent / received
    seconds: float = 0.0          # plan posted -> plan complete (receiver)
    plans: int = 0
    failures: int = 0


@dataclass
class _SendPlan:
    dest: int
    slots: torch.Tensor           # [T] slots in the prefill cache
    failed: bool = False          # a send raised (the peer is gone): the rest of the plan is skipped


def _one_route(peer: int) -> list[tuple[int, slice | None]]:
    return [(peer, None)]


class KVSender:
    def __init__(self, channel: KVChannel, codec, num_kv_heads: int, head_dim: int, routes=None):
        """routes(dest worker) -> [(peer rank, slice of my heads or None: all)] (kvtransfer/reshard.py)."""
        self.ch = channel
        self.codec = codec
        self.h, self.d = num_kv_heads, head_dim
        self.routes = routes or _one_route
        self.plans: list[_SendPlan] = []
        self.inflight: list[tuple] = []        # (work, payload): payloads live until sent
        self.stats = TransferStats()

    def begin(self, plans: list[_SendPlan]) -> None:
        self.plans = plans

    def on_layer(self, layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        if not self.plans:
            return
        kf = k_cache.view(-1, self.h, self.d)
        vf = v_cache.view(-1, self.h, self.d)
        for p in self.plans:
            for peer, heads in self.routes(p.dest):
                if p.failed:
                    break
                if heads is None:
                    kv = torch.stack((kf[p.slots], vf[p.slots]))            # [2, T, Hkv, D]
                else:
                    kv = torch.stack((kf[p.slots, heads], vf[p.slots, heads]))   # [2, T, heads, D]
                payload = self.codec.encode(kv)
                self.stats.bytes_raw += kv.numel() * kv.element_size()
                self.stats.bytes_wire += payload.numel()
                try:
                    self.inflight.append((self.ch.isend(payload, peer, tag=layer), payload))
                except Exception:  # noqa: BLE001 - one dead peer must not fail the batch's other plans
                    p.failed = True
                    self.stats.failures += 1

    def end(self) -> None:
        self.plans = []
        self.reap()

    def reap(self, block: bool = False) -> None:
        """Drop payloads whose sends completed (all of them when block)."""
        keep = []
        for work, payload in self.inflight:
            try:
                if block:
                    work.wait()
                elif not work.is_completed():
                    keep.append((work, payload))
            except Exception:  # noqa: BLE001 - the peer is gone; its receiver reports the loss
                self.stats.failures += 1
        self.inflight = keep


# A plan's state on one receiving rank (KVReceiver.progress); a TP group combines its ranks'
# (disagg/engine/tp_group.py).
PENDING, LANDED, BAD_CHECKSUM, FAILED = 0, 1, 2, 3


class _FailedWork:
    """A receive that could not even be posted (the peer's connection is closed)."""

    def __init__(self, error: BaseException):
        self.error = error

    def is_completed(self) -> bool:
        raise self.error

    def wait(self) -> None:
        raise self.error


@dataclass
class PendingPlan:
    src: int                      # the prefill worker
    plan_id: int
    request_ids: list[str]
    num_tokens: list[int]
    slots: torch.Tensor
    buffers: list[list]           # [layer][route] payload buffers (None once written)
    works: list[list]             # [layer][route]
    routes: list                  # [(peer rank, slice of my heads or None)]
    started: float = field(default_factory=time.monotonic)
    next_layer: int = 0
    oks: list[torch.Tensor] = field(default_factory=list)
    keep: torch.Tensor | None = None   # token indices to write (None: all); the rest are discarded
    expired: bool = False         # past the receiver's deadline (the decode worker's bookkeeping)
    state: int = PENDING          # on this rank

    @property
    def failed(self) -> bool:
        """A receive raised (the peer is gone): nothing more will land."""
        return self.state == FAILED


class KVReceiver:
    def __init__(self, channel: KVChannel, codec, kernels: KernelSet,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, routes=None):
        """routes(src worker) -> [(peer rank, slice of my heads or None: all)] (kvtransfer/reshard.py)."""
        self.routes = routes or _one_route
        self.ch = channel
        self.codec = codec
        self.k = kernels
        self.kv_caches = kv_caches
        self.h, self.d = num_kv_heads, head_dim
        self.dtype = dtype
        self.device = device
        self.pending: list[PendingPlan] = []
        self.stats = TransferStats()

    def post(self, src: int, plan_id: int, request_ids: list[str], num_tokens: list[int],
             slots: torch.Tensor) -> None:
        """slots [T]: where each received token's KV goes; -1 = receive it but write it nowhere.
        Give them on the host (slot_mapping(..., cpu)): the -1 check then costs no device sync."""
        keep = None
        if slots.numel() and int(slots.min()) < 0:     # rare: an abort raced the plan
            keep = (slots >= 0).nonzero().flatten().to(self.device)
            slots = slots[slots >= 0]
        slots = slots.to(self.device)
        T = sum(num_tokens)
        routes = self.routes(src)
        sizes = [self.codec.payload_nbytes((2, T, self._nheads(hs), self.d), self.dtype) for _, hs in routes]
        bufs, works = [], []
        for layer in range(len(self.kv_caches)):
            bl, wl = [], []
            for (peer, _), n in zip(routes, sizes):
                b = torch.empty(n, dtype=torch.uint8, device=self.device)
                try:
                    wl.append(self.ch.irecv(b, peer, tag=layer))
                except Exception as e:  # noqa: BLE001 - the peer is already gone: poll() reports the plan lost
                    wl.append(_FailedWork(e))
                bl.append(b)
            bufs.append(bl)
            works.append(wl)
        self.pending.append(PendingPlan(src, plan_id, request_ids, num_tokens, slots, bufs, works, routes, keep=keep))

    def _nheads(self, heads: slice | None) -> int:
        return self.h if heads is None else heads.stop - heads.start

    def poll(self) -> list[tuple[PendingPlan, bool | None]]:
        """Decode the layers that landed; return (plan, checksums_ok) for plans now complete, and
        (plan, None) for plans whose receive failed (the peer is gone). Only this method (through
        progress) writes into the cache, so a plan dropped here can never scribble on blocks freed
        afterwards."""
        return self.finish([(p, s) for p, s in zip(list(self.pending), self.progress()) if s != PENDING])

    def progress(self) -> list[int]:
        """Advance every pending plan (decode and scatter what landed); its state on this rank, in post order."""
        for p in self.pending:
            if p.state != PENDING:
                continue
            try:
                self._drain(p)
            except Exception:  # noqa: BLE001 - a failed receive (connection closed): the plan is lost
                p.state = FAILED
                continue
            if p.next_layer == len(p.works):
                ok = bool(torch.stack(p.oks).all()) if p.oks else True   # the one host read per plan
                p.state = LANDED if ok else BAD_CHECKSUM
        return [p.state for p in self.pending]

    def finish(self, plans: list[tuple[PendingPlan, int]]) -> list[tuple[PendingPlan, bool | None]]:
        """Retire plans in these final states (for a TP group: the states all its ranks agreed on);
        their unlanded receives, if any, are never drained."""
        out = []
        for p, state in plans:
            if state == FAILED:
                self.stats.failures += 1
                out.append((p, None))
                continue
            self.stats.plans += 1
            self.stats.seconds += time.monotonic() - p.started
            if state == BAD_CHECKSUM:
                self.stats.failures += 1
            out.append((p, state == LANDED))
        if out:
            ids = {id(p) for p, _ in plans}
            self.pending = [p for p in self.pending if id(p) not in ids]
        return out

    def _drain(self, p: PendingPlan) -> None:
        T = sum(p.num_tokens)
        while p.next_layer < len(p.works) and all(w.is_completed() for w in p.works[p.next_layer]):
            layer = p.next_layer
            kc, vc = self.kv_caches[layer]
            for i, (_, heads) in enumerate(p.routes):
                p.works[layer][i].wait()     # orders the compute stream after the receive (no host wait)
                buf = p.buffers[layer][i]
                kv, ok = self.codec.decode(buf, (2, T, self._nheads(heads), self.d), self.dtype)
                if p.keep is not None:
                    kv = kv[:, p.keep]
                if p.slots.numel():
                    if heads is None:
                        self.k.write_kv(kv[0], kv[1], kc, vc, p.slots)
                    else:                    # a slice of this rank's heads (TP resharding)
                        kc.view(-1, self.h, self.d)[p.slots, heads] = kv[0].to(kc.dtype)
                        vc.view(-1, self.h, self.d)[p.slots, heads] = kv[1].to(vc.dtype)
                p.oks.append(ok)
                self.stats.bytes_wire += buf.numel()
                self.stats.bytes_raw += kv.numel() * kv.element_size()
                p.buffers[layer][i] = None   # free the payload as soon as it is in the cache
            p.next_layer += 1
