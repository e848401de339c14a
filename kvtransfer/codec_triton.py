"""Triton kernels of the KV codecs (CUDA); codec.py holds the torch reference and the layout.

    pertoken_encode / pertoken_decode   fp8 and int8: one program per BLOCK_G rows of D values
    int4_encode / int4_decode           one launch: programs [0, NK) take key tiles
                                        (32 tokens x D channels of one head), the rest value
                                        tiles (BLOCK_R rows of D channels)
    checksum                            partial sums per 16 KiB, then one program folds them and
                                        seals (writes c, ~c) or verifies (writes ok)

Every kernel does the reference's fp32 arithmetic in the same order, with the same constants
(amax * fp32(1/qmax)), correctly rounded division (div_rn) and round half to even (rint), so
encode writes the reference's bytes.
The int4 kernels read and write even and odd channels as two strided halves, which is
exactly the nibble packing:   byte j = q[2j] | q[2j+1] << 4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:      # triton < 3.2
    from triton.language.extra.cuda import libdevice

from kvtransfer.codec import CHECKSUM_P, DTYPES, FP16_MAX, FP8_MAX, INT8_MAX, K_GROUP, fp32

CHECKSUM_BLOCK = 4096    # int32 words per partial sum
INV15 = tl.constexpr(fp32(1 / 15))


# ---------------------------------------------------------------------------- fp8 / int8
@triton.jit
def _pertoken_encode_kernel(
    x_ptr,        # [G, D] model dtype, G = 2*T*Hkv rows of kv [2, T, Hkv, D], contiguous
    q_ptr,        # [G, D] float8e4nv | int8
    scale_ptr,    # [G] fp32
    G, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_FP8: tl.constexpr, QMAX: tl.constexpr, INV_QMAX: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_D)
    rm = rows < G
    m = rm[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    scale = tl.max(tl.abs(x), axis=1) * INV_QMAX                        # [BLOCK_G]
    y = libdevice.div_rn(x, tl.where(scale > 0, scale, 1.0)[:, None])
    if IS_FP8:
        q = tl.minimum(tl.maximum(y, -QMAX), QMAX).to(tl.float8e4nv)     # round to nearest even
    else:
        q = tl.minimum(tl.maximum(libdevice.rint(y), -QMAX), QMAX).to(tl.int8)
    tl.store(q_ptr + offs, q, mask=m)
    tl.store(scale_ptr + rows, scale, mask=rm)


@triton.jit
def _pertoken_decode_kernel(
    q_ptr,        # [G, D] float8e4nv | int8
    scale_ptr,    # [G] fp32
    out_ptr,      # [G, D] model dtype
    G, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_D)
    rm = rows < G
    m = rm[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    q = tl.load(q_ptr + offs, mask=m).to(tl.float32)                    # masked lanes never stored
    s = tl.load(scale_ptr + rows, mask=rm, other=0.0)
    tl.store(out_ptr + offs, (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=m)


def _check_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    if x.dim() != 4 or x.shape[0] != 2 or x.dtype not in DTYPES or not x.is_contiguous():
        raise ValueError(f"kv must be a contiguous [2, T, Hkv, D] fp32/fp16/bf16 tensor; got "
                         f"{tuple(x.shape)} {x.dtype}")
    if q.shape != x.shape or q.dtype not in (torch.float8_e4m3fn, torch.int8) or not q.is_contiguous():
        raise ValueError(f"q must be a contiguous {tuple(x.shape)} float8_e4m3fn/int8 tensor; got "
                         f"{tuple(q.shape)} {q.dtype}")
    if scale.shape != x.shape[:3] or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"scale must be a contiguous {tuple(x.shape[:3])} fp32 tensor")
    if not (x.is_cuda and q.device == x.device and scale.device == x.device):
        raise ValueError("codec tensors must be on one CUDA device")
    D = x.shape[3]
    return x.numel() // D, D


def _row_blocks(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, 4096 // block_d), block_d


def pertoken_encode(kv: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """kv [2, T, Hkv, D] -> q (same shape, float8_e4m3fn or int8) and scale [2, T, Hkv] fp32."""
    G, D = _check_rows(kv, q, scale)
    bg, bd = _row_blocks(D)
    fp8 = q.dtype == torch.float8_e4m3fn
    _pertoken_encode_kernel[(triton.cdiv(G, bg),)](
        kv, q, scale, G, D=D, BLOCK_G=bg, BLOCK_D=bd, IS_FP8=fp8, QMAX=FP8_MAX if fp8 else INT8_MAX,
        INV_QMAX=fp32(1 / (FP8_MAX if fp8 else INT8_MAX)), num_warps=4)


def pertoken_decode(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """q [2, T, Hkv, D] + scale [2, T, Hkv] -> out [2, T, Hkv, D] (model dtype)."""
    G, D = _check_rows(out, q, scale)
    bg, bd = _row_blocks(D)
    _pertoken_decode_kernel[(triton.cdiv(G, bg),)](q, scale, out, G, D=D, BLOCK_G=bg, BLOCK_D=bd, num_warps=4)


# ---------------------------------------------------------------------------- int4
@triton.jit
def _fp16_round(x, UP: tl.constexpr):
    """fp32 -> fp16 toward +inf (UP) or -inf: round to nearest even, then one ulp step in the
    bit pattern if it went the wrong way (fp16 bits are sign-magnitude)."""
    h = x.to(tl.float16)
    b = h.to(tl.int16, bitcast=True)
    if UP:
        wrong = h.to(tl.float32) < x
        nb = tl.where(b == -32768, 1, tl.where(b < 0, b - 1, b + 1))       # -0 -> smallest +subnormal
    else:
        wrong = h.to(tl.float32) > x
        nb = tl.where(b == 0, -32767, tl.where(b < 0, b + 1, b - 1))       # +0 -> smallest -subnormal
    return tl.where(wrong, nb, b).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _int4_params(mn, mx):
    """fp32 group min/max -> fp16 (scale, zero): zero rounded down, scale up (codec.int4_params)."""
    zero = _fp16_round(mn, False)
    scale = _fp16_round((mx - zero.to(tl.float32)) * INV15, True)
    return scale, zero


@triton.jit
def _int4_quantize(x, scale, zero):
    s = scale.to(tl.float32)
    y = libdevice.div_rn(x - zero.to(tl.float32), tl.where(s > 0, s, 1.0))
    return tl.minimum(tl.maximum(libdevice.rint(y), 0.0), 15.0).to(tl.uint8)


@triton.jit
def _int4_encode_keys(kv_ptr, q_ptr, kmeta_ptr, g, h, T, H, NG, D: tl.constexpr, BLOCK_J: tl.constexpr,
                      GROUP: tl.constexpr, CLAMP: tl.constexpr):
    """Key tile: tokens g*GROUP.., head h, all D channels (as D/2 even and D/2 odd)."""
    HALF: tl.constexpr = D // 2
    j = tl.arange(0, BLOCK_J)                          # channel pair j: channels 2j, 2j+1
    jm = j < HALF
    t = g * GROUP + tl.arange(0, GROUP)
    m = (t < T)[:, None] & jm[None, :]
    row = t.to(tl.int64) * H + h                       # [GROUP] rows of kv[0] viewed [T*H, D]
    src = kv_ptr + row[:, None] * D + 2 * j[None, :]
    xe = tl.minimum(tl.maximum(tl.load(src, mask=m, other=0.0).to(tl.float32), -CLAMP), CLAMP)
    xo = tl.minimum(tl.maximum(tl.load(src + 1, mask=m, other=0.0).to(tl.float32), -CLAMP), CLAMP)
    se, ze = _int4_params(tl.min(tl.where(m, xe, float("inf")), axis=0),
                          tl.max(tl.where(m, xe, float("-inf")), axis=0))      # [BLOCK_J] per channel
    so, zo = _int4_params(tl.min(tl.where(m, xo, float("inf")), axis=0),
                          tl.max(tl.where(m, xo, float("-inf")), axis=0))
    qe = _int4_quantize(xe, se[None, :], ze[None, :])
    qo = _int4_quantize(xo, so[None, :], zo[None, :])
    tl.store(q_ptr + row[:, None] * HALF + j[None, :], qe | (qo << 4), mask=m)
    mbase = kmeta_ptr + (g * H + h).to(tl.int64) * D + 2 * j
    plane = NG * H * D                                 # kmeta[1] (zeros) after kmeta[0] (scales)
    tl.store(mbase, se, mask=jm)
    tl.store(mbase + 1, so, mask=jm)
    tl.store(mbase + plane, ze, mask=jm)
    tl.store(mbase + plane + 1, zo, mask=jm)


@triton.jit
def _int4_encode_values(kv_ptr, q_ptr, vmeta_ptr, tile, T, H, D: tl.constexpr, BLOCK_J: tl.constexpr,
                        BLOCK_R: tl.constexpr, CLAMP: tl.constexpr):
    """Value tile: BLOCK_R (token, head) rows of D channels, one (scale, zero) per row."""
    HALF: tl.constexpr = D // 2
    j = tl.arange(0, BLOCK_J)
    jm = j < HALF
    r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < T * H
    m = rm[:, None] & jm[None, :]
    row = (r + T * H).to(tl.int64)                     # rows of kv viewed [2*T*H, D]
    src = kv_ptr + row[:, None] * D + 2 * j[None, :]
    xe = tl.minimum(tl.maximum(tl.load(src, mask=m, other=0.0).to(tl.float32), -CLAMP), CLAMP)
    xo = tl.minimum(tl.maximum(tl.load(src + 1, mask=m, other=0.0).to(tl.float32), -CLAMP), CLAMP)
    mn = tl.minimum(tl.min(tl.where(m, xe, float("inf")), axis=1), tl.min(tl.where(m, xo, float("inf")), axis=1))
    mx = tl.maximum(tl.max(tl.where(m, xe, float("-inf")), axis=1), tl.max(tl.where(m, xo, float("-inf")), axis=1))
    s, z = _int4_params(mn, mx)                        # [BLOCK_R]
    qe = _int4_quantize(xe, s[:, None], z[:, None])
    qo = _int4_quantize(xo, s[:, None], z[:, None])
    tl.store(q_ptr + row[:, None] * HALF + j[None, :], qe | (qo << 4), mask=m)
    tl.store(vmeta_ptr + r, s, mask=rm)
    tl.store(vmeta_ptr + T * H + r, z, mask=rm)


@triton.jit
def _int4_encode_kernel(
    kv_ptr,       # [2, T, H, D] model dtype, contiguous
    q_ptr,        # [2, T, H, D/2] uint8: byte j = q[2j] | q[2j+1] << 4
    kmeta_ptr,    # [2, NG, H, D] fp16: [0] key scales, [1] key zeros per (token group, head, channel)
    vmeta_ptr,    # [2, T, H] fp16: [0] value scales, [1] value zeros per (token, head)
    T, H, NG, NK,                     # NK = NG * H key tiles, then value tiles
    D: tl.constexpr, BLOCK_J: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
    CLAMP: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < NK:
        _int4_encode_keys(kv_ptr, q_ptr, kmeta_ptr, pid // H, pid % H, T, H, NG, D, BLOCK_J, GROUP, CLAMP)
    else:
        _int4_encode_values(kv_ptr, q_ptr, vmeta_ptr, pid - NK, T, H, D, BLOCK_J, BLOCK_R, CLAMP)


@triton.jit
def _int4_decode_keys(q_ptr, kmeta_ptr, out_ptr, g, h, T, H, NG, D: tl.constexpr, BLOCK_J: tl.constexpr,
                      GROUP: tl.constexpr):
    HALF: tl.constexpr = D // 2
    j = tl.arange(0, BLOCK_J)
    jm = j < HALF
    t = g * GROUP + tl.arange(0, GROUP)
    m = (t < T)[:, None] & jm[None, :]
    row = t.to(tl.int64) * H + h
    p = tl.load(q_ptr + row[:, None] * HALF + j[None, :], mask=m, other=0)
    mbase = kmeta_ptr + (g * H + h).to(tl.int64) * D + 2 * j
    plane = NG * H * D
    se = tl.load(mbase, mask=jm, other=0.0).to(tl.float32)
    so = tl.load(mbase + 1, mask=jm, other=0.0).to(tl.float32)
    ze = tl.load(mbase + plane, mask=jm, other=0.0).to(tl.float32)
    zo = tl.load(mbase + plane + 1, mask=jm, other=0.0).to(tl.float32)
    dst = out_ptr + row[:, None] * D + 2 * j[None, :]
    tl.store(dst, ((p & 15).to(tl.float32) * se[None, :] + ze[None, :]).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(dst + 1, ((p >> 4).to(tl.float32) * so[None, :] + zo[None, :]).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _int4_decode_values(q_ptr, vmeta_ptr, out_ptr, tile, T, H, D: tl.constexpr, BLOCK_J: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    HALF: tl.constexpr = D // 2
    j = tl.arange(0, BLOCK_J)
    jm = j < HALF
    r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < T * H
    m = rm[:, None] & jm[None, :]
    row = (r + T * H).to(tl.int64)
    p = tl.load(q_ptr + row[:, None] * HALF + j[None, :], mask=m, other=0)
    s = tl.load(vmeta_ptr + r, mask=rm, other=0.0).to(tl.float32)[:, None]
    z = tl.load(vmeta_ptr + T * H + r, mask=rm, other=0.0).to(tl.float32)[:, None]
    dst = out_ptr + row[:, None] * D + 2 * j[None, :]
    tl.store(dst, ((p & 15).to(tl.float32) * s + z).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(dst + 1, ((p >> 4).to(tl.float32) * s + z).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _int4_decode_kernel(
    q_ptr,        # [2, T, H, D/2] uint8
    kmeta_ptr,    # [2, NG, H, D] fp16
    vmeta_ptr,    # [2, T, H] fp16
    out_ptr,      # [2, T, H, D] model dtype, contiguous
    T, H, NG, NK,
    D: tl.constexpr, BLOCK_J: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < NK:
        _int4_decode_keys(q_ptr, kmeta_ptr, out_ptr, pid // H, pid % H, T, H, NG, D, BLOCK_J, GROUP)
    else:
        _int4_decode_values(q_ptr, vmeta_ptr, out_ptr, pid - NK, T, H, D, BLOCK_J, BLOCK_R)


def _check_int4(kv, q, kmeta, vmeta) -> tuple[int, int, int, int]:
    if kv.dim() != 4 or kv.shape[0] != 2 or kv.dtype not in DTYPES or not kv.is_contiguous():
        raise ValueError(f"kv must be a contiguous [2, T, Hkv, D] fp32/fp16/bf16 tensor; got "
                         f"{tuple(kv.shape)} {kv.dtype}")
    _, T, H, D = kv.shape
    ng = triton.cdiv(T, K_GROUP)
    want = {"q": (q, (2, T, H, D // 2), torch.uint8), "kmeta": (kmeta, (2, ng, H, D), torch.float16),
            "vmeta": (vmeta, (2, T, H), torch.float16)}
    for name, (t, shape, dtype) in want.items():
        if D % 2 or t.shape != shape or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {shape} {dtype} tensor (D even); got "
                             f"{tuple(t.shape)} {t.dtype}")
        if not (kv.is_cuda and t.device == kv.device):
            raise ValueError("codec tensors must be on one CUDA device")
    return T, H, D, ng


def _int4_grid(T, H, D, ng):
    block_j = triton.next_power_of_2(max(D // 2, 1))
    block_r = max(1, 2048 // block_j)
    nk = ng * H
    return (nk + triton.cdiv(T * H, block_r),), nk, block_j, block_r


def int4_encode(kv: torch.Tensor, q: torch.Tensor, kmeta: torch.Tensor, vmeta: torch.Tensor) -> None:
    """kv [2, T, H, D] -> packed q [2, T, H, D/2] uint8, kmeta [2, NG, H, D] fp16, vmeta [2, T, H] fp16."""
    T, H, D, ng = _check_int4(kv, q, kmeta, vmeta)
    grid, nk, bj, br = _int4_grid(T, H, D, ng)
    _int4_encode_kernel[grid](kv, q, kmeta, vmeta, T, H, ng, nk, D=D, BLOCK_J=bj, GROUP=K_GROUP, BLOCK_R=br,
                              CLAMP=FP16_MAX, num_warps=4)


def int4_decode(q: torch.Tensor, kmeta: torch.Tensor, vmeta: torch.Tensor, out: torch.Tensor) -> None:
    """Inverse of int4_encode into out [2, T, H, D] (model dtype)."""
    T, H, D, ng = _check_int4(out, q, kmeta, vmeta)
    grid, nk, bj, br = _int4_grid(T, H, D, ng)
    _int4_decode_kernel[grid](q, kmeta, vmeta, out, T, H, ng, nk, D=D, BLOCK_J=bj, GROUP=K_GROUP, BLOCK_R=br,
                              num_warps=4)


# ---------------------------------------------------------------------------- checksum
@triton.jit
def _checksum_partial_kernel(
    w_ptr,        # [N] int32 words of the body
    part_ptr,     # [cdiv(N, BLOCK)] int64: sum over the block of (i+1) * u_i mod P, mod P
    N, P: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + i, mask=i < N, other=0).to(tl.int64)
    u = tl.where(w < 0, w + 4294967296, w)                       # uint32 value of the word
    tl.store(part_ptr + tl.program_id(0), tl.sum((u * (i + 1)) % P, axis=0) % P)


@triton.jit
def _checksum_finish_kernel(
    part_ptr,     # [NP] int64 partial sums, each < P
    ck_ptr,       # [2] int64: the stored (c, ~c) after the body
    ok_ptr,       # [] bool (VERIFY only)
    NP, salt, P: tl.constexpr, BLOCK: tl.constexpr, SEAL: tl.constexpr,
):
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, NP, BLOCK):
        k = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + k, mask=k < NP, other=0)      # NP * P < 2^63
    c = (tl.sum(acc, axis=0) + salt) % P
    if SEAL:
        tl.store(ck_ptr, c)
        tl.store(ck_ptr + 1, ~c)
    else:
        ok = (tl.load(ck_ptr) == c) & (tl.load(ck_ptr + 1) == ~c)
        tl.store(ok_ptr, ok)


def checksum(payload: torch.Tensor, body_nbytes: int, salt: int, seal: bool) -> torch.Tensor | None:
    """seal: write (c, ~c) after the body. Else: -> 0-dim bool, True iff the stored pair matches."""
    if payload.dtype != torch.uint8 or not payload.is_cuda or payload.numel() != body_nbytes + 16 \
            or body_nbytes % 16:
        raise ValueError("payload must be a CUDA uint8 tensor of body_nbytes (a multiple of 16) + 16 bytes")
    words = payload[:body_nbytes].view(torch.int32)
    ck = payload[body_nbytes:].view(torch.int64)
    n = words.numel()
    n_part = max(triton.cdiv(n, CHECKSUM_BLOCK), 1)
    part = torch.empty(n_part, dtype=torch.int64, device=payload.device)
    _checksum_partial_kernel[(n_part,)](words, part, n, P=CHECKSUM_P, BLOCK=CHECKSUM_BLOCK, num_warps=8)
    ok = None if seal else torch.empty((), dtype=torch.bool, device=payload.device)
    _checksum_finish_kernel[(1,)](part, ck, ck if seal else ok, n_part, salt, P=CHECKSUM_P, BLOCK=1024,
                                  SEAL=seal, num_warps=4)
    return ok
