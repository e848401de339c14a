"""Paged KV-cache bookkeeping: fixed-size blocks, one block table per request.

The block manager deals in block ids and token counts only; it never sees tensors.
Allocators ask before they commit: `allocate_slots` returns None (and changes
nothing) when the blocks are not there. Blocks carry reference counts so that a
block can later be shared (prefix caching); today every block has one owner.

Invariants (checked by `check_integrity`):
  - every block id is either free or referenced, never both;
  - a block's ref count equals the number of tables that hold it;
  - a table holds ceil(num_tokens / block_size) blocks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheBlocks:
    """What the scheduler gets back from an allocation: the ids, nothing else."""
    block_ids: tuple[int, ...]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}

    # ------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

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
        return self.num_new_blocks(request_id, num_tokens) + reserve <= len(self._free)

    # ------------------------------------------------------------- changes
    def allocate_slots(self, request_id: str, num_tokens: int) -> KVCacheBlocks | None:
        """Grow the request's table to hold `num_tokens` tokens. None (no change) if full."""
        need = self.num_new_blocks(request_id, num_tokens)
        if need > len(self._free):
            return None
        table = self._tables.setdefault(request_id, [])
        new = [self._free.popleft() for _ in range(need)]
        for b in new:
            self._ref[b] += 1
        table.extend(new)
        self._num_tokens[request_id] = max(num_tokens, self._num_tokens.get(request_id, 0))
        return KVCacheBlocks(tuple(new))

    def free(self, request_id: str) -> int:
        """Release every block of the request (idempotent). Returns the number of blocks freed."""
        table = self._tables.pop(request_id, None)
        self._num_tokens.pop(request_id, None)
        if not table:
            return 0
        freed = 0
        # Free in reverse so the tail of a sequence is reused first (its head is likelier shared later).
        for b in reversed(table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
                freed += 1
        return freed

    def check_integrity(self) -> None:
        free = list(self._free)
        if len(set(free)) != len(free):
            raise AssertionError("a block is on the free list twice")
        counts = [0] * self.num_blocks
        for rid, table in self._tables.items():
            for b in table:
                counts[b] += 1
            need = self.blocks_for(self._num_tokens.get(rid, 0))
            if len(table) != need:
                raise AssertionError(f"{rid}: holds {len(table)} blocks for "
                                     f"{self._num_tokens.get(rid, 0)} tokens (needs {need})")
        free_set = set(free)
        for b in range(self.num_blocks):
            if counts[b] != self._ref[b]:
                raise AssertionError(f"block {b}: ref count {self._ref[b]} but held by {counts[b]} tables")
            if (b in free_set) == (counts[b] > 0):
                raise AssertionError(f"block {b}: free={b in free_set} but held by {counts[b]} tables")
