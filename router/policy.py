"""Dispatch policy: pure functions of the workers' reported load (no I/O, no clocks).

The simulator (later) calls the same functions with simulated loads.
"""
from __future__ import annotations

from disagg.messages import WorkerLoad


def decode_preference(loads: list[WorkerLoad], need_blocks: int) -> list[int]:
    """Decode ranks that can take `need_blocks` now, most free KV first (ties: lower rank)."""
    ok = [w for w in loads if w.free_blocks >= need_blocks]
    return [w.rank for w in sorted(ok, key=lambda w: (-w.free_blocks, w.rank))]


def pick_prefill(loads: list[WorkerLoad]) -> int:
    """The prefill rank with the fewest queued prompt tokens (ties: fewer requests, lower rank)."""
    if not loads:
        raise ValueError("no prefill worker")
    return min(loads, key=lambda w: (w.queued_prompt_tokens, w.num_running + w.num_waiting, w.rank)).rank
