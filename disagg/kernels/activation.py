"""Triton fused SwiGLU activation: silu(gate) * up in one pass over [T, 2I].

Unfused, torch reads gate_up, writes silu(gate), reads it and up, writes the product:
about 2.5x the bytes. Rounding follows the reference: silu in fp32 rounded to the
dtype (torch's silu kernel), then the product in fp32 rounded to the dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,      # [T, 2I]  gate in [:, :I], up in [:, I:]; unit stride on the last dim
    out_ptr,    # [T, I]   contiguous
    stride_x, I,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    out = s.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * I + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2I]; got {tuple(gate_up.shape)}")
    if gate_up.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"silu_and_mul supports fp16/bf16/fp32; got {gate_up.dtype}")
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(T, I, device=gate_up.device, dtype=gate_up.dtype)
    if T == 0:
        return out
    BLOCK = 1024
    _silu_and_mul_kernel[(T, triton.cdiv(I, BLOCK))](gate_up, out, gate_up.stride(0), I, BLOCK=BLOCK)
    return out
