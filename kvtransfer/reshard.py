"""KV resharding between tensor-parallel sizes: which prefill TP rank sends which KV heads to which decode TP rank.

A prefill worker of tp_p ranks and a decode worker of tp_d ranks each hold KV heads as
disagg/model/tensor_parallel.kv_heads says (split when Hkv >= tp, else replicated on tp/Hkv
ranks). Every decode rank must get each of its heads exactly once, straight from a prefill
rank that holds it (no leader gathers the whole KV). With replication, the readers of a head
take turns over its holders, so equal TP sizes give exactly one slice per rank i -> rank i:

    Hkv=2, tp_p=4, tp_d=1:   p0 p1 p2 p3 hold heads 0 0 1 1;  d0 needs 0,1  ->  p0 -[0]-> d0, p2 -[1]-> d0
    Hkv=2, tp_p=1, tp_d=4:   p0 holds 0,1;  d0..d3 need 0 0 1 1   ->  p0 -[0]-> d0, d1;  p0 -[1]-> d2, d3
    Hkv=8, tp_p=2, tp_d=4:   p0 holds 0-3, p1 4-7;  d_j needs 2j, 2j+1  ->  p0 -> d0, d1;  p1 -> d2, d3
    Hkv=2, tp_p=4, tp_d=4:   p_i -[i // 2]-> d_i                        (equal sizes: the diagonal)

A (prefill rank, decode rank) pair shares at most one contiguous run of heads, so on the wire
each pair carries one message per layer per plan, [2, T, heads, D], through its own two-rank
group (kvtransfer/channel.ChannelConfig.pairs). The codec (and its checksum) applies per slice.

Routes: what one rank does for one peer worker, as [(peer's global rank, head slice in MY cache)];
a slice of None means all of my heads (the untouched single-device path).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from disagg.model.tensor_parallel import kv_head_range

Route = tuple[int, "slice | None"]


@dataclass(frozen=True)
class Slice:
    src: int          # TP rank in the prefill worker
    dst: int          # TP rank in the decode worker
    heads: range      # global KV heads it carries


@lru_cache(maxsize=None)
def slice_plan(num_kv_heads: int, tp_src: int, tp_dst: int) -> tuple[Slice, ...]:
    """The slices that move one worker's KV to another's, ordered by (dst, first head)."""
    H = num_kv_heads
    src_of = [kv_head_range(H, tp_src, i) for i in range(tp_src)]
    dst_of = [kv_head_range(H, tp_dst, j) for j in range(tp_dst)]
    out: list[Slice] = []
    for j in range(tp_dst):
        for h in dst_of[j]:
            holders = [i for i in range(tp_src) if h in src_of[i]]
            readers = [k for k in range(tp_dst) if h in dst_of[k]]
            src = holders[readers.index(j) % len(holders)]
            last = out[-1] if out else None
            if last is not None and (last.src, last.dst) == (src, j) and last.heads.stop == h:
                out[-1] = Slice(src, j, range(last.heads.start, h + 1))
            else:
                out.append(Slice(src, j, range(h, h + 1)))
    assert len({(s.src, s.dst) for s in out}) == len(out), "a rank pair shares more than one run of heads"
    return tuple(out)


def _local(heads: range, mine: range) -> slice | None:
    """`heads` (global) as a slice of this rank's heads `mine`; None when it is all of them."""
    if heads == mine:
        return None
    return slice(heads.start - mine.start, heads.stop - mine.start)


class Reshard:
    """The routes of one rank of the KV channel, from its layout (kvtransfer.channel.ChannelConfig)."""

    def __init__(self, layout, num_kv_heads: int, rank: int):
        self.layout = layout
        self.h = num_kv_heads
        self.rank = rank
        self.worker, self.tp_rank = layout.worker_of(rank)

    def send_routes(self, dest_worker: int) -> list[Route]:
        """A prefill rank's slices for decode worker `dest_worker`: [(decode rank, my head slice)]."""
        lo = self.layout
        tp_p, tp_d = lo.tp_of(self.worker), lo.tp_of(dest_worker)
        mine = kv_head_range(self.h, tp_p, self.tp_rank)
        dst_ranks = lo.tp_ranks(dest_worker)
        return [(dst_ranks[s.dst], _local(s.heads, mine)) for s in slice_plan(self.h, tp_p, tp_d)
                if s.src == self.tp_rank]

    def recv_routes(self, src_worker: int) -> list[Route]:
        """A decode rank's slices from prefill worker `src_worker`: [(prefill rank, my head slice)]."""
        lo = self.layout
        tp_p, tp_d = lo.tp_of(src_worker), lo.tp_of(self.worker)
        mine = kv_head_range(self.h, tp_d, self.tp_rank)
        src_ranks = lo.tp_ranks(src_worker)
        return [(src_ranks[s.src], _local(s.heads, mine)) for s in slice_plan(self.h, tp_p, tp_d)
                if s.dst == self.tp_rank]

    def others_heads(self, dest_worker: int) -> list[int]:
        """Head counts of the slices the other TP ranks of my worker send to `dest_worker` (the leader
        counts the whole worker's traffic in its stats)."""
        lo = self.layout
        return [len(s.heads) for s in slice_plan(self.h, lo.tp_of(self.worker), lo.tp_of(dest_worker))
                if s.src != self.tp_rank]
