"""Kernels behind one small interface: Triton on CUDA, the torch reference elsewhere.

`get_kernels(use_triton)` returns a KernelSet chosen once by the model runner; the hot
loop never branches on the device. Each Triton kernel lives beside its wrapper in this
package and must match `reference.py` (see tests/kernels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from disagg.kernels import reference


@dataclass(frozen=True)
class KernelSet:
    name: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    rotary_embedding: Callable
    write_kv: Callable
    paged_attention_decode: Callable
    silu_and_mul: Callable


REFERENCE = KernelSet(
    name="torch-reference",
    rms_norm=reference.rms_norm,
    fused_add_rms_norm=reference.fused_add_rms_norm,
    rotary_embedding=reference.rotary_embedding,
    write_kv=reference.write_kv,
    paged_attention_decode=reference.paged_attention_decode,
    silu_and_mul=reference.silu_and_mul,
)


def triton_available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
        return torch.cuda.is_available()
    except ImportError:
        return False


def get_kernels(use_triton: bool | None = None) -> KernelSet:
    """use_triton None: Triton when a CUDA GPU and triton are present."""
    if use_triton is None:
        use_triton = triton_available()
    if not use_triton:
        return REFERENCE
    from disagg.kernels.triton_ops import TRITON
    return TRITON
