"""Torch reference implementations of every kernel: the contract the Triton kernels meet.

They run on CPU (and anywhere else); tests compare the Triton kernels against them.

KV cache layout, one pair per layer:
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A token's slot is `block_id * block_size + offset`; a request's block table lists its
block ids in order, so token position p lives in block_table[p // block_size] at
offset p % block_size:

    positions  0 ..15 | 16..31 | 32..47        (block_size 16)
    block_table [  7   ,   2   ,   9  ]   -> position 20 is slot 2*16 + 4 = 36
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H], weight: [H] -> [T, H] in x.dtype. Statistics in float32 (as HF does)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual (in x.dtype); returns (rms_norm(residual'), residual')."""
    r = x + residual
    return rms_norm(r, weight, eps), r


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary (HF Llama `rotate_half`).

    q: [T, Hq, D], k: [T, Hkv, D], positions: [T] int64,
    cos_sin: [max_pos, D] float32, first D/2 columns cos, last D/2 sin.
    Returns new (q, k) in their dtype.
    """
    half = q.shape[-1] // 2
    cs = cos_sin[positions]                                  # [T, D]
    cos = cs[:, :half].repeat(1, 2)[:, None, :].to(q.dtype)  # [T, 1, D]
    sin = cs[:, half:].repeat(1, 2)[:, None, :].to(q.dtype)

    def rot(x):
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rot(q), rot(k)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter k, v: [T, Hkv, D] into the caches at slot_mapping: [T] int64; slots < 0 are skipped."""
    nb, bs, h, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(nb * bs, h, d)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(nb * bs, h, d)[slots] = v[keep].to(v_cache.dtype)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One query token per sequence against its paged context (GQA: Hq = G * Hkv).

    q: [B, Hq, D]; block_tables: [B, M] int32 (entries past the context are ignored);
    context_lens: [B] int32, the number of cached tokens including the current one
    (0: padding row, output zeros). Returns [B, Hq, D] in q.dtype; softmax in float32.
    """
    B, Hq, D = q.shape
    nb, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    M = block_tables.shape[1]
    L = M * bs
    bt = block_tables.long().clamp(0, nb - 1)
    k = k_cache[bt].reshape(B, L, Hkv, D).float()            # [B, L, Hkv, D]
    v = v_cache[bt].reshape(B, L, Hkv, D).float()
    qf = q.float().view(B, Hkv, G, D)
    s = torch.einsum("bhgd,blhd->bhgl", qf, k) * scale       # [B, Hkv, G, L]
    mask = torch.arange(L, device=q.device)[None, :] >= context_lens[:, None].long()  # [B, L]
    s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)             # all-masked rows -> 0
    out = torch.einsum("bhgl,blhd->bhgd", p, v)
    return out.reshape(B, Hq, D).to(q.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate then up) -> silu(gate) * up: [T, I] in gate_up.dtype (as HF computes it)."""
    g, u = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u
