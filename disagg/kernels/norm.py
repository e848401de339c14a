"""Triton RMSNorm and fused residual-add + RMSNorm: one program per row, one pass.

Rounding follows reference.py step by step, so the outputs match it to the last bit
except where the fp32 rsqrt differs by an ulp:
    r   = (x + residual) in x.dtype               (fused variant only)
    y   = (r_f32 * rsqrt(mean(r_f32^2) + eps)).to(x.dtype)
    out = weight * y                              (in promote(weight.dtype, x.dtype))
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HIDDEN = 65536   # one row lives in one program's registers


@triton.jit
def _rms_norm_kernel(
    x_ptr,        # [T, H]  (unit stride on H)
    res_ptr,      # [T, H]  residual (HAS_RESIDUAL only)
    w_ptr,        # [H]     contiguous
    out_ptr,      # [T, H]  (unit stride on H), dtype promote(w, x)
    res_out_ptr,  # [T, H]  x + residual in x's dtype (HAS_RESIDUAL only)
    stride_x, stride_res, stride_out, stride_res_out,
    H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
    y = (xf * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(name: str, t: torch.Tensor, hidden: int) -> torch.Tensor:
    """[..., H] -> [T, H] view with unit stride on H (copies only if no such view exists)."""
    if t.shape[-1] != hidden:
        raise ValueError(f"{name} has last dim {t.shape[-1]}, weight has {hidden}")
    t2 = t if t.dim() == 2 else t.reshape(-1, hidden)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"rms_norm supports fp16/bf16/fp32; got x {x.dtype}, weight {weight.dtype}")
    if weight.dim() != 1 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [H] vector; got {tuple(weight.shape)}")
    if not (x.is_cuda and weight.device == x.device):
        raise ValueError("x and weight must be on the same CUDA device")
    if weight.shape[0] > MAX_HIDDEN:
        raise ValueError(f"hidden size {weight.shape[0]} > {MAX_HIDDEN} is not supported")


def _launch(x2, res2, weight, out, res_out, eps):
    T, H = x2.shape
    if T == 0:
        return
    block_h = triton.next_power_of_2(H)
    num_warps = min(max(block_h // 512, 1), 16)
    has_res = res2 is not None
    _rms_norm_kernel[(T,)](
        x2, res2 if has_res else x2, weight, out, res_out if has_res else out,
        x2.stride(0), res2.stride(0) if has_res else 0, out.stride(0),
        res_out.stride(0) if has_res else 0, H, eps,
        HAS_RESIDUAL=has_res, BLOCK_H=block_h, num_warps=num_warps)


def _check_out(name, out, shape, dtype, device):
    if out.shape != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {tuple(shape)} {dtype} tensor on {device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., H], weight: [H] -> [..., H] in promote(weight, x) (x.dtype when they agree)."""
    _check(x, weight)
    H = weight.shape[0]
    x2 = _as_rows("x", x, H)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _check_out("out", out, x.shape, out_dtype, x.device)
    _launch(x2, None, weight, out.view(-1, H), None, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual (in x.dtype); returns (rms_norm(residual'), residual').

    Inputs are not modified; `out` = (normed, residual') may name the outputs, and
    residual' may be `residual` itself (each element is read before it is written).
    """
    _check(x, weight)
    if residual.dtype != x.dtype or residual.shape != x.shape or residual.device != x.device:
        raise ValueError(f"residual must match x: {tuple(residual.shape)} {residual.dtype} vs "
                         f"{tuple(x.shape)} {x.dtype}")
    H = weight.shape[0]
    x2 = _as_rows("x", x, H)
    r2 = _as_rows("residual", residual, H)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = (torch.empty(x.shape, dtype=out_dtype, device=x.device),
               torch.empty(x.shape, dtype=x.dtype, device=x.device))
    normed, res_out = out
    _check_out("out[0]", normed, x.shape, out_dtype, x.device)
    _check_out("out[1]", res_out, x.shape, x.dtype, x.device)
    _launch(x2, r2, weight, normed.view(-1, H), res_out.view(-1, H), eps)
    return normed, res_out
