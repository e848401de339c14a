"""Kernel tests: the Triton KernelSet against reference.py on fresh random inputs of awkward sizes.

The first tests run on CPU (CI): kernel selection, and the reference paged attention against
a naive per-sequence softmax. The rest need a CUDA GPU and triton and skip otherwise.
Outputs are poisoned (NaN) before each run, so an unwritten element fails the comparison.
Errors are relative: ||out - ref|| / ||ref||, with a tolerance by dtype.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from disagg.kernels import REFERENCE, get_kernels, reference, triton_available

DEVICE = "cuda"   # tests/kernels may be pointed elsewhere (e.g. Triton's interpreter on CPU)
gpu = pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CONTEXT_LENS = [1, 15, 16, 17, 1000, 0, 33, 257]


def triton_kernels():
    from disagg.kernels.triton_ops import TRITON
    return TRITON


def fresh_seed() -> int:
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    return seed


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all(), "non-finite (unwritten?) elements in the output"
    diff = (out.double() - ref.double()).norm()
    return (diff / ref.double().norm().clamp_min(1e-30)).item()


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def make_paged(context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, extra_cols: int = 3, device: str | None = None):
    """Random caches and shuffled block tables; entries past each context are garbage ids."""
    device = device or DEVICE
    B = len(context_lens)
    M = max(math.ceil(c / block_size) for c in context_lens) + extra_cols
    need = [math.ceil(c / block_size) for c in context_lens]
    num_blocks = sum(need) + 5
    perm = torch.randperm(num_blocks).tolist()
    # a wider parent tensor, so block_tables has a row stride > M
    bt = torch.randint(-3, num_blocks + 3, (B, M + 5), dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device).to(dtype)
    v_cache = torch.randn(shape, device=device).to(dtype)
    block_tables = bt.to(device)[:, :M]
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, block_tables, lens


# ---------------------------------------------------------------- CPU (always run)

def test_get_kernels_false_is_reference():
    assert get_kernels(False) is REFERENCE
    if not triton_available():
        assert get_kernels(None) is REFERENCE


def naive_paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Per sequence, per query head: gather the context token by token, softmax in float64."""
    B, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n = int(context_lens[b])
        if n == 0:
            continue
        rows = [(int(block_tables[b, p // bs]), p % bs) for p in range(n)]
        k = torch.stack([k_cache[blk, off] for blk, off in rows]).double()   # [n, Hkv, D]
        v = torch.stack([v_cache[blk, off] for blk, off in rows]).double()
        for h in range(Hq):
            s = k[:, h // G, :] @ q[b, h].double() * scale                    # [n]
            out[b, h] = torch.softmax(s, 0) @ v[:, h // G, :]
    return out


def test_reference_paged_attention_matches_naive():
    seed = fresh_seed()
    lens = [0, 1, 7, 8, 9, 40, 33]
    k_cache, v_cache, bt, cl = make_paged(lens, num_kv_heads=2, head_dim=16, block_size=8,
                                          dtype=torch.float32, device="cpu")
    q = torch.randn(len(lens), 6, 16)
    out = reference.paged_attention_decode(q, k_cache, v_cache, bt, cl, 0.25)
    want = naive_paged_attention(q, k_cache, v_cache, bt, cl, 0.25)
    assert (out.double() - want).abs().max().item() < 1e-5, f"seed {seed}"
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_reference_write_kv_skips_negative_slots():
    k = torch.randn(5, 2, 4)
    v = torch.randn(5, 2, 4)
    kc = torch.zeros(3, 2, 2, 4)
    vc = torch.zeros(3, 2, 2, 4)
    slots = torch.tensor([3, -1, 0, 5, -1])
    reference.write_kv(k, v, kc, vc, slots)
    flat = kc.view(6, 2, 4)
    assert torch.equal(flat[3], k[0]) and torch.equal(flat[0], k[2]) and torch.equal(flat[5], k[3])
    assert flat[[1, 2, 4]].abs().sum() == 0


# ---------------------------------------------------------------- norms

@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 33, 257])
@pytest.mark.parametrize("H", [1000, 4096])
def test_rms_norm(dtype, T, H):
    seed = fresh_seed()
    x = torch.randn(T, H + 24, device=DEVICE).to(dtype)[:, :H]        # row stride != H
    w = (1 + 0.1 * torch.randn(H, device=DEVICE)).to(dtype)
    out = triton_kernels().rms_norm(x, w, 1e-6, out=poisoned((T, H), dtype))
    ref = reference.rms_norm(x, w, 1e-6)
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"
    assert rel_err(triton_kernels().rms_norm(x, w, 1e-6), ref) < TOL[dtype], f"seed {seed}"


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 33, 257])
def test_fused_add_rms_norm(dtype, T):
    seed = fresh_seed()
    H = 2048 + 8
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    res = torch.randn(T, H, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(H, device=DEVICE)).to(dtype)
    x0, res0 = x.clone(), res.clone()
    out, new_res = triton_kernels().fused_add_rms_norm(
        x, res, w, 1e-5, out=(poisoned((T, H), dtype), poisoned((T, H), dtype)))
    ref_out, ref_res = reference.fused_add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(new_res, ref_res), f"seed {seed}"
    assert rel_err(out, ref_out) < TOL[dtype], f"seed {seed}"
    assert torch.equal(x, x0) and torch.equal(res, res0)             # inputs untouched


# ---------------------------------------------------------------- rotary

def rope_cache(max_pos: int, head_dim: int, theta: float = 500000.0) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1).float().to(DEVICE)   # [max_pos, D]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 33, 257])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_rotary_embedding(dtype, T, head_dim, group):
    seed = fresh_seed()
    Hkv, D = 2, head_dim
    Hq = Hkv * group
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=DEVICE).to(dtype)  # fused projection output
    q = qkv[:, :Hq * D].view(T, Hq, D)                                   # strided views
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    cs = rope_cache(4096, D)
    pos = torch.randint(0, 4096, (T,), device=DEVICE)
    qo, ko = triton_kernels().rotary_embedding(
        q, k, pos, cs, out=(poisoned((T, Hq, D), dtype), poisoned((T, Hkv, D), dtype)))
    rq, rk = reference.rotary_embedding(q, k, pos, cs)
    assert rel_err(qo, rq) < TOL[dtype], f"seed {seed}"
    assert rel_err(ko, rk) < TOL[dtype], f"seed {seed}"
    # same roundings as torch's eager ops (FP fusion off in the kernel): bit-exact
    assert torch.equal(qo, rq) and torch.equal(ko, rk), f"seed {seed}"


