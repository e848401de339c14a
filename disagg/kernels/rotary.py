"""Triton neox-style rotary embedding (HF Llama `rotate_half`): one program per token.

    x = [x1 | x2] (halves of D),  c, s = cos_sin[pos, :D/2], cos_sin[pos, D/2:] (rounded to x.dtype)
    out = [x1*c - x2*s | x2*c + x1*s]

Each product and each sum is rounded to the dtype, as torch's eager ops in reference.py
round them, so the outputs match the reference bit for bit. That needs FP fusion off: with
it, the compiler turns the rounded fp32 ops into bf16/fp16 ops and contracts x1*c - x2*s
into one fma (one rounding instead of three; ~20% of bf16 outputs differed by an ulp).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, stride_xh, stride_oh, H, c, s,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # x, o: one token's [H, 2*HALF] rows (unit stride on D); c, s: [BLOCK_HALF] fp32,
    # already rounded to the element dtype
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h < H)[:, None] & (j < HALF)[None, :]
    xo = h[:, None] * stride_xh + j[None, :]
    oo = h[:, None] * stride_oh + j[None, :]
    dt = o_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)          # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(x_ptr + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    c = c[None, :]
    s = s[None, :]
    a1 = (x1 * c).to(dt).to(tl.float32)
    b1 = (x2 * s).to(dt).to(tl.float32)
    a2 = (x2 * c).to(dt).to(tl.float32)
    b2 = (x1 * s).to(dt).to(tl.float32)
    tl.store(o_ptr + oo, (a1 - b1).to(dt), mask=mask)
    tl.store(o_ptr + oo + HALF, (a2 + b2).to(dt), mask=mask)


@triton.jit
def _rotary_embedding_kernel(
    q_ptr,        # [T, Hq, D]   (unit stride on D)
    k_ptr,        # [T, Hkv, D]  (unit stride on D)
    pos_ptr,      # [T] int32/int64
    cs_ptr,       # [max_pos, D] float32 (unit stride on D): cos | sin
    q_out_ptr,    # [T, Hq, D]   (unit stride on D)
    k_out_ptr,    # [T, Hkv, D]  (unit stride on D)
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cs, Hq, Hkv,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    dt = q_out_ptr.dtype.element_ty
    c = tl.load(cs_ptr + pos * stride_cs + j, mask=jm, other=0.0).to(dt).to(tl.float32)
    s = tl.load(cs_ptr + pos * stride_cs + HALF + j, mask=jm, other=0.0).to(dt).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh,
                  Hq, c, s, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, stride_kh, stride_koh,
                  Hkv, c, s, HALF, BLOCK_HKV, BLOCK_HALF)


def _check(q, k, positions, cos_sin, out):
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be [T, Hq, D] and k [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    T, _, D = q.shape
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one dtype of fp16/bf16/fp32; got {q.dtype}, {k.dtype}")
    if cos_sin.dtype != torch.float32 or cos_sin.dim() != 2 or cos_sin.shape[1] != D \
            or cos_sin.stride(1) != 1:
        raise ValueError(f"cos_sin must be float32 [max_pos, D={D}] with unit stride on D; got "
                         f"{cos_sin.dtype} {tuple(cos_sin.shape)}")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be [T={T}] int32/int64; got {tuple(positions.shape)} "
                         f"{positions.dtype}")
    if not (q.is_cuda and all(t.device == q.device for t in (k, positions, cos_sin))):
        raise ValueError("q, k, positions and cos_sin must be on the same CUDA device")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k must have unit stride on head_dim")
    if out is not None:
        for name, o, ref in (("q_out", out[0], q), ("k_out", out[1], k)):
            if o.shape != ref.shape or o.dtype != ref.dtype or o.device != ref.device or o.stride(2) != 1:
                raise ValueError(f"{name} must match {tuple(ref.shape)} {ref.dtype} with unit stride on D")


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, *,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as reference.rotary_embedding; returns new (q, k) unless `out` names them.

    q, k may be strided views (e.g. slices of a fused qkv projection); positions must be
    in [0, max_pos) (not checked: that would need a host sync).
    """
    _check(q, k, positions, cos_sin, out)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    q_out, k_out = out if out is not None else (torch.empty_like(q, memory_format=torch.contiguous_format),
                                                torch.empty_like(k, memory_format=torch.contiguous_format))
    if T == 0:
        return q_out, k_out
    half = D // 2
    block_hq = triton.next_power_of_2(Hq)
    _rotary_embedding_kernel[(T,)](
        q, k, positions, cos_sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_sin.stride(0), Hq, Hkv,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=block_hq, BLOCK_HKV=triton.next_power_of_2(Hkv),
        num_warps=4 if block_hq * half <= 2048 else 8, enable_fp_fusion=False)
    return q_out, k_out
