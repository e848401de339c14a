"""The Triton KernelSet: one wrapper per kernel, each in its own module beside its kernel.

    norm.py             rms_norm, fused_add_rms_norm
    rotary.py           rotary_embedding
    kv_write.py         write_kv
    paged_attention.py  paged_attention_decode (split-K, GQA-aware, CUDA-graph safe)
    activation.py       silu_and_mul (SwiGLU)

Importing this module needs triton; `disagg.kernels.get_kernels` imports it only when a
CUDA GPU and triton are present. Every function keeps reference.py's signature.
"""
from __future__ import annotations

from disagg.kernels import KernelSet
from disagg.kernels.activation import silu_and_mul
from disagg.kernels.kv_write import write_kv
from disagg.kernels.norm import fused_add_rms_norm, rms_norm
from disagg.kernels.paged_attention import paged_attention_decode
from disagg.kernels.rotary import rotary_embedding

TRITON = KernelSet(
    name="triton",
    rms_norm=rms_norm,
    fused_add_rms_norm=fused_add_rms_norm,
    rotary_embedding=rotary_embedding,
    write_kv=write_kv,
    paged_attention_decode=paged_attention_decode,
    silu_and_mul=silu_and_mul,
)
