"""Triton paged attention for decode (one query token per sequence), split-K ("flash decoding").

Work split. One program owns (sequence b, KV head h, split s): it reads each K/V token of
its slice of the context once and scores it against all G = Hq / Hkv query heads that
share head h (GQA), so the KV bytes are read once per KV head, not once per query head.

    context of sequence b, ctx tokens, NUM_SPLITS splits, chunk a multiple of BLOCK_N:

    token  0 ........ chunk ........ 2*chunk ....... ctx        (ctx <= M * BS)
          |  split 0   |  split 1     |  split 2 ... |
          each split walks its tokens BLOCK_N at a time; token t is read from
          cache slot block_tables[b, t // BS] * BS + t % BS

    chunk = ceil(ceil(ctx / NUM_SPLITS) / BLOCK_N) * BLOCK_N, so the work adapts to the
    actual context on the device while the grid depends on shapes only: splits past the
    context run no iterations, and a row with ctx == 0 gives zeros.

NUM_SPLITS == 1: the program normalises and writes the output directly. Otherwise each
split writes its normalised partial output and its log-sum-exp (base 2), and
`_paged_attention_reduce_kernel` merges the active splits of each (b, query head):

    out = sum_s 2^(lse_s - max lse) * o_s / sum_s 2^(lse_s - max lse)

CUDA-graph safe: no host syncs; the grid is (B, Hkv, NUM_SPLITS) and (B, Hq), and
NUM_SPLITS comes from (B, Hkv, M, BS) and the device's multiprocessor count.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

TOKENS_PER_SPLIT = 4096   # long contexts: at least 2 pieces, so one long row is no straggler
CTAS_PER_SM = 4           # resident decode programs per SM (bf16, 128 threads, ~106 registers)
OVERHEAD_TOKENS = 128     # a program's fixed cost (q load, pipeline fill, epilogue) in tokens
MAX_SPLITS = 64           # bounds the reduce kernel's tile [S_PAD, D_PAD]


@triton.jit
def _paged_attention_decode_kernel(
    q_ptr,             # [B, Hq, D]                  (unit stride on D)
    k_cache_ptr,       # [num_blocks, BS, HKV, D]    contiguous
    v_cache_ptr,       # [num_blocks, BS, HKV, D]    contiguous
    block_tables_ptr,  # [B, M] int32/int64          (unit stride on M)
    context_lens_ptr,  # [B] int32/int64
    out_ptr,           # NUM_SPLITS == 1: [B, Hq, D] in q's dtype (unit stride on D)
                       # else o_part:     [B, Hq, NUM_SPLITS, D] float32, contiguous
    lse_ptr,           # [B, Hq, NUM_SPLITS] float32, contiguous (unused when NUM_SPLITS == 1)
    qk_scale,          # softmax scale * log2(e): scores are in base 2
    G,                 # query heads per KV head
    M,                 # block table width
    stride_qb, stride_qh,
    stride_bt,
    stride_ob, stride_oh,
    HKV: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr,
    BS: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.minimum(tl.load(context_lens_ptr + b).to(tl.int32), M * BS)
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, ctx)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    n = tl.arange(0, BLOCK_N)
    head = kvh * G + g                                          # [G_PAD] query heads
    if D_PAD == D:
        q_mask = (g < G)[:, None]
    else:
        q_mask = (g < G)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)                         # [G_PAD, D_PAD]

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)          # running max (base 2)
    l_i = tl.zeros([G_PAD], tl.float32)                         # running sum of 2^(s - m_i)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)                  # running sum of p @ V
    bt_row = block_tables_ptr + b * stride_bt
    head_off = kvh * D
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + n                                            # [BLOCK_N] positions
        tmask = tok < end
        blk = tl.load(bt_row + tok // BS, mask=tmask, other=0).to(tl.int64)
        slot = blk * BS + tok % BS                              # [BLOCK_N] cache rows
        kv_off = slot[:, None] * (HKV * D) + head_off + d[None, :]   # [BLOCK_N, D_PAD]
        if D_PAD == D:
            kv_mask = tmask[:, None]
        else:
            kv_mask = tmask[:, None] & (d < D)[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G_PAD, BLOCK_N]
        s = tl.where(tmask[None, :], s, float("-inf"))
        # every tile holds >= 1 valid token, so m_new is finite and alpha never NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)                        # empty slice: acc == 0 -> zeros
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * stride_ob + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = (b * (HKV * G) + head) * NUM_SPLITS + split       # [G_PAD] index into [B, Hq, S]
        tl.store(out_ptr + row[:, None] * D + d[None, :], o, mask=q_mask)
        tl.store(lse_ptr + row, m_i + tl.log2(l_safe), mask=g < G)   # -inf for an empty split


@triton.jit
def _paged_attention_reduce_kernel(
    o_part_ptr,        # [B, Hq, NUM_SPLITS, D] float32, contiguous
    lse_ptr,           # [B, Hq, NUM_SPLITS] float32, contiguous (base 2)
    context_lens_ptr,  # [B]
    out_ptr,           # [B, Hq, D] in q's dtype (unit stride on D)
    Hq, M,
    stride_ob, stride_oh,
    D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    # same split arithmetic as the decode kernel: splits [0, n_active) hold tokens
    ctx = tl.minimum(tl.load(context_lens_ptr + b).to(tl.int32), M * BS)
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    n_active = tl.cdiv(ctx, tl.maximum(chunk, 1))               # 0 when ctx == 0

    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    smask = s < n_active
    row = (b * Hq + h) * NUM_SPLITS + s                         # [S_PAD]
    lse = tl.load(lse_ptr + row, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)                    # no active split: weights 0
    w = tl.exp2(lse - m)                                        # [S_PAD]
    denom = tl.sum(w, 0)
    o = tl.load(o_part_ptr + row[:, None] * D + d[None, :],
                mask=smask[:, None] & (d < D)[None, :], other=0.0)   # [S_PAD, D_PAD]
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < D)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) by dtype and head size."""
    if dtype == torch.float32:
        return 32, 4, 2
    return 64, 4, 3


