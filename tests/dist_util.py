"""Run a test body on N real processes joined by torch.distributed (gloo on CPU, 127.0.0.1).

    run_ranks(body, 4, arg1, arg2)   ->   body(rank, world, arg1, arg2) in 4 spawned processes
    spawn_ranks(body, 4, arg1)       ->   body(rank, world, "tcp://127.0.0.1:PORT", arg1), not joined:
                                          the body builds its own process group (a KVChannel)

`body` must be a module-level function (spawn imports it by name). An exception or a failed
assert in any rank fails the caller with that rank's traceback.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, body, args) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        body(rank, world, *args)
    except BaseException:
        dist.destroy_process_group()
        raise                      # spawn reports this rank's traceback
    dist.barrier()                 # every rank done before rank 0 (the store's host) goes
    dist.destroy_process_group()
    # Leave at once: a gloo process tearing down at interpreter exit sometimes aborts ("terminate
    # called without an active exception"; test_tensor_parallel in one full run of session 4), which
    # says nothing about what was tested (test_reshard and test_stateless_groups do the same).
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(body, world: int, *args) -> None:
    mp.spawn(_entry, args=(world, _free_port(), body, args), nprocs=world, join=True)


def _spawn_entry(rank: int, world: int, port: int, body, args) -> None:
    torch.set_num_threads(1)
    body(rank, world, f"tcp://127.0.0.1:{port}", *args)


def spawn_ranks(body, world: int, *args) -> None:
    mp.spawn(_spawn_entry, args=(world, _free_port(), body, args), nprocs=world, join=True)