# ---------------------------------------------------------------- write_kv

@gpu
@pytest.mark.parametrize("dtype,cache_dtype", [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("T", [1, 7, 33, 257])
def test_write_kv(dtype, cache_dtype, T):
    seed = fresh_seed()
    bs, Hkv, D = 16, 8, 128
    nb = T // bs + 4
    kv = torch.randn(T, 2, Hkv, D, device=DEVICE).to(dtype)
    k, v = kv[:, 0], kv[:, 1]                                            # strided views
    slots = torch.randperm(nb * bs, device=DEVICE)[:T]
    slots[::5] = -1                                                      # padding tokens
    k_cache = torch.randn(nb, bs, Hkv, D, device=DEVICE).to(cache_dtype)
    v_cache = torch.randn(nb, bs, Hkv, D, device=DEVICE).to(cache_dtype)
    rk, rv = k_cache.clone(), v_cache.clone()
    reference.write_kv(k, v, rk, rv, slots)
    triton_kernels().write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, rk) and torch.equal(v_cache, rv), f"seed {seed}"


# ---------------------------------------------------------------- paged attention

def check_paged(dtype, head_dim, group, num_kv_heads=2, lens=CONTEXT_LENS, **kw):
    seed = fresh_seed()
    k_cache, v_cache, bt, cl = make_paged(lens, num_kv_heads, head_dim, 16, dtype)
    B, Hq = len(lens), num_kv_heads * group
    q = torch.randn(B, Hq, head_dim, device=DEVICE).to(dtype)
    scale = head_dim ** -0.5
    out = triton_kernels().paged_attention_decode(q, k_cache, v_cache, bt, cl, scale,
                                                  out=poisoned((B, Hq, head_dim), dtype), **kw)
    ref = reference.paged_attention_decode(q, k_cache, v_cache, bt, cl, scale)
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"row {b}: context 0 must give zeros"


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_paged_attention(dtype, head_dim, group, num_splits):
    check_paged(dtype, head_dim, group, num_splits=num_splits)


@gpu
@pytest.mark.parametrize("num_splits", [2, 3, 7, 64])
def test_paged_attention_splits(num_splits):
    check_paged(torch.bfloat16, 128, 4, num_splits=num_splits)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_attention_odd_head_dim(dtype):
    check_paged(dtype, 80, 4)


@gpu
def test_paged_attention_llama3_8b_shape():
    check_paged(torch.bfloat16, 128, 4, num_kv_heads=8, lens=[8192, 1, 4000, 0, 16])


@gpu
def test_paged_attention_cuda_graph():
    """Capture once, then replay with new queries, context lengths and block tables."""
    seed = fresh_seed()
    dtype, Hkv, G, D, bs = torch.bfloat16, 2, 4, 128, 16
    lens = [5, 300, 0, 1000, 17, 64]
    B, M = len(lens), 64
    num_blocks = B * M
    k_cache = torch.randn(num_blocks, bs, Hkv, D, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, device=DEVICE).to(dtype)
    Hq = Hkv * G
    q = torch.randn(B, Hq, D, device=DEVICE).to(dtype)
    bt = torch.randperm(num_blocks, device=DEVICE).view(B, M).int()
    cl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    attn = triton_kernels().paged_attention_decode

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                                        # compile + warm up
        attn(q, k_cache, v_cache, bt, cl, D ** -0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn(q, k_cache, v_cache, bt, cl, D ** -0.5)

    for trial in range(3):
        new_lens = [random.choice([0, 1, 16, 17, 999, M * bs]) for _ in range(B)]
        new_lens[trial] = 0
        q.copy_(torch.randn(B, Hq, D, device=DEVICE))
        bt.copy_(torch.randperm(num_blocks, device=DEVICE).view(B, M))
        cl.copy_(torch.tensor(new_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        ref = reference.paged_attention_decode(q, k_cache, v_cache, bt, cl, D ** -0.5)
        assert rel_err(out, ref) < TOL[dtype], f"seed {seed}, trial {trial}, lens {new_lens}"
        assert torch.equal(out[trial], torch.zeros_like(out[trial]))


@gpu
def test_wrappers_reject_bad_inputs():
    t = triton_kernels()
    k_cache, v_cache, bt, cl = make_paged([5, 9], 2, 64, 16, torch.float16)
    q = torch.randn(2, 4, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        t.paged_attention_decode(q.float(), k_cache, v_cache, bt, cl, 0.1)
    strided = k_cache.transpose(0, 1).contiguous().transpose(0, 1)   # same shape, not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        t.paged_attention_decode(q, strided, strided, bt, cl, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        t.paged_attention_decode(q[:, :3], k_cache, v_cache, bt, cl, 0.1)
    with pytest.raises(ValueError, match="block_tables"):
        t.paged_attention_decode(q, k_cache, v_cache, bt.float(), cl, 0.1)
    with pytest.raises(ValueError):
        t.rms_norm(torch.randn(3, 8, device=DEVICE), torch.randn(9, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="slot_mapping"):
        t.write_kv(q[:, :2], q[:, :2], k_cache, v_cache, torch.zeros(2, device=DEVICE))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,I", [(1, 64), (7, 1000), (33, 14336), (257, 1536)])
def test_silu_and_mul_matches_reference(dtype, T, I):
    from disagg.kernels.activation import silu_and_mul
    x = torch.randn(T, 2 * I, device="cuda", dtype=dtype) * 3
    out = torch.full((T, I), float("nan"), device="cuda", dtype=dtype)
    silu_and_mul(x, out=out)
    ref = reference.silu_and_mul(x)
    assert not out.isnan().any()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < (1e-6 if dtype == torch.float32 else 1e-2), rel
