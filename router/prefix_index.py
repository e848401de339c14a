"""The router's mirror of the workers' prefix caches: which block keys each worker holds.

Workers key full KV blocks with chained sha256 (decode/prefix_cache.py), a pure function of
the token ids, so the router computes the very same keys from a request's prompt and records
them against the worker it sends the request to. No message is needed, and none is trusted:

    prefill worker p   gets the prompt          -> insert(p, keys of the prompt's full blocks)
    decode worker d    gets prompt + answer     -> insert(d, keys of prompt + answer - 1 token)
                       (the last sampled token's KV is never computed)

    match(w, keys) = how many leading keys w is believed to hold

The mirror is approximate: each worker's entry is an LRU bounded by that worker's KV
capacity (`set_capacity`, from WorkerLoad.total_blocks), which is how the worker itself
evicts; a block the worker evicted early only costs a wrong guess, never a wrong answer
(the worker looks up its own cache; the decode worker tells the router what it really
holds in ReserveReply.num_cached_tokens). Pure bookkeeping: no I/O, no clock.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from decode.prefix_cache import block_hashes


class PrefixIndex:
    def __init__(self, block_size: int, default_capacity: int = 1 << 20):
        if block_size < 1 or default_capacity < 1:
            raise ValueError("block_size and capacity must be positive")
        self.block_size = block_size
        self.default_capacity = default_capacity
        self._lru: dict[int, OrderedDict[bytes, None]] = {}     # worker -> keys, oldest first
        self._capacity: dict[int, int] = {}

    def keys(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[bytes]:
        return block_hashes(token_ids, self.block_size, cache_salt)

    def set_capacity(self, worker: int, num_blocks: int) -> None:
        self._capacity[worker] = max(1, num_blocks)
        self._trim(worker)

    def match(self, worker: int, keys: Sequence[bytes]) -> int:
        """Leading blocks of `keys` the worker is believed to hold."""
        lru = self._lru.get(worker)
        if not lru:
            return 0
        n = 0
        for k in keys:
            if k not in lru:
                break
            n += 1
        return n

    def match_tokens(self, workers: Sequence[int], keys: Sequence[bytes], num_tokens: int) -> dict[int, int]:
        """{worker: leading tokens held}, capped like a worker's own lookup: never all `num_tokens`
        (one token always runs), full blocks only."""
        cap = (num_tokens - 1) // self.block_size if num_tokens else 0
        return {w: min(self.match(w, keys), cap) * self.block_size for w in workers}

    def insert(self, worker: int, keys: Sequence[bytes]) -> None:
        """The worker now holds these blocks (most recently used; the head of the chain last, so it is
        evicted last, as the worker's own LRU frees a table tail first)."""
        lru = self._lru.setdefault(worker, OrderedDict())
        for k in reversed(keys):
            lru[k] = None
            lru.move_to_end(k)
        self._trim(worker)

    def drop(self, worker: int) -> None:
        """Forget a worker (it died or was restarted: its cache is gone)."""
        self._lru.pop(worker, None)

    def size(self, worker: int) -> int:
        return len(self._lru.get(worker, ()))

    def _trim(self, worker: int) -> None:
        lru = self._lru.get(worker)
        cap = self._capacity.get(worker, self.default_capacity)
        while lru is not None and len(lru) > cap:
            lru.popitem(last=False)
