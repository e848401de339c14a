"""KV codecs: one layer's KV `kv: [2, T, Hkv, D]` (K then V) <-> a flat uint8 payload.

The receiver allocates its buffer before the bytes arrive, so a payload's length is a pure
function of (shape, dtype, codec): there is no header. Every section starts on a 16-byte
boundary; pad bytes are zero and, like everything before the checksum, are covered by it.

    offset 0                                                          body_nbytes
    v                                                                 v
    none | kv, raw bytes       |pad|                                  | ck |
    fp8  | q [2,T,H,D] e4m3fn  |pad| scale [2,T,H] fp32 |pad|        | ck |
    int8 | q [2,T,H,D] int8    |pad| scale [2,T,H] fp32 |pad|        | ck |
    int4 | q [2,T,H,D/2] uint8 |pad| kmeta [2,NG,H,D] fp16 |pad| vmeta [2,T,H] fp16 |pad| ck |

    ck = 16 bytes: int64 c, int64 ~c (see checksum_ref);  NG = ceil(T / 32) key groups
    int4 byte j of a row holds channels (2j, 2j+1): low nibble = channel 2j.
    kmeta[0] = key scales, kmeta[1] = key zeros (per token group, head, channel);
    vmeta[0] = value scales, vmeta[1] = value zeros (per token, head).

Error bounds (x an element, x' its reconstruction in fp32; the result is then rounded once
more to the model dtype, half an ulp of that dtype, which the bounds below leave out):
    none   x' == x, bit for bit.
    fp8    scale = amax/448 per (k/v, token, head) group of D values, y = x/scale in [-448, 448]
           rounded to e4m3 (3 mantissa bits, round to nearest even). Normal range (|y| >= 2^-6):
           half an ulp is <= 2^-4 |y|; subnormals (|y| < 2^-6) are spaced 2^-9, so the error is
           <= 2^-10 in y. Hence |x' - x| <= max(2^-4 |x|, 2^-10 scale) <= 2^-4 amax.
    int8   scale = amax/127 per (k/v, token, head) group, q = round(x/scale): |x' - x| <= scale/2.
    int4   x' = q*scale + zero, q in 0..15, |x' - x| <= scale/2, scale <= (max - min + ulp16(min))/15
           per group: keys per (head, channel) over 32 consecutive tokens (the last group may be
           partial), values per (token, head) over D channels (KIVI). scale and zero are fp16: the
           zero is rounded down and the scale up, so [zero, zero + 15 scale] covers the group.
           Inputs are clamped to +-65504 (fp16's range) first; KV never comes near it in practice.
All arithmetic is fp32: scales are amax * fp32(1/qmax) (bounds: within an fp32 ulp of amax/qmax,
and the clamp to +-qmax absorbs it), quantization divides by a tensor (correctly rounded on every
device) and rounds half to even. So the Triton kernels (codec_triton.py, used on CUDA) write the
same bytes as this torch reference, on either device.
"""
from __future__ import annotations

import struct
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from disagg.kernels import triton_available

Shape = tuple[int, int, int, int]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALIGN = 16
CHECKSUM_NBYTES = 16
K_GROUP = 32             # int4: tokens per key group
FP8_MAX = 448.0          # largest finite float8_e4m3fn
INT8_MAX = 127.0
FP16_MAX = 65504.0
# Checksum modulus: the smallest prime above 2^32, so every uint32 word and every word difference
# is a nonzero residue. Words are indexed from 1 and there are < 2^30 of them (4 GiB), so
# u*(i+1) < 2^62 and a sum of < 2^30 residues < 2^63: exact in int64.
CHECKSUM_P = 2**32 + 15
MAX_BODY_NBYTES = 2**32