def choose_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int,
                      block_n: int, num_sms: int) -> int:
    """Splits per (sequence, KV head), from shapes only (CUDA-graph safe).

    With P = batch * Hkv programs per split and CTAS_PER_SM * num_sms resident at once,
    S splits take about  waves(S) * (max_tokens / S + OVERHEAD_TOKENS)  where
    waves(S) = ceil(P * S / resident): the smallest S that minimises this wins, between
    ceil(max_tokens / TOKENS_PER_SPLIT) and min(MAX_SPLITS, ceil(max_tokens / block_n)).
    Partial waves are what it avoids: on an H200 (bf16, Llama-3-8B, graph replays) batch
    16 x 8K ran 130 us with 4 splits (512 programs, one wave) and 165 us with 5 (640).
    """
    max_tokens = max(max_blocks * block_size, 1)
    hi = max(1, min(MAX_SPLITS, triton.cdiv(max_tokens, block_n)))
    lo = min(hi, triton.cdiv(max_tokens, TOKENS_PER_SPLIT))
    programs = max(batch * num_kv_heads, 1)
    resident = CTAS_PER_SM * num_sms

    def cost(s: int) -> float:
        return triton.cdiv(programs * s, resident) * (max_tokens / s + OVERHEAD_TOKENS)
    return min(range(lo, hi + 1), key=lambda s: (cost(s), s))


