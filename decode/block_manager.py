"""Paged KV-cache bookkeeping: fixed-size blocks, one block table per request, a prefix cache.

The block manager deals in block ids, token counts and block keys (decode/prefix_cache.py);
it never sees tensors. Allocators ask before they commit: `allocate_slots` returns None
(and changes nothing) when the blocks are not there.

Prefix caching (`enable_prefix_caching`). A full block whose KV has been computed is
registered under its key (`cache_blocks`). It stays registered after its requests end:
ref count 0 puts it on the *evictable* list (LRU order), not the free list, and a later
request whose prompt starts with the same tokens takes it back (`lookup`, then
`allocate_slots(..., cached_blocks=...)`: ref + 1, no new block, no compute). A block is
evicted (its key dropped) only when an allocation finds the free list empty, oldest first.

    every block is in exactly one of three places:
      held        ref > 0, in ref-many tables (shared blocks are keyed, at the same index)
      evictable   ref 0, keyed, LRU order (oldest evicted first)      } both count as free
      free        ref 0, no key, FIFO                                 } for admission
    allocation takes from free first, then evicts from evictable.

`num_free_blocks` counts the evictable blocks as free: they cost nothing to reclaim, so
admission and the router see the memory as available. A cached block in use is never
evictable (ref > 0), so eviction can never take a block from under a request.

Invariants (checked by `check_integrity`):
  - every block id is exactly one of free / evictable / held; free + evictable + held = total;
  - a block's ref count equals the number of tables that hold it; no table holds a block twice;
  - key -> block and block -> key agree (a bijection over the keyed blocks); free blocks have no
    key, evictable ones have one; a block held by several tables is keyed and at the same index;
  - a table holds ceil(num_tokens / block_size) blocks.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheBlocks:
    """What the scheduler gets back from an allocation: the new ids, nothing else."""
    block_ids: tuple[int, ...]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        """enable_prefix_caching=False (the mechanism's default) behaves exactly as a plain allocator:
        nothing is ever keyed; the engine passes CacheConfig.enable_prefix_caching."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()   # oldest first
        self._ref = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}                       # key -> block
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}
        self._num_keyed: dict[str, int] = {}      # leading blocks of a table cache_blocks has seen
        self.num_evictions = 0

    # ------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Keyed blocks, in use or evictable."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_tokens(self, request_id: str) -> int:
        return self._num_tokens.get(request_id, 0)

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that `request_id` holds `num_tokens` tokens in total."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(request_id, ())))

    def can_allocate(self, request_id: str, num_tokens: int, reserve: int = 0) -> bool:
        return self.num_new_blocks(request_id, num_tokens) + reserve <= self.num_free_blocks

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """Blocks of the longest prefix of `keys` that is cached (read-only; [] when caching is off)."""
        out = []
        for k in keys:
            b = self._cached.get(k)
            if b is None:
                break
            out.append(b)
        return out

    # ------------------------------------------------------------- changes
    def allocate_slots(self, request_id: str, num_tokens: int,
                       cached_blocks: Sequence[int] = ()) -> KVCacheBlocks | None:
        """Grow the request's table to hold `num_tokens` tokens. None (no change) if full.

        cached_blocks: blocks from `lookup` that become the head of a *new* table (shared, not
        allocated; their KV is already there). Returns only the newly allocated ids."""
        table = self._tables.get(request_id)
        if cached_blocks and table:
            raise ValueError(f"{request_id}: cached blocks can only start a new table")
        held = len(cached_blocks) + (len(table) if table else 0)
        need = max(0, self.blocks_for(num_tokens) - held)
        revived = sum(1 for b in cached_blocks if self._ref[b] == 0)   # leave the evictable pool
        if need + revived > self.num_free_blocks:
            return None
        if table is None:
            table = self._tables[request_id] = []
        for b in cached_blocks:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
            table.append(b)
        if cached_blocks:
            self._num_keyed[request_id] = len(cached_blocks)
        new = [self._take() for _ in range(need)]
        for b in new:
            self._ref[b] = 1
        table.extend(new)
        self._num_tokens[request_id] = max(num_tokens, self._num_tokens.get(request_id, 0),
                                           len(cached_blocks) * self.block_size)
        return KVCacheBlocks(tuple(new))

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        b, _ = self._evictable.popitem(last=False)     # least recently used
        del self._cached[self._key[b]]
        self._key[b] = None
        self.num_evictions += 1
        return b

    def cache_blocks(self, request_id: str, keys: Sequence[bytes]) -> int:
        """Key the request's first len(keys) blocks, whose KV is computed (they are full).
        A key already held by another block leaves this one unkeyed (two requests computed the
        same prefix at once; the first one stays the cached copy). Returns blocks newly keyed.
        Blocks seen by an earlier call are skipped, so a growing request costs O(new blocks)."""
        if not self.enable_prefix_caching:
            return 0
        table = self._tables.get(request_id, ())
        if len(keys) > len(table):
            raise ValueError(f"{request_id}: {len(keys)} keys for {len(table)} blocks")
        start = self._num_keyed.get(request_id, 0)
        if len(keys) <= start:
            return 0
        self._num_keyed[request_id] = len(keys)
        added = 0
        for i in range(start, len(keys)):
            b, k = table[i], keys[i]
            if self._key[b] is not None:
                if self._key[b] != k:
                    raise AssertionError(f"block {b} is cached under another key")
                continue
            if k in self._cached:
                continue
            self._key[b] = k
            self._cached[k] = b
            added += 1
        return added

    def free(self, request_id: str) -> int:
        """Release every block of the request (idempotent). Returns the number of blocks whose
        ref count reached 0 (free or evictable again)."""
        table = self._tables.pop(request_id, None)
        self._num_tokens.pop(request_id, None)
        self._num_keyed.pop(request_id, None)
        if not table:
            return 0
        freed = 0
        # Tail first, so the tail of a sequence is reused (or evicted) before its head: the head is
        # likelier shared by a later request.
        for b in reversed(table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._key[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
                freed += 1
        return freed

    def reset_prefix_cache(self) -> int:
        """Forget every key (evictable blocks become free; blocks in use stay, unkeyed). Returns the
        number of keys dropped."""
        n = len(self._cached)
        for b in self._evictable:
            self._free.append(b)
        self._evictable.clear()
        for b in self._cached.values():
            self._key[b] = None
        self._cached.clear()
        return n

    # ------------------------------------------------------------- integrity
    def check_integrity(self) -> None:
        free = list(self._free)
        if len(set(free)) != len(free):
            raise AssertionError("a block is on the free list twice")
        counts = [0] * self.num_blocks
        where: dict[int, int] = {}                  # shared block -> its index in the tables
        for rid, table in self._tables.items():
            if len(set(table)) != len(table):
                raise AssertionError(f"{rid}: a table holds a block twice")
            for i, b in enumerate(table):
                counts[b] += 1
                if where.setdefault(b, i) != i:
                    raise AssertionError(f"block {b}: shared at different table positions")
            need = self.blocks_for(self._num_tokens.get(rid, 0))
            if len(table) != need:
                raise AssertionError(f"{rid}: holds {len(table)} blocks for "
                                     f"{self._num_tokens.get(rid, 0)} tokens (needs {need})")
        free_set, evict_set = set(free), set(self._evictable)
        for b in range(self.num_blocks):
            if counts[b] != self._ref[b]:
                raise AssertionError(f"block {b}: ref count {self._ref[b]} but held by {counts[b]} tables")
            places = (b in free_set) + (b in evict_set) + (counts[b] > 0)
            if places != 1:
                raise AssertionError(f"block {b}: free={b in free_set} evictable={b in evict_set} "
                                     f"but held by {counts[b]} tables")
            k = self._key[b]
            if b in free_set and k is not None:
                raise AssertionError(f"block {b}: on the free list with a key")
            if b in evict_set and k is None:
                raise AssertionError(f"block {b}: evictable without a key")
            if counts[b] > 1 and k is None:
                raise AssertionError(f"block {b}: shared by {counts[b]} tables without a key")
            if k is not None and self._cached.get(k) != b:
                raise AssertionError(f"block {b}: its key maps to block {self._cached.get(k)}")
        for k, b in self._cached.items():
            if self._key[b] != k:
                raise AssertionError(f"cached key maps to block {b}, which has another key")
        if not self.enable_prefix_caching and self._cached:
            raise AssertionError("keyed blocks with prefix caching off")
        if len(free) + len(self._evictable) + sum(1 for c in counts if c) != self.num_blocks:
            raise AssertionError("free + evictable + held != total")
