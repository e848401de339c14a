"""Decode role: paged KV bookkeeping, continuous-batching scheduler, sampler."""