def _check(q, k_cache, v_cache, block_tables, context_lens, out):
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and k_cache [num_blocks, block_size, Hkv, D]; "
                         f"got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    B, Hq, D = q.shape
    nb, bs, Hkv, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q has {D}, cache has {Dk}")
    if Hq % Hkv:
        raise ValueError(f"num query heads {Hq} is not a multiple of num KV heads {Hkv}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q/k_cache/v_cache must share one dtype of fp16/bf16/fp32; got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (q.is_cuda and k_cache.device == q.device and v_cache.device == q.device
            and block_tables.device == q.device and context_lens.device == q.device):
        raise ValueError("all paged attention inputs must be on the same CUDA device")
    if q.stride(2) != 1:
        raise ValueError("q must have unit stride on head_dim")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous [num_blocks, block_size, Hkv, D]")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be [B={B}, M] with unit stride on M; "
                         f"got {tuple(block_tables.shape)} strides {block_tables.stride()}")
    if block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables must be int32 or int64, got {block_tables.dtype}")
    if context_lens.shape != (B,) or context_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_lens must be [B={B}] int32/int64; got "
                         f"{tuple(context_lens.shape)} {context_lens.dtype}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device or out.stride(2) != 1):
        raise ValueError("out must match q's shape, dtype and device, with unit stride on D")


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, *, out: torch.Tensor | None = None,
                           num_splits: int | None = None,
                           config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Same contract as reference.paged_attention_decode; q [B, Hq, D] -> [B, Hq, D].

    num_splits / config (BLOCK_N, num_warps, num_stages) override the shape-based
    choices (tests and benchmarks); `out` lets a caller (or a test) supply the output.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, out)
    B, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    M = block_tables.shape[1]
    G = Hq // Hkv
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if B == 0:
        return out
    block_n, num_warps, num_stages = config or default_config(q.dtype, D)
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, M, bs, block_n, _num_sms(q.device.index or 0))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    d_pad = max(16, triton.next_power_of_2(D))                  # tl.dot needs K >= 16
    g_pad = max(16, triton.next_power_of_2(G))                  # tl.dot needs M >= 16
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: exact products
    consts = dict(HKV=Hkv, D=D, D_PAD=d_pad, G_PAD=g_pad, BS=bs, BLOCK_N=block_n,
                  NUM_SPLITS=num_splits, DOT_PRECISION=precision,
                  num_warps=num_warps, num_stages=num_stages)
    grid = (B, Hkv, num_splits)
    if num_splits == 1:
        _paged_attention_decode_kernel[grid](
            q, k_cache, v_cache, block_tables, context_lens, out, out, _LOG2E * scale,
            G, M, q.stride(0), q.stride(1), block_tables.stride(0),
            out.stride(0), out.stride(1), **consts)
        return out
    o_part = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
    _paged_attention_decode_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, o_part, lse, _LOG2E * scale,
        G, M, q.stride(0), q.stride(1), block_tables.stride(0), 0, 0, **consts)
    _paged_attention_reduce_kernel[(B, Hq)](
        o_part, lse, context_lens, out, Hq, M, out.stride(0), out.stride(1),
        D=D, D_PAD=d_pad, BS=bs, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        S_PAD=max(triton.next_power_of_2(num_splits), 2), num_warps=4)
    return out


def compile_variants(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, max_batch: int,
                     width: int) -> None:
    """Compile every variant of the kernels that batches 1..max_batch over a block table `width`
    wide can ask for (the split count is a compile-time constant chosen from batch and width), so
    that none compiles in the middle of serving (each first use stalled a step by up to ~1 s)."""
    _, bs, hkv, d = k_cache.shape
    block_n = default_config(k_cache.dtype, d)[0]
    nsm = _num_sms(k_cache.device.index or 0)
    first: dict[int, int] = {}
    for b in range(1, max_batch + 1):
        first.setdefault(choose_num_splits(b, hkv, width, bs, block_n, nsm), b)
    for b in first.values():
        q = torch.zeros(b, num_heads, d, device=k_cache.device, dtype=k_cache.dtype)
        bt = torch.zeros(b, width, dtype=torch.int32, device=k_cache.device)
        lens = torch.ones(b, dtype=torch.int32, device=k_cache.device)
        paged_attention_decode(q, k_cache, v_cache, bt, lens, 1.0)
