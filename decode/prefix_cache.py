"""Prefix-cache keys: one sha256 per full KV block, chained through everything before it.

    root            = sha256("disagg-prefix-cache-v1" [+ "salt:" + cache_salt])
    hash(block i)   = sha256(hash(block i-1) + little-endian int64 token ids of block i)
                      (block -1 is the root)

    tokens:  [t0 .. t15][t16 .. t31][t32 .. t40]
    hashes:  h0          h1 = H(h0 + ...)       (partial block: no hash, never cached)

A block's key therefore names its tokens, its position and every token before it, so
two requests share block i only if they agree on all tokens up to the end of block i
(and on the salt: a tenant's `cache_salt` changes the root, hence every key, so two
salts never share a block). sha256 makes an accidental collision of two different
prefixes practically impossible (vLLM's choice for the same reason; Python's `hash`
is 64-bit and seeded per process, which would also break the router's mirror index).

These are pure functions of token ids, so the router can compute the very keys the
workers use (router/prefix_index.py).
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

_ROOT = hashlib.sha256(b"disagg-prefix-cache-v1").digest()


def root_hash(cache_salt: str | None = None) -> bytes:
    """The parent of block 0: a constant, or one per salt."""
    if not cache_salt:
        return _ROOT
    return hashlib.sha256(_ROOT + b"salt:" + cache_salt.encode("utf-8")).digest()


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None,
                 known: Sequence[bytes] = (), limit: int | None = None) -> list[bytes]:
    """Keys of the full blocks of `token_ids` (at most `limit` blocks).

    `known`: keys already computed for the first blocks of the same tokens and salt (they are
    reused, not recomputed), so a growing request hashes each block once."""
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, limit)
    out = list(known[:n])
    parent = out[-1] if out else root_hash(cache_salt)
    for i in range(len(out), n):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


@dataclass
class PrefixCacheStats:
    """Tokens looked up in the cache and found there (vLLM's prefix_cache_queries / _hits).

    One lookup per admission of a request with nothing computed (a preempted request looks up
    again), and one per decode-side reservation; queries - hits is what had to be computed
    (or, on a decode worker, transferred)."""
    queries: int = 0
    hits: int = 0

    def record(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
