"""Datasheet figures for the analytic performance model: GPUs and the links between them.

Peak figures are the vendor's (dense bf16 tensor-core FLOP/s, HBM bandwidth, memory); the
efficiencies that turn them into what our engine reaches were fitted to our own H200
measurements (benchmarks/RESULTS.md, issue 2 and 3) and are applied to every GPU alike, so
figures for GPUs we never measured are estimates of the same engine on faster or slower
silicon, not measurements.

Links carry KV from a prefill GPU to a decode GPU (point to point, one direction) and the
all-reduces of tensor parallelism. A message of s bytes takes latency + s / bandwidth; the
NVLink entry is fitted to NCCL isend/irecv between two H200s (23 GB/s at 1 MiB, 174 at 16 MiB,
367 at 2 GiB: latency 50 us, 367 GB/s), TCP to NCCL over loopback TCP (4.7 GB/s).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_flops: float          # dense bf16 tensor-core peak, FLOP/s
    hbm_bytes_per_s: float     # HBM bandwidth
    memory_bytes: float        # what torch.cuda.mem_get_info reports as total
    nvlink_bytes_per_s: float  # one direction, per GPU (0: none)
    pcie_bytes_per_s: float    # one direction, x16


GB = 1e9
GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("NVIDIA H100 SXM 80GB", 989e12, 3.35e12, 85.0e9, 450 * GB, 64 * GB),
    "h200": GPUSpec("NVIDIA H200 141GB", 989e12, 4.8e12, 150.1e9, 450 * GB, 64 * GB),
    "a100": GPUSpec("NVIDIA A100 SXM 80GB", 312e12, 2.039e12, 85.0e9, 300 * GB, 32 * GB),
    "l40s": GPUSpec("NVIDIA L40S 48GB", 362e12, 0.864e12, 48.0e9, 0.0, 32 * GB),
    "l4": GPUSpec("NVIDIA L4 24GB", 121e12, 0.300e12, 24.0e9, 0.0, 32 * GB),
    "b200": GPUSpec("NVIDIA B200 180GB", 2250e12, 8.0e12, 192.0e9, 900 * GB, 64 * GB),
}


def gpu(name: str) -> GPUSpec:
    key = name.lower().replace("nvidia", "").replace("-", "").replace(" ", "")
    for k in GPUS:
        if key.startswith(k):
            return GPUS[k]
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")


def gpu_key(name: str) -> str:
    """'NVIDIA H200' -> 'h200' (the GPUS key), for profile file names."""
    spec = gpu(name)
    return next(k for k, v in GPUS.items() if v is spec)


@dataclass(frozen=True)
class LinkSpec:
    name: str
    bytes_per_s: float
    latency_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


# NVLink efficiency (NCCL p2p peak / datasheet one-way): 367 / 450 GB/s on the H200 pair.
NVLINK_EFFICIENCY = 367 / 450
PCIE_EFFICIENCY = 0.8


def link(kind: str, spec: GPUSpec) -> LinkSpec:
    """The link between two GPUs of `spec`: nvlink (same node), pcie (same node, no NVLink),
    ib (400 Gb/s InfiniBand NDR per GPU, across nodes), tcp (a ~40 Gb/s network, as measured)."""
    if kind == "nvlink":
        if not spec.nvlink_bytes_per_s:
            return link("pcie", spec)
        return LinkSpec("nvlink", spec.nvlink_bytes_per_s * NVLINK_EFFICIENCY, 50e-6)
    if kind == "pcie":
        return LinkSpec("pcie", spec.pcie_bytes_per_s * PCIE_EFFICIENCY, 30e-6)
    if kind == "ib":
        return LinkSpec("ib", 45 * GB, 30e-6)
    if kind == "tcp":
        return LinkSpec("tcp", 4.7 * GB, 95e-6)
    raise ValueError(f"unknown link {kind!r} (nvlink, pcie, ib, tcp)")


LINKS = ("nvlink", "pcie", "ib", "tcp")
