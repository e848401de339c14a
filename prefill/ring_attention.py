"""Ring attention (context parallelism) over a torch.distributed group, with a zigzag causal split.

A prompt of S tokens is cut into 2*cp chunks; rank i holds chunks i and 2cp-1-i, so every
rank owns one early and one late piece of the causal triangle and all do equal work:

    S = 10, cp = 2  ->  4 chunks; sizes differ by at most one, the extra tokens go to the
                        last chunks (so the prompt's last token is always on rank 0)

        token:  0 1 | 2 3 | 4 5 6 | 7 8 9          bounds = [0, 2, 4, 7, 10]
        chunk:   c0 |  c1 |   c2  |   c3
        rank:    r0 |  r1 |   r1  |   r0          rank 0: rows [c0; c3] = tokens 0 1 7 8 9
                                                  rank 1: rows [c1; c2] = tokens 2 3 4 5 6

Ring step s (s = 0 .. cp-1): rank i holds the K/V slice of rank src = (i - s) mod cp. It
posts the send of that slice to rank i+1 and the receive of the next one from rank i-1
(one batched send/recv, kvtransfer.groups.exchange, so NCCL never deadlocks on a two-rank ring), computes its
queries against the slice it holds while the transfer runs, then waits and swaps:

    step 0:  r0: q[r0] x kv[r0]    r1: q[r1] x kv[r1]     kv[r0] -> r1, kv[r1] -> r0 in flight
    step 1:  r0: q[r0] x kv[r1]    r1: q[r1] x kv[r0]

Which (query chunk, key chunk) pairs are computed: key chunk < query chunk: full block;
equal: causal block (same chunk: query t sees keys <= t); greater: skipped. A slice's two
chunks are stored in chunk order, so the key chunks fully visible to a query chunk are
always a prefix of the held slice (no copy). With zigzag every step costs every rank
about the same: src < i: both query chunks x the src's first chunk; src > i: the second
query chunk x both of the src's chunks.

Partial results merge with the log-sum-exp rule (float32 accumulators):

    lse = logaddexp(lse_a, lse_b);   out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

GQA: only the Hkv key/value heads circulate; they are expanded to the Hq query heads
locally, right before each attention call.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kvtransfer.groups import exchange


# ---------------------------------------------------------------------- zigzag split
def zigzag_bounds(seq_len: int, cp: int) -> list[int]:
    """[2cp+1] chunk boundaries: chunk j is tokens bounds[j]:bounds[j+1]. The S % 2cp extra
    tokens go one each to the last chunks; with S < 2cp the first chunks are empty."""
    n = 2 * cp
    base, rem = divmod(seq_len, n)
    return [j * base + max(0, j - (n - rem)) for j in range(n + 1)]


def rank_chunks(cp: int, rank: int) -> tuple[int, int]:
    return rank, 2 * cp - 1 - rank


def slice_len(seq_len: int, cp: int, rank: int) -> int:
    b = zigzag_bounds(seq_len, cp)
    a, c = rank_chunks(cp, rank)
    return (b[a + 1] - b[a]) + (b[c + 1] - b[c])


def zigzag_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """[slice_len] int64: the prompt positions of `rank`'s rows (its first chunk, then its second)."""
    b = zigzag_bounds(seq_len, cp)
    a, c = rank_chunks(cp, rank)
    return torch.cat([torch.arange(b[a], b[a + 1]), torch.arange(b[c], b[c + 1])]).to(device)


def zigzag_slice(x: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Rows of `rank` from a full [S, ...] tensor."""
    return x[zigzag_positions(x.shape[0], cp, rank, x.device)]


def zigzag_unslice(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of zigzag_slice: the cp ranks' slices -> the full [S, ...] tensor in token order."""
    cp = len(parts)
    S = sum(p.shape[0] for p in parts)
    out = parts[0].new_empty((S, *parts[0].shape[1:]))
    for r, p in enumerate(parts):
        out[zigzag_positions(S, cp, r, p.device)] = p
    return out


# ---------------------------------------------------------------------- attention with LSE
def _expand(kv: torch.Tensor, groups: int) -> torch.Tensor:
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def attention_lse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [Lq, Hq, D], k/v: [Lk, Hkv, D] -> (out [Lq, Hq, D] in q.dtype, lse [Hq, Lq] float32).
    causal: query t sees keys <= t (needs Lq == Lk). Math in float32; quadratic memory."""
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q.float(), _expand(k, g).float()) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("hqk,khd->qhd", torch.exp(s - lse[..., None]), _expand(v, g).float())
    return out.to(q.dtype), lse


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as attention_lse_reference, on a fused kernel that returns the log-sum-exp:
    flash attention on CUDA, the flash CPU kernel elsewhere (both linear in memory)."""
    g = q.shape[1] // k.shape[1]
    q4 = q.transpose(0, 1)[None]                          # [1, Hq, Lq, D]
    k4 = _expand(k, g).transpose(0, 1)[None]
    v4 = _expand(v, g).transpose(0, 1)[None]
    Lq = q.shape[0]
    if q.device.type == "cuda":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, causal, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q4, k4, v4, 0.0, causal, scale=scale)
    out, lse = res[0], res[1]
    return out[0].transpose(0, 1), lse[0, :, :Lq].float()


