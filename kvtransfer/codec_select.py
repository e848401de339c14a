"""`--kv-codec auto`: pick the codec with the shortest handoff for the measured link.

    handoff(c) = encode(c) + wire_bytes(c) / link_bandwidth + decode(c)

for one layer's KV of a typical prompt; encode/decode times are measured on the
worker's own device at start-up, the bandwidth over the real channel. Candidates are
the codecs within the quality bound (perplexity within +1% of lossless: none, fp8,
int8); int4 (+5% bound) is used only when asked for by name.
"""
from __future__ import annotations

import time

import torch

AUTO_CANDIDATES = ("none", "fp8", "int8")


def measure_codecs(names, num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, iters: int = 5) -> dict[str, dict[str, float]]:
    from kvtransfer.codec import get_codec
    kv = torch.randn(2, num_tokens, num_kv_heads, head_dim, device=device).to(dtype)
    raw = kv.numel() * kv.element_size()
    out = {}
    for name in names:
        c = get_codec(name)
        payload = c.encode(kv)
        c.decode(payload, tuple(kv.shape), dtype)

        def timed(fn):
            ts = []
            for _ in range(iters):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                ts.append(time.perf_counter() - t0)
            return sorted(ts)[len(ts) // 2]
        out[name] = {"raw_bytes": raw, "wire_bytes": payload.numel(),
                     "encode_s": timed(lambda: c.encode(kv)),
                     "decode_s": timed(lambda: c.decode(payload, tuple(kv.shape), dtype))}
    return out


def handoff_seconds(m: dict[str, float], bandwidth: float) -> float:
    return m["encode_s"] + m["wire_bytes"] / bandwidth + m["decode_s"]


def choose_codec(measured: dict[str, dict[str, float]], bandwidth: float,
                 candidates=AUTO_CANDIDATES) -> tuple[str, dict[str, float]]:
    """(best codec, handoff seconds of each candidate)."""
    times = {n: handoff_seconds(m, bandwidth) for n, m in measured.items() if n in candidates}
    if not times:
        return "none", {}
    return min(times, key=times.get), times
