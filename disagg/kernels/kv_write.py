"""Triton scatter of new K/V rows into the paged cache: one program per token.

    token t -> slot = slot_mapping[t] -> cache row slot (= block_id * block_size + offset)
    k_cache.view(num_blocks * block_size, Hkv, D)[slot] = k[t]      (skipped if slot < 0)

Slots >= num_blocks * block_size are skipped too (out of range; never written).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _write_kv_kernel(
    k_ptr,        # [T, Hkv, D]  (unit stride on D)
    v_ptr,        # [T, Hkv, D]  (unit stride on D)
    k_cache_ptr,  # [num_slots, Hkv, D] contiguous (= [num_blocks, block_size, Hkv, D])
    v_cache_ptr,  # [num_slots, Hkv, D] contiguous
    slot_ptr,     # [T] int32/int64
    stride_kt, stride_kh, stride_vt, stride_vh,
    num_slots, Hkv,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    valid = (slot >= 0) & (slot < num_slots)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = ((h < Hkv)[:, None] & (d < D)[None, :]) & valid
    src_k = t * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = t * stride_vt + h[:, None] * stride_vh + d[None, :]
    dst = slot * Hkv * D + h[:, None] * D + d[None, :]
    k = tl.load(k_ptr + src_k, mask=mask)
    v = tl.load(v_ptr + src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping):
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must be [T, Hkv, D] of one shape; got {tuple(k.shape)}, {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"caches must be [num_blocks, block_size, Hkv, D] matching k's [Hkv, D]; got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)} for k {tuple(k.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if any(t.dtype not in _DTYPES for t in (k, v, k_cache, v_cache)):
        raise ValueError("write_kv supports fp16/bf16/fp32 tensors")
    T = k.shape[0]
    if slot_mapping.shape != (T,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be [T={T}] int32/int64; got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    if not (k.is_cuda and all(t.device == k.device for t in (v, k_cache, v_cache, slot_mapping))):
        raise ValueError("write_kv inputs must be on the same CUDA device")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k and v must have unit stride on head_dim")


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Same contract as reference.write_kv: k, v [T, Hkv, D] into the caches at slot_mapping [T]."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    T, Hkv, D = k.shape
    if T == 0:
        return
    nb, bs = k_cache.shape[:2]
    block_d = triton.next_power_of_2(D)
    block_h = triton.next_power_of_2(Hkv)
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), nb * bs, Hkv,
        D=D, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4 if block_h * block_d <= 2048 else 8)