class _Accumulator:
    """Running (out, lse) of the local rows, float32; a row range's first block is copied, not merged."""

    def __init__(self, L: int, Hq: int, D: int, device):
        self.out = torch.zeros(L, Hq, D, dtype=torch.float32, device=device)
        self.lse = torch.full((Hq, L), float("-inf"), dtype=torch.float32, device=device)
        self.seen: set[tuple[int, int]] = set()

    def add(self, r0: int, r1: int, o: torch.Tensor, lse: torch.Tensor) -> None:
        """o: [r1-r0, Hq, D], lse: [Hq, r1-r0] for rows r0:r1."""
        if (r0, r1) not in self.seen:
            self.seen.add((r0, r1))
            self.out[r0:r1] = o
            self.lse[:, r0:r1] = lse
            return
        acc, old = self.out[r0:r1], self.lse[:, r0:r1]
        new = torch.logaddexp(old, lse)
        acc.mul_(torch.exp(old - new).T[..., None]).add_(o.float() * torch.exp(lse - new).T[..., None])
        self.lse[:, r0:r1] = new


def _step(acc: _Accumulator, q: torch.Tensor, kv: torch.Tensor, bounds: list[int], cp: int, rank: int,
          src: int, scale: float, attn) -> None:
    """Attention of the local queries against the slice of `src` (kv: [2, Lsrc, Hkv, D])."""
    qa, qb = rank_chunks(cp, rank)
    ka, kb = rank_chunks(cp, src)
    q_rows = {qa: (0, bounds[qa + 1] - bounds[qa])}
    q_rows[qb] = (q_rows[qa][1], q_rows[qa][1] + bounds[qb + 1] - bounds[qb])
    k_rows = {ka: (0, bounds[ka + 1] - bounds[ka])}
    k_rows[kb] = (k_rows[ka][1], k_rows[ka][1] + bounds[kb + 1] - bounds[kb])
    for qc in (qa, qb):
        r0, r1 = q_rows[qc]
        if r0 == r1:
            continue
        full_end = max((k_rows[kc][1] for kc in (ka, kb) if kc < qc), default=0)   # keys 0:full_end
        if full_end:
            o, lse = attn(q[r0:r1], kv[0, :full_end], kv[1, :full_end], False, scale)
            acc.add(r0, r1, o, lse)
        if qc in k_rows:                                  # src == rank: the causal diagonal block
            k0, k1 = k_rows[qc]
            o, lse = attn(q[r0:r1], kv[0, k0:k1], kv[1, k0:k1], True, scale)
            acc.add(r0, r1, o, lse)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int, scale: float,
                   group: dist.ProcessGroup | None = None,
                   on_kv: Callable[[int, torch.Tensor], None] | None = None,
                   attn=attention_lse) -> torch.Tensor:
    """Causal attention of a zigzag-split prompt of `seq_len` tokens across the ranks of `group`.

    q: [L, Hq, D], k/v: [L, Hkv, D]: this rank's rows (zigzag_slice order, rotary applied).
    Returns [L, Hq, D] in q.dtype. on_kv(src_rank, kv [2, Lsrc, Hkv, D]) sees every rank's
    K/V slice as it passes through (its own first): the prefill leader keeps them all.
    group None: a one-rank "ring" (plain zigzag-ordered causal attention, no communication).
    """
    cp = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    bounds = zigzag_bounds(seq_len, cp)
    L, Hq, D = q.shape
    Hkv = k.shape[1]
    if L != slice_len(seq_len, cp, rank):
        raise ValueError(f"rank {rank} holds {L} rows; the zigzag split of {seq_len} over {cp} gives it "
                         f"{slice_len(seq_len, cp, rank)}")
    acc = _Accumulator(L, Hq, D, q.device)
    kv = torch.stack((k, v)).contiguous()                 # [2, L, Hkv, D]: one message per step
    nxt_rank = (rank + 1) % cp                            # group ranks: the group need not be registered
    prv_rank = (rank - 1) % cp
    for s in range(cp):
        src = (rank - s) % cp
        works = []
        if s < cp - 1:
            incoming = (src - 1) % cp                     # whose slice arrives for the next step
            buf = torch.empty(2, slice_len(seq_len, cp, incoming), Hkv, D, dtype=kv.dtype, device=kv.device)
            works = exchange(group, kv, nxt_rank, buf, prv_rank)
        _step(acc, q, kv, bounds, cp, rank, src, scale, attn)     # overlaps the transfer above
        if on_kv is not None:
            on_kv(src, kv)
        for w in works:
            w.wait()
        if works:
            kv = buf
    return acc.out.to(q.dtype)


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Single-device causal attention over a whole prompt: q [S, Hq, D], k/v [S, Hkv, D] -> [S, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], _expand(k, g).transpose(0, 1)[None],
                                       _expand(v, g).transpose(0, 1)[None], is_causal=True, scale=scale)
    return o[0].transpose(0, 1)
