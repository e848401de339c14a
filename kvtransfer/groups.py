"""Process groups built without a global torch.distributed world, so that a restarted worker can rejoin.

One TCPStore, hosted by the driver (the router process, which outlives every worker), is the
only rendezvous. Each group is built directly on a PrefixStore named by its members and an
epoch; nothing is registered in torch.distributed's global state:

    pair/0/3/e0      prefill 0 <-> decode 3, formed at bring-up
    pair/0/3/e2      the same pair re-formed after decode 3 restarted (epoch 2): fresh keys,
                     fresh connections; the old group is aborted and dropped on the live side
    group/0/4/5/e0   prefill 0's ring group {0, its helpers 4, 5} (group rank = list position)

Building a group blocks until every member has called build_group with the same name (the
store is the meeting point), so members build their groups in one global order (the order
of kvtransfer.channel.ChannelConfig.pairs() then worker_groups()), which cannot deadlock.

Operations go through the group object with *group* ranks: `pg.send([t], dst, tag)`,
`pg.recv([t], src, tag)`, `pg.allreduce([t])`. (torch.distributed's functional API and
P2POp want a registered group; isend/irecv with group_dst= would work, batch_isend_irecv
would not.) `exchange` is the ring's batched send+recv: one NCCL group call, so a two-rank
ring cannot deadlock; gloo's operations are asynchronous already.
"""
from __future__ import annotations

import socket
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, ProcessGroup


def serve_store(host: str = "127.0.0.1", timeout_s: float = 600.0) -> tuple[dist.TCPStore, str]:
    """Host the rendezvous store, listening on `host` only (loopback by default; TCPStore would
    otherwise bind every interface). Returns the store (keep it alive) and its tcp://host:port."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s), master_listen_fd=sock.detach())
    return store, f"tcp://{host}:{port}"


def connect_store(addr: str, timeout_s: float = 600.0) -> dist.TCPStore:
    u = urlparse(addr)
    return dist.TCPStore(u.hostname, u.port, is_master=False, timeout=timedelta(seconds=timeout_s))


def group_name(kind: str, ranks: list[int], epoch: int) -> str:
    return f"{kind}/{'/'.join(map(str, ranks))}/e{epoch}"


def build_group(store: dist.Store, name: str, rank: int, size: int, backend: str, device: torch.device,
                timeout_s: float, listen_host: str = "127.0.0.1") -> ProcessGroup:
    """A `size`-rank group on PrefixStore(name); `rank` is this process's group rank. gloo listens
    on listen_host (loopback unless the cluster spans nodes)."""
    ps = PrefixStore(name, store)
    pg = ProcessGroup(ps, rank, size)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo
        opts = ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [ProcessGroupGloo.create_device(hostname=listen_host)]
        be, kind, dev = ProcessGroupGloo(ps, rank, size, opts), ProcessGroup.BackendType.GLOO, torch.device("cpu")
    elif backend == "nccl":
        from torch.distributed import ProcessGroupNCCL
        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        be, kind, dev = ProcessGroupNCCL(ps, rank, size, opts), ProcessGroup.BackendType.NCCL, device
    else:
        raise ValueError(f"unknown backend {backend!r}")
    pg._set_default_backend(kind)
    be._set_sequence_number_for_group()
    pg._register_backend(dev, kind, be)
    return pg


def exchange(pg: ProcessGroup, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> list:
    """Send `send` to group rank dst and receive `recv` from src, as one batch (NCCL: one group
    call, as batch_isend_irecv does). Returns the works to wait on."""
    be = pg._get_backend(send.device)
    if be.supports_coalescing:
        pg._start_coalescing(send.device)
        pg.send([send], dst, 0)
        pg.recv([recv], src, 0)
        return [pg._end_coalescing(send.device)]
    return [pg.send([send], dst, 0), pg.recv([recv], src, 0)]


def barrier(pg: ProcessGroup, device: torch.device) -> None:
    """All members meet (a one-element all-reduce: works on every backend, creates NCCL's communicator)."""
    t = torch.zeros(1, device=device)
    pg.allreduce([t]).wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def abort(pg: ProcessGroup | None) -> None:
    """Stop a group whose peer is gone: its pending operations fail instead of waiting for the
    timeout (NCCL: ncclCommAbort). Best effort: a group never used may have nothing to abort."""
    if pg is None:
        return
    try:
        pg.abort()
    except Exception:  # noqa: BLE001 - already broken or never connected
        pass


# Collectives that work on every kind of group: None (the default world: tests, benchmarks), a
# registered subgroup, or one built here (group ranks throughout).
def size(pg: ProcessGroup | None) -> int:
    return dist.get_world_size() if pg is None else pg.size()


def rank(pg: ProcessGroup | None) -> int:
    return dist.get_rank() if pg is None else pg.rank()


def all_reduce(pg: ProcessGroup | None, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place; returns t."""
    if pg is None:
        dist.all_reduce(t, op=op)
        return t
    opts = dist.AllreduceOptions()
    opts.reduceOp = op
    pg.allreduce([t], opts).wait()
    return t


def broadcast(pg: ProcessGroup | None, t: torch.Tensor, root: int = 0) -> torch.Tensor:
    """From group rank `root`, in place; returns t."""
    if pg is None:
        dist.broadcast(t, root)
        return t
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = root, 0
    pg.broadcast([t], opts).wait()
    return t
