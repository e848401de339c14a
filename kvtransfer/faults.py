"""Fault injection for the KV path (tests and chaos benchmarks; off unless asked for).

`CorruptingChannel` wraps a KVChannel and, with probability `rate` per message, sends a
copy of the payload with one byte flipped. The receiver's checksum must catch every one:
the decode worker then recomputes the prompt itself, so no output may differ.
"""
from __future__ import annotations

import random

import torch


class CorruptingChannel:
    def __init__(self, channel, rate: float, seed: int = 0):
        if not 0 <= rate <= 1:
            raise ValueError("fault rate must be in [0, 1]")
        self.ch, self.rate = channel, rate
        self.rng = random.Random(seed)
        self.flipped = 0

    def isend(self, t: torch.Tensor, peer: int, tag: int = 0):
        if t.dtype == torch.uint8 and t.numel() and self.rng.random() < self.rate:
            t = t.clone()
            i = self.rng.randrange(t.numel())
            t[i] ^= 1 << self.rng.randrange(8)
            self.flipped += 1
        return self.ch.isend(t, peer, tag)

    def __getattr__(self, name):          # everything else is the wrapped channel's
        return getattr(self.ch, name)