def fp32(x: float) -> float:
    """x rounded to float32. Scales are amax * fp32(1/qmax): a multiplication by a constant rounds the
    same on every device (torch on CUDA turns `t / scalar` into `t * (1/scalar)`; on CPU it divides)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ---------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Section:
    name: str
    offset: int              # bytes, a multiple of ALIGN
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Layout:
    sections: tuple[Section, ...]
    body_nbytes: int         # everything the checksum covers; the checksum starts here

    @property
    def nbytes(self) -> int:
        return self.body_nbytes + CHECKSUM_NBYTES

    @property
    def data_nbytes(self) -> int:
        """Unpadded size of the first section; encode zeroes [data_nbytes, body_nbytes)."""
        return self.sections[0].nbytes

    @classmethod
    def of(cls, *parts: tuple[str, torch.dtype, tuple[int, ...]]) -> "Layout":
        secs, off = [], 0
        for name, dtype, shape in parts:
            s = Section(name, off, dtype, tuple(shape))
            secs.append(s)
            off = _align(off + s.nbytes)
        if off > MAX_BODY_NBYTES:
            raise ValueError(f"payload of {off} bytes is over the {MAX_BODY_NBYTES}-byte limit: send fewer tokens")
        return cls(tuple(secs), off)

    def views(self, payload: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s.name: payload[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.sections}

    def checksum_view(self, payload: torch.Tensor) -> torch.Tensor:
        """[2] int64: (c, ~c)."""
        return payload[self.body_nbytes:].view(torch.int64)


# ---------------------------------------------------------------------------- checksum
# checksum(body) = (salt + sum_i (i+1) * u_i) mod P, u_i = the i-th little-endian uint32 word.
#  * a change confined to one word i (any flipped byte): delta = (i+1)(u'-u) with
#    0 < |u'-u| < 2^32 < P and 0 < i+1 < P; P is prime, so delta != 0 mod P: always detected;
#  * two different words i < j swapped: delta = (j-i)(u_i-u_j), both factors nonzero and < P in
#    magnitude: always detected; other corruptions escape with probability ~1/P = 2^-32;
#  * stored as (c, ~c): a flip in either copy breaks c == recomputed or the complement, and an
#    all-zero buffer (never written) fails since ~c < 0 <= c;
#  * the salt hashes (codec, shape, dtype), so a payload decoded as the wrong shape fails too.
# It is a sum, so it runs on the device with no host sync (a Triton kernel on CUDA).
def checksum_salt(codec: str, shape: Shape, dtype: torch.dtype) -> int:
    return zlib.crc32(f"{codec}|{tuple(shape)}|{dtype}".encode())


def checksum_ref(body: torch.Tensor, salt: int, chunk_words: int = 1 << 22) -> torch.Tensor:
    """body: [N] uint8, N % 4 == 0 -> 0-dim int64 in [0, P) on body.device. Chunked, so the int64
    temporaries stay at a few times 16 MiB however large the payload."""
    words = body.view(torch.int32)
    acc = torch.tensor(salt, dtype=torch.int64, device=body.device)
    for start in range(0, words.numel(), chunk_words):
        u = words[start:start + chunk_words].to(torch.int64) & 0xFFFFFFFF
        i = torch.arange(start + 1, start + u.numel() + 1, dtype=torch.int64, device=body.device)
        acc += ((u * i) % CHECKSUM_P).sum()          # < 2^22 * P per chunk; acc stays < 2^63
    return acc % CHECKSUM_P


def _seal(payload: torch.Tensor, lay: Layout, salt: int, fast: bool) -> None:
    if fast:
        from kvtransfer import codec_triton
        codec_triton.checksum(payload, lay.body_nbytes, salt, seal=True)
        return
    c = checksum_ref(payload[:lay.body_nbytes], salt)
    lay.checksum_view(payload).copy_(torch.stack([c, ~c]))


def _verify(payload: torch.Tensor, lay: Layout, salt: int, fast: bool) -> torch.Tensor:
    if fast:
        from kvtransfer import codec_triton
        return codec_triton.checksum(payload, lay.body_nbytes, salt, seal=False)
    c = checksum_ref(payload[:lay.body_nbytes], salt)
    stored = lay.checksum_view(payload)
    return (stored[0] == c) & (stored[1] == ~c)


# ---------------------------------------------------------------------------- the interface
def _check_shape(shape, dtype: torch.dtype) -> Shape:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape[0] != 2 or min(shape) < 1:
        raise ValueError(f"kv shape must be [2, T, Hkv, D] with T, Hkv, D >= 1; got {list(shape)}")
    if dtype not in DTYPES:
        raise ValueError(f"kv dtype must be float32, float16 or bfloat16; got {dtype}")
    return shape


class Codec(ABC):
    """Encode one layer's KV into a flat uint8 payload ending in a checksum, and back."""
    name: ClassVar[str]
    lossless: ClassVar[bool]

    def __init__(self, use_triton: bool | None = None):
        """use_triton None: the Triton kernels for CUDA tensors when triton is importable."""
        self.use_triton = use_triton

    @abstractmethod
    def layout(self, shape: Shape, dtype: torch.dtype) -> Layout: ...

    @abstractmethod
    def _encode_into(self, kv: torch.Tensor, views: dict[str, torch.Tensor], fast: bool) -> None: ...

    @abstractmethod
    def _decode_into(self, views: dict[str, torch.Tensor], out: torch.Tensor, fast: bool) -> None: ...

    def payload_nbytes(self, shape: Shape, dtype: torch.dtype) -> int:
        return self.layout(_check_shape(shape, dtype), dtype).nbytes

    def compression_ratio(self, shape: Shape, dtype: torch.dtype) -> float:
        shape = _check_shape(shape, dtype)
        raw = 2 * shape[1] * shape[2] * shape[3] * dtype.itemsize
        return raw / self.payload_nbytes(shape, dtype)

    def _fast(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        return triton_available() if self.use_triton is None else self.use_triton

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """kv: [2, T, Hkv, D] contiguous -> [payload_nbytes] uint8 on kv.device (no host sync)."""
        shape = _check_shape(kv.shape, kv.dtype)
        if not kv.is_contiguous():
            raise ValueError("kv must be contiguous")
        lay = self.layout(shape, kv.dtype)
        fast = self._fast(kv.device)
        payload = torch.empty(lay.nbytes, dtype=torch.uint8, device=kv.device)
        payload[lay.data_nbytes:lay.body_nbytes].zero_()     # pads (metadata is rewritten below)
        self._encode_into(kv, lay.views(payload), fast)
        _seal(payload, lay, checksum_salt(self.name, shape, kv.dtype), fast)
        return payload

    def decode(self, payload: torch.Tensor, shape: Shape, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (kv [2, T, Hkv, D] in dtype, written into `out` if given; ok: 0-dim bool on the device,
        True iff the checksum matched). Read `ok` once per batch: it is the only sync."""
        shape = _check_shape(shape, dtype)
        lay = self.layout(shape, dtype)
        if payload.dtype != torch.uint8 or payload.shape != (lay.nbytes,) or not payload.is_contiguous():
            raise ValueError(f"{self.name} payload for {list(shape)} {dtype} must be a contiguous [{lay.nbytes}] "
                             f"uint8 tensor; got {tuple(payload.shape)} {payload.dtype}")
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=payload.device)
        elif out.shape != shape or out.dtype != dtype or out.device != payload.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {list(shape)} {dtype} tensor on {payload.device}; got "
                             f"{list(out.shape)} {out.dtype} on {out.device}")
        fast = self._fast(payload.device)
        self._decode_into(lay.views(payload), out, fast)
        return out, _verify(payload, lay, checksum_salt(self.name, shape, dtype), fast)


# ---------------------------------------------------------------------------- none
class NoneCodec(Codec):
    """Raw bytes plus the checksum: exactly lossless."""
    name = "none"
    lossless = True

    def layout(self, shape, dtype):
        return Layout.of(("data", dtype, shape))

    def _encode_into(self, kv, views, fast):
        views["data"].copy_(kv)

    def _decode_into(self, views, out, fast):
        out.copy_(views["data"])


# ---------------------------------------------------------------------------- fp8 / int8
class _PerTokenCodec(Codec):
    """Symmetric, one fp32 scale per (k/v, token, head) group of D values."""
    lossless = False
    qdtype: ClassVar[torch.dtype]
    qmax: ClassVar[float]

    def layout(self, shape, dtype):
        return Layout.of(("q", self.qdtype, shape), ("scale", torch.float32, shape[:3]))

    def _encode_into(self, kv, views, fast):
        if fast:
            from kvtransfer import codec_triton
            codec_triton.pertoken_encode(kv, views["q"], views["scale"])
            return
        x = kv.float()
        scale = x.abs().amax(-1) * fp32(1 / self.qmax)                 # [2, T, H]
        y = x / torch.where(scale > 0, scale, 1.0)[..., None]
        views["q"].copy_(self._round(y))
        views["scale"].copy_(scale)

    def _decode_into(self, views, out, fast):
        if fast:
            from kvtransfer import codec_triton
            codec_triton.pertoken_decode(views["q"], views["scale"], out)
            return
        out.copy_(views["q"].float() * views["scale"][..., None])

    @staticmethod
    @abstractmethod
    def _round(y: torch.Tensor) -> torch.Tensor: ...


class Fp8Codec(_PerTokenCodec):
    """float8_e4m3fn, scale = amax/448: |x' - x| <= max(2^-4 |x|, 2^-10 scale)."""
    name = "fp8"
    qdtype = torch.float8_e4m3fn
    qmax = FP8_MAX

    @staticmethod
    def _round(y):
        return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)    # round to nearest even


class Int8Codec(_PerTokenCodec):
    """int8, scale = amax/127: |x' - x| <= scale/2."""
    name = "int8"
    qdtype = torch.int8
    qmax = INT8_MAX

    @staticmethod
    def _round(y):
        return y.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)   # round half to even


