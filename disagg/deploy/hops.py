"""Where a disaggregated request's time to first token goes, seen from the router.

    arrive ─ queue_reserve ─ dispatched ─ submit ─ sent ─ prefill_first_token ─ first ─ first_to_second ─ second
             (router queue,   (decode      (prompt to     (prefill queue + step,     (KV landed, admitted,
             Reserve RPC:     worker       the prefill    first token back to the    one decode step, its
             waits for the    chosen)      worker's       router's output poll)      token back)
             decode step in                inbox)
             progress)

Only first attempts that prefilled remotely are timed (a local prefill has no handoff). Each
phase goes to `observe(phase, seconds)` when set (the HTTP server's Prometheus histogram
`disagg:request_phase_seconds{phase}`), and into a bounded sample for `summary()`
(benchmarks/bench_handoff.py).
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Callable

PHASES = ("queue_reserve", "submit", "prefill_first_token", "first_to_second_token")
_EDGES = (("arrive", "dispatched"), ("dispatched", "sent"), ("sent", "first"), ("first", "second"))


class HopTimes:
    def __init__(self, keep: int = 10000):
        self.samples = {p: deque(maxlen=keep) for p in PHASES}
        self.observe: Callable[[str, float], None] | None = None

    @staticmethod
    def mark(t: dict, name: str) -> None:
        if name not in t:
            t[name] = time.perf_counter()

    def finish(self, t: dict) -> None:
        """A stream's timestamps (once it has its second token, or ends): record each phase it has,
        then empty them (the stream's later tokens have nothing to time)."""
        for phase, (a, b) in zip(PHASES, _EDGES):
            if a in t and b in t:
                s = t[b] - t[a]
                self.samples[phase].append(s)
                if self.observe is not None:
                    self.observe(phase, s)
        t.clear()

    def summary(self) -> dict:
        """Per phase: count, median and P90 seconds of the kept samples."""
        out = {}
        for p, xs in self.samples.items():
            if xs:
                v = sorted(xs)
                out[p] = {"count": len(v), "p50_s": statistics.median(v), "p90_s": v[int(0.9 * (len(v) - 1))]}
        return out
