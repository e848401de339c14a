"""KV codecs on CPU (the torch reference): round trips within each codec's stated bound,
payload sizes, corruption detection, decoding into a given buffer, the registry.

The bounds are derived here again from the input alone (not read back from the payload):
    fp8    |x' - x| <= max(2^-4 |x|, 2^-10 amax/448)
    int8   |x' - x| <= (amax/127) / 2
    int4   |x' - x| <= scale/2, scale <= (max - min + ulp16(min)) / 15 * (1 + 2^-9) + 2^-24
plus fp32 arithmetic noise and one rounding to the output dtype (half an ulp of it).
"""
from __future__ import annotations

import random

import pytest
import torch

from kvtransfer.codec import CODECS, K_GROUP, checksum_ref, checksum_salt, get_codec

SHAPES = [(2, 1, 1, 64), (2, 7, 3, 64), (2, 33, 8, 128), (2, 257, 2, 64), (2, 5, 2, 80), (2, 64, 1, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def make_kv(shape, dtype, kind: str = "normal", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "wide":        # magnitudes over many decades: subnormal fp8 and fp16 ranges too
        x = (x * torch.exp(3 * torch.randn(shape, generator=g))).clamp(-3e4, 3e4)   # int4 clamps at 65504
    elif kind == "kv_like":   # keys: a few outlier channels with large offsets (what KIVI targets)
        off = torch.zeros(shape[-1])
        off[torch.randperm(shape[-1], generator=g)[:max(1, shape[-1] // 16)]] = 20.0
        x[0] = x[0] + off
        x[1] = 0.3 * x[1]
    elif kind == "flat":      # a zero head and constant groups: scale 0 must decode exactly
        x[:, :, 0] = 0.0
        x[1, :, -1] = 1.7
    return x.to(dtype)


def error_bound(name: str, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |x' - x| for x: [2, T, H, D] fp32 (before output rounding)."""
    amax = x.abs().amax(-1, keepdim=True)
    if name == "fp8":
        return torch.maximum(2.0**-4 * x.abs(), 2.0**-10 * amax / 448)
    if name == "int8":
        return amax / 127 / 2
    if name == "int4":
        _, T, H, D = x.shape
        ng = -(-T // K_GROUP)
        k = torch.cat([x[0], x[0, -1:].expand(ng * K_GROUP - T, H, D)]).view(ng, K_GROUP, H, D)
        kmn, kmx = k.amin(1), k.amax(1)
        vmn, vmx = x[1].amin(-1, keepdim=True), x[1].amax(-1, keepdim=True)

        def scale(mn, mx):
            ulp16 = torch.maximum(mn.abs() * 2.0**-10, torch.tensor(2.0**-24))
            return (mx - mn + ulp16) / 15 * (1 + 2.0**-9) + 2.0**-24
        ks = scale(kmn, kmx).repeat_interleave(K_GROUP, 0)[:T]
        return torch.stack([ks, scale(vmn, vmx).expand(T, H, D)]) / 2
    raise AssertionError(name)


def check_within_bound(name: str, kv: torch.Tensor, out: torch.Tensor) -> None:
    x, y = kv.double(), out.double()
    assert torch.isfinite(y).all()
    b = error_bound(name, kv.float()).double()
    tol = b * (1 + 2.0**-16) + (UNIT_ROUNDOFF[kv.dtype] + 2.0**-20) * (x.abs() + b)
    err = (y - x).abs()
    bad = err > tol
    assert not bad.any(), (f"{name} {kv.dtype}: {int(bad.sum())} elements over the bound; worst "
                           f"err {err[bad].max().item():.3g} vs tol {tol[bad].min().item():.3g}")


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_within_bound(name, dtype, shape):
    codec = get_codec(name)
    for kind in ("normal", "wide", "kv_like", "flat"):
        kv = make_kv(shape, dtype, kind)
        payload = codec.encode(kv)
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == codec.payload_nbytes(shape, dtype)
        out, ok = codec.decode(payload, shape, dtype)
        assert ok.dim() == 0 and ok.dtype == torch.bool and bool(ok)
        assert out.shape == kv.shape and out.dtype == dtype
        if codec.lossless:
            assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8)), "none must be bit-exact"
        else:
            check_within_bound(name, kv, out)
        assert torch.equal(codec.encode(kv), payload), "encode must be deterministic (pads included)"


def test_fp8_subnormals():
    """One group with amax 448 (scale 1): values across e4m3's subnormal range (< 2^-6)."""
    x = torch.zeros(2, 1, 1, 64)
    x[..., 0] = 448.0
    x[..., 1:] = torch.logspace(-12, -3, 63, base=2.0)
    out, _ = get_codec("fp8").decode(get_codec("fp8").encode(x), x.shape, x.dtype)
    sub = x.abs() < 2.0**-6
    assert sub.sum() > 30 and (out - x)[sub].abs().max() <= 2.0**-10    # half the subnormal spacing 2^-9
    assert ((out - x)[~sub].abs() <= 2.0**-4 * x[~sub].abs()).all()       # normals: relative 2^-4
    assert out[0, 0, 0, 1] == 0.0                       # 2^-12 rounds to zero
    check_within_bound("fp8", x, out)


def test_int4_saturates_beyond_fp16_range():
    x = make_kv((2, 3, 1, 64), torch.float32)
    x[0, 0, 0, 0], x[1, 0, 0, 1] = 1e6, -1e6
    out, ok = get_codec("int4").decode(get_codec("int4").encode(x), x.shape, x.dtype)
    assert bool(ok) and torch.isfinite(out).all()
    assert out[0, 0, 0, 0] == pytest.approx(65504, rel=1e-3) and out[1, 0, 0, 1] == pytest.approx(-65504, rel=1e-3)


def test_compression_ratios():
    """Llama-3-8B layer (Hkv 8, D 128, T 2048, bf16) and SmolLM2's (Hkv 3, D 64)."""
    rows = []
    for shape in [(2, 2048, 8, 128), (2, 2048, 3, 64), (2, 33, 8, 128)]:
        r = {n: get_codec(n).compression_ratio(shape, torch.bfloat16) for n in CODECS}
        rows.append((shape, r))
        print(f"bf16 {shape}: " + "  ".join(f"{n} {v:.3f}x" for n, v in r.items()))
    r = rows[0][1]
    assert 0.999 < r["none"] <= 1.0
    assert 1.93 < r["fp8"] == r["int8"] < 2.0            # 1 byte per value + 4 bytes per 128 values
    assert 3.4 < r["int4"] < 4.0                          # fp16 scale+zero: keys 1 bit/value, values 1/4
    r64 = rows[1][1]
    assert 1.87 < r64["fp8"] < 2.0 and 3.3 < r64["int4"] < 4.0
    assert get_codec("fp8").compression_ratio((2, 2048, 8, 128), torch.float32) == pytest.approx(2 * r["fp8"])


# ---------------------------------------------------------------------------- corruption
def _positions(codec, shape, dtype, rng: random.Random) -> dict[str, list[int]]:
    """A few byte offsets in each section, its pad, and the checksum."""
    lay = codec.layout(shape, dtype)
    pos = {}
    for s in lay.sections:
        pos[s.name] = [s.offset, s.offset + s.nbytes - 1] + [rng.randrange(s.offset, s.offset + s.nbytes)
                                                           for _ in range(4)]
    gaps = zip([s.offset + s.nbytes for s in lay.sections], [s.offset for s in lay.sections[1:]] + [lay.body_nbytes])
    pos["pads"] = sorted({p for a, b in gaps if b > a for p in (a, b - 1)})
    pos["checksum"] = list(range(lay.body_nbytes, lay.nbytes))
    return pos


@pytest.mark.parametrize("name", list(CODECS))
def test_flipped_byte_detected(name):
    rng = random.Random(1234)
    codec = get_codec(name)
    shape, dtype = (2, 7, 3, 66), torch.float16       # every section of every codec ends in a pad
    kv = make_kv(shape, dtype)
    payload = codec.encode(kv)
    assert bool(codec.decode(payload, shape, dtype)[1])
    pos = _positions(codec, shape, dtype, rng)
    assert len(pos["pads"]) >= 2 * len(codec.layout(shape, dtype).sections), "every section ends in a pad here"
    for section, offsets in pos.items():
        for p in offsets:
            for bit in (rng.randrange(8), 7):
                bad = payload.clone()
                bad[p] ^= 1 << bit
                assert not bool(codec.decode(bad, shape, dtype)[1]), f"{name}: flip in {section} at byte {p}"


@pytest.mark.parametrize("name", list(CODECS))
def test_swapped_words_zero_payload_and_wrong_shape_detected(name):
    codec = get_codec(name)
    shape, dtype = (2, 8, 2, 64), torch.bfloat16
    payload = codec.encode(make_kv(shape, dtype, seed=3))
    words = payload.view(torch.int32)
    i, j = 2, 37
    assert words[i] != words[j]
    bad = payload.clone()
    bad.view(torch.int32)[[i, j]] = words[[j, i]]
    assert not bool(codec.decode(bad, shape, dtype)[1])
    assert not bool(codec.decode(torch.zeros_like(payload), shape, dtype)[1])
    swapped = (2, 2, 8, 64)      # same payload size, other shape: the checksum salt differs
    if codec.payload_nbytes(swapped, dtype) == payload.numel():
        assert not bool(codec.decode(payload, swapped, dtype)[1])


def test_checksum_matches_its_definition():
    body = torch.randint(0, 256, (64,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    words = [int.from_bytes(bytes(body[4 * i:4 * i + 4].tolist()), "little") for i in range(16)]
    P = 2**32 + 15
    want = (7 + sum((i + 1) * w for i, w in enumerate(words))) % P
    assert checksum_ref(body, 7).item() == want
    assert checksum_salt("int8", (2, 3, 4, 5), torch.float16) != checksum_salt("int8", (2, 3, 5, 4), torch.float16)


# ---------------------------------------------------------------------------- interface
@pytest.mark.parametrize("name", list(CODECS))
def test_decode_into_out(name):
    codec = get_codec(name)
    shape, dtype = (2, 33, 8, 128), torch.bfloat16
    payload = codec.encode(make_kv(shape, dtype))
    ref, _ = codec.decode(payload, shape, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype)
    got, ok = codec.decode(payload, shape, dtype, out=out)
    assert got is out and bool(ok)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="out must be"):
        codec.decode(payload, shape, dtype, out=torch.empty(shape, dtype=torch.float16))


def test_bad_inputs_raise():
    codec = get_codec("int8")
    with pytest.raises(ValueError, match=r"\[2, T, Hkv, D\]"):
        codec.encode(torch.zeros(3, 4, 2, 64))
    with pytest.raises(ValueError, match="contiguous"):
        codec.encode(torch.zeros(2, 64, 4, 2).transpose(1, 3))
    with pytest.raises(ValueError, match="dtype"):
        codec.encode(torch.zeros(2, 4, 2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="payload"):
        codec.decode(torch.zeros(100, dtype=torch.uint8), (2, 4, 2, 64), torch.float16)
    with pytest.raises(ValueError, match="even"):
        get_codec("int4").payload_nbytes((2, 4, 2, 63), torch.float16)


def test_unknown_codec_names_the_choices():
    with pytest.raises(ValueError) as e:
        get_codec("zstd")
    msg = str(e.value)
    assert "zstd" in msg and all(n in msg for n in ("none", "fp8", "int8", "int4"))


def test_registry():
    assert list(CODECS) == ["none", "fp8", "int8", "int4"]
    for name, cls in CODECS.items():
        c = get_codec(name)
        assert isinstance(c, cls) and c.name == name and c.lossless == (name == "none")