# ---------------------------------------------------------------------------- int4
def fp16_round(x: torch.Tensor, up: bool) -> torch.Tensor:
    """fp32 -> fp16 rounded toward +inf (up) or -inf: RNE, then one step if it went the wrong way."""
    h = x.to(torch.float16)
    wrong = h.float() < x if up else h.float() > x
    step = torch.nextafter(h, torch.full_like(h, float("inf") if up else float("-inf")))
    return torch.where(wrong, step, h)


def int4_params(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group min/max (fp32) -> (scale, zero) fp16 with zero <= mn and zero + 15*scale >= mx."""
    zero = fp16_round(mn, up=False)
    scale = fp16_round((mx - zero.float()) * fp32(1 / 15), up=True)
    return scale, zero


def int4_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    s = scale.float()
    y = (x - zero.float()) / torch.where(s > 0, s, 1.0)
    return y.round().clamp(0, 15).to(torch.uint8)


class Int4Codec(Codec):
    """Asymmetric 4-bit (KIVI): keys per channel over 32-token groups, values per token."""
    name = "int4"
    lossless = False

    def layout(self, shape, dtype):
        _, T, H, D = shape
        if D % 2:
            raise ValueError(f"int4 packs two channels per byte: head_dim must be even; got {D}")
        ng = -(-T // K_GROUP)
        return Layout.of(("q", torch.uint8, (2, T, H, D // 2)), ("kmeta", torch.float16, (2, ng, H, D)),
                         ("vmeta", torch.float16, (2, T, H)))

    def _encode_into(self, kv, views, fast):
        if fast:
            from kvtransfer import codec_triton
            codec_triton.int4_encode(kv, views["q"], views["kmeta"], views["vmeta"])
            return
        _, T, H, D = kv.shape
        ng = views["kmeta"].shape[1]
        x = kv.float().clamp(-FP16_MAX, FP16_MAX)
        # keys: pad T up to ng*32 by repeating the last token (min/max unchanged), group over tokens
        k = torch.cat([x[0], x[0, -1:].expand(ng * K_GROUP - T, H, D)]).view(ng, K_GROUP, H, D)
        ks, kz = int4_params(k.amin(1), k.amax(1))                    # [ng, H, D]
        qk = int4_quantize(k, ks[:, None], kz[:, None]).view(ng * K_GROUP, H, D)[:T]
        vs, vz = int4_params(x[1].amin(-1), x[1].amax(-1))             # [T, H]
        qv = int4_quantize(x[1], vs[..., None], vz[..., None])
        q = torch.stack([qk, qv])                                      # [2, T, H, D] uint8 0..15
        views["q"].copy_(q[..., 0::2] | (q[..., 1::2] << 4))
        views["kmeta"].copy_(torch.stack([ks, kz]))
        views["vmeta"].copy_(torch.stack([vs, vz]))

    def _decode_into(self, views, out, fast):
        if fast:
            from kvtransfer import codec_triton
            codec_triton.int4_decode(views["q"], views["kmeta"], views["vmeta"], out)
            return
        p = views["q"]
        T = p.shape[1]
        q = torch.stack([p & 15, p >> 4], -1).flatten(-2).float()      # [2, T, H, D]
        km, vm = views["kmeta"].float(), views["vmeta"].float()
        ks = km[0].repeat_interleave(K_GROUP, 0)[:T]                   # [T, H, D]
        kz = km[1].repeat_interleave(K_GROUP, 0)[:T]
        out[0].copy_(q[0] * ks + kz)
        out[1].copy_(q[1] * vm[0][..., None] + vm[1][..., None])


# ---------------------------------------------------------------------------- registry
CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoneCodec, Fp8Codec, Int8Codec, Int4Codec)}


def get_codec(name: str, use_triton: bool | None = None) -> Codec:
    try:
        return CODECS[name](use_triton)
    except KeyError:
        raise ValueError(f"unknown KV codec {name!r}; choose one of {', '.join(CODECS)}") from None
