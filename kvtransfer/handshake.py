"""The handshake: both ends of a KV channel must agree on what the bytes mean.

A prefill and a decode worker exchange `messages.Handshake` before any KV moves; a
mismatch in model, layer count, KV heads, head size, dtype, block size, codec or
protocol refuses the pair with one error that names every difference.
"""
from __future__ import annotations

import dataclasses

from disagg.config import ModelConfig
from disagg.messages import Handshake


class HandshakeError(RuntimeError):
    pass


def make_handshake(model_cfg: ModelConfig, dtype: str, block_size: int, codec: str) -> Handshake:
    return Handshake(model=model_cfg.name, num_layers=model_cfg.num_layers, num_kv_heads=model_cfg.num_kv_heads,
                     head_dim=model_cfg.head_dim, dtype=dtype, block_size=block_size, codec=codec)


def check_compatible(prefill: Handshake, decode: Handshake) -> None:
    diffs = []
    for f in dataclasses.fields(Handshake):
        a, b = getattr(prefill, f.name), getattr(decode, f.name)
        if f.name == "block_size":
            continue  # each side addresses its own blocks; the wire carries tokens, not blocks
        if a != b:
            diffs.append(f"{f.name}: prefill has {a!r}, decode has {b!r}")
    if diffs:
        raise HandshakeError("KV handshake refused, the two ends disagree on " + "; ".join(diffs))
