"""Shared helpers for the benchmarks: timers, the two measured ceilings, machine facts, JSON.

Every benchmark measures its own references in the same run (STYLE.md point 12):

    copy bandwidth   one large device-to-device copy, bytes read + bytes written over time
    matmul rate      one large bf16 GEMM, 2*M*N*K over time

On CPU both are measured crudely (small sizes, host timer) so the code paths still run;
the JSON marks them `crude`.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------- timers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_device(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    """Seconds per call of `fn` (device time: CUDA events around each call; host timer on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        return time_host(fn, device, iters, warmup=0)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def time_host(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    """Seconds per call of `fn` by the host clock, the device synchronized before and after each
    call: the end-to-end cost, host work included."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def summarize(samples: list[float]) -> dict:
    """Median first (the figure we report), with the spread beside it."""
    s = sorted(samples)
    return {"median_s": statistics.median(s), "min_s": s[0], "max_s": s[-1], "samples": len(s)}


# ---------------------------------------------------------------------- ceilings
def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 50) -> dict:
    """Device-to-device copy: (bytes read + bytes written) / median time, in bytes/s."""
    if nbytes is None:
        nbytes = 2 * 2**30 if device.type == "cuda" else 64 * 2**20
    if device.type != "cuda":
        iters = min(iters, 10)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = summarize(time_device(lambda: dst.copy_(src), device, iters=iters, warmup=5))
    bw = 2 * nbytes / t["median_s"]
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"bytes_per_s": bw, "buffer_bytes": nbytes, "bytes_counted": 2 * nbytes, **t,
            "crude": device.type != "cuda"}


def matmul_rate(device: torch.device, n: int | None = None, dtype: torch.dtype | None = None,
                iters: int = 30) -> dict:
    """Square GEMM on random data (never zeros): 2*n^3 / median time, in FLOP/s."""
    if device.type == "cuda":
        n = n or 8192
        dtype = dtype or torch.bfloat16
    else:
        n = n or 1024
        dtype = dtype or torch.float32
        iters = min(iters, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = summarize(time_device(lambda: torch.mm(a, b, out=c), device, iters=iters, warmup=5))
    del a, b, c
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"flop_per_s": 2 * n**3 / t["median_s"], "n": n, "dtype": str(dtype).removeprefix("torch."),
            **t, "crude": device.type != "cuda"}


# ---------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "cpu": platform.processor() or platform.machine()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_bytes=p.total_memory,
                    sm_count=p.multi_processor_count, cuda=torch.version.cuda,
                    capability=f"{p.major}.{p.minor}")
    else:
        info["gpu"] = None
    return info


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def write_json(data: dict, filename: str, results_dir: str = RESULTS_DIR) -> list[str]:
    """Write `data` to results_dir/filename and, when $OUT is set, to $OUT/filename. Returns the paths."""
    paths = []
    for d in (results_dir, os.environ.get("OUT")):
        if not d:
            continue
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, filename)
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        paths.append(path)
    return paths


def _rank_main(rank: int, world: int, port: int, a: dict, bench: Callable) -> None:
    """One spawned rank: its device (cuda:rank, or CPU when a["tiny"]), the process group (NCCL on
    GPU, gloo on CPU, rendezvous on loopback), then bench(rank, world, device, a)."""
    from datetime import timedelta

    import torch.distributed as dist
    dev = torch.device("cuda", rank) if not a["tiny"] else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    else:
        torch.set_num_threads(1)
    kw = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=1800), **kw)
    try:
        bench(rank, world, dev, a)
    finally:
        dist.destroy_process_group()


def spawn_ranks(bench: Callable, world: int, a: dict) -> None:
    """Run bench(rank, world, device, a) in `world` spawned processes joined in one process group
    (no torchrun). `bench` must be a module-level function (it is pickled by name)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(world, port, a, bench), nprocs=world, join=True)
