"""Codec kernels: the Triton encode writes the torch reference's bytes (the reference on CPU, and
the same torch code on the GPU); the Triton decode matches the reference decode bit for bit for
fp8/int8 and within an ulp of the output dtype for int4 (an fma rounds once where torch rounds
twice); the Triton checksum catches what the reference catches. Needs CUDA and triton.
"""
from __future__ import annotations

import random

import pytest
import torch

from disagg.kernels import triton_available
from kvtransfer.codec import CODECS, get_codec

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and triton")

SHAPES = [(2, 1, 1, 64), (2, 7, 3, 64), (2, 33, 8, 128), (2, 257, 2, 64), (2, 5, 2, 80), (2, 64, 1, 16),
          (2, 100, 5, 96), (2, 2048, 8, 128)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def make_kv(shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[0] += 20.0 * (torch.rand(shape[-1], generator=g) < 0.1)          # outlier key channels
    x[1] *= torch.exp(2 * torch.randn(shape[1:3], generator=g))[..., None]  # per-token value scales
    x[:, :, 0, :1] = 0.0
    return x.to(dtype)


def codecs(name):
    return get_codec(name, use_triton=True), get_codec(name, use_triton=False)


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(name, dtype, shape):
    fast, ref = codecs(name)
    kv_cpu = make_kv(shape, dtype, seed=random.randrange(2**31))
    kv = kv_cpu.to(DEVICE)
    p_fast = fast.encode(kv)
    p_ref_gpu = ref.encode(kv)
    p_ref_cpu = ref.encode(kv_cpu)
    assert p_fast.numel() == fast.payload_nbytes(shape, dtype)
    lay = ref.layout(shape, dtype)
    for s in lay.sections:
        a, b = p_fast[s.offset:s.offset + s.nbytes].cpu(), p_ref_cpu[s.offset:s.offset + s.nbytes]
        assert torch.equal(a, b), f"{name}: section {s.name} differs in {(a != b).sum()} bytes"
    assert torch.equal(p_fast.cpu(), p_ref_cpu), "pads or checksum differ"
    assert torch.equal(p_ref_gpu.cpu(), p_ref_cpu)

    out_fast = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    got, ok = fast.decode(p_fast, shape, dtype, out=out_fast)
    assert got is out_fast and ok.device == got.device and bool(ok)
    want, ok_ref = ref.decode(p_ref_cpu, shape, dtype)
    assert bool(ok_ref)
    y, w = got.cpu().double(), want.double()
    assert torch.isfinite(y).all()
    if name != "int4":           # x' = q * scale: one rounding on both sides
        assert torch.equal(got.cpu(), want)
        return
    # x' = q * scale + zero: the fma's single rounding may differ from torch's two by an fp32 ulp
    # of the larger term, then by one ulp of the output dtype.
    v = lay.views(p_ref_cpu)
    km, vm = v["kmeta"].double(), v["vmeta"].double()
    ks, kz = (km[i].repeat_interleave(32, 0)[:shape[1]] for i in (0, 1))
    terms = torch.stack([kz.abs() + 15 * ks, (vm[1].abs() + 15 * vm[0])[..., None].expand(shape[1:])])
    assert ((y - w).abs() <= ULP[dtype] * w.abs() + 2.0**-23 * terms).all(), f"{name}: decode differs"


@pytest.mark.parametrize("name", list(CODECS))
def test_triton_checksum_detects_flips(name):
    fast, ref = codecs(name)
    shape, dtype = (2, 7, 3, 66), torch.bfloat16
    payload = fast.encode(make_kv(shape, dtype, seed=5).to(DEVICE))
    rng = random.Random(7)
    lay = fast.layout(shape, dtype)
    spots = [0, lay.body_nbytes - 1] + list(range(lay.body_nbytes, lay.nbytes)) + \
        [rng.randrange(lay.nbytes) for _ in range(20)]
    for p in spots:
        bad = payload.clone()
        bad[p] ^= 1 << rng.randrange(8)
        assert not bool(fast.decode(bad, shape, dtype)[1]), f"{name}: flip at byte {p} not detected"
        assert not bool(ref.decode(bad.cpu(), shape, dtype)[1])


def test_triton_checksum_many_partials():
    """A 16 MiB+ body: more partial sums than the finishing program's block (1024)."""
    fast, ref = codecs("none")
    kv = torch.randn(2, 4100, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    p = fast.encode(kv)
    assert torch.equal(p.cpu(), ref.encode(kv.cpu()))
    bad = p.clone()
    bad[p.numel() // 2] ^= 0x10
    assert bool(fast.decode(p, kv.shape, kv.dtype)[1]) and not bool(fast.decode(bad, kv.shape, kv.dtype)[1])


def test_default_codec_uses_triton_on_cuda():
    assert get_codec("int4")._fast(torch.device(DEVICE))
    assert not get_codec("int4", use_triton=False)._fast(torch.device(DEVICE))
    assert not get_codec("int4")._fast(torch.device("cpu"))
