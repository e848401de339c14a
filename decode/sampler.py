"""Sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Random rows use the exponential-race trick (argmax of p / Exp(1) noise is a sample
from p) so no multinomial host sync is needed. A seeded request draws its noise from
a generator seeded by (seed, output index): its tokens depend on neither the batch it
shares nor preemptions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from disagg.request import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]   # per row, when asked


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits: [N, V] float32 (already temperature-scaled); top_k: [N] int (0 = off); top_p: [N]."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).clamp(max=V)
    ranks = torch.arange(V, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays); top_p == 1
    # is off: a float32 cumsum reaches 1.0 before the tail ends and would cut it
    drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]) -> SampleResult:
    """logits: [N, V] float32, one row per request; output_index[i]: how many tokens row i has produced."""
    N = logits.shape[0]
    dev = logits.device
    out = logits.argmax(dim=-1)
    if not all(p.greedy for p in params):       # decided on the host: no device sync
        greedy = torch.tensor([p.greedy for p in params], device=dev)
        temp = torch.tensor([max(p.temperature, 1e-5) for p in params], device=dev)
        top_k = torch.tensor([p.top_k for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)
        scaled = logits / temp[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            scaled = _apply_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, p in enumerate(params):
            if p.seed is not None and not p.greedy:
                g = torch.Generator(device=dev).manual_seed((p.seed * 1_000_003 + output_index[i]) % (2**63))
                noise[i] = torch.empty(probs.shape[1], device=dev).exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        out = torch.where(greedy, out, sampled)
    token_ids = out.tolist()
    lps: list = [None] * N
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        lp = logits[want].log_softmax(dim=-1)
        kmax = max(params[i].logprobs for i in want)
        top_v, top_i = lp.topk(min(max(kmax, 1), lp.shape[-1]), dim=-1)   # a tiny vocab caps top-n
        chosen = lp.gather(1, out[want][:, None]).squeeze(1).tolist()
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(want):
            k = params[i].logprobs
            lps[i] = (chosen[j], list(zip(top_i[j][:k], top_v[j][:k])))
    return SampleResult(token_ids, lps)
