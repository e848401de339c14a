"""Ring attention: the zigzag split's arithmetic, the LSE merge, and real multi-process rings (gloo)
against plain causal attention at awkward lengths (not divisible by 2*cp, chunks of 1 token, empty chunks)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_util import run_ranks
from prefill.ring_attention import (attention_lse, attention_lse_reference, causal_attention_reference,
                                    ring_attention, slice_len, zigzag_bounds, zigzag_positions, zigzag_slice,
                                    zigzag_unslice)

# 2*cp + 1, exactly 2*cp (every chunk one token), < 2*cp (empty chunks), 1, primes, a multiple of 2*cp
LENGTHS = (1, 3, 4, 5, 8, 9, 13, 31, 48)
SCALE = 0.25


def test_zigzag_bounds_exact():
    assert zigzag_bounds(10, 2) == [0, 2, 4, 7, 10]
    assert zigzag_bounds(8, 2) == [0, 2, 4, 6, 8]
    assert zigzag_bounds(3, 2) == [0, 0, 1, 2, 3]       # first chunk empty: extras go to the last chunks
    assert zigzag_bounds(1, 4) == [0] * 8 + [1]
    assert zigzag_positions(10, 2, 0).tolist() == [0, 1, 7, 8, 9]
    assert zigzag_positions(10, 2, 1).tolist() == [2, 3, 4, 5, 6]
    assert zigzag_positions(8, 4, 3).tolist() == [3, 4]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_covers_prompt_and_keeps_last_token_on_rank0(cp):
    for S in LENGTHS + (100, 101):
        pos = [zigzag_positions(S, cp, r) for r in range(cp)]
        assert sorted(torch.cat(pos).tolist()) == list(range(S))
        assert [len(p) for p in pos] == [slice_len(S, cp, r) for r in range(cp)]
        assert pos[0][-1].item() == S - 1                # the leader samples the first token
        assert max(map(len, pos)) - min(map(len, pos)) <= 2
        x = torch.randn(S, 3)
        assert torch.equal(zigzag_unslice([zigzag_slice(x, cp, r) for r in range(cp)]), x)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_lse_matches_reference(causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 4, 8, generator=g)
    k = torch.randn(7 if causal else 11, 2, 8, generator=g)
    v = torch.randn_like(k)
    o1, l1 = attention_lse(q, k, v, causal, SCALE)
    o2, l2 = attention_lse_reference(q, k, v, causal, SCALE)
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)


def _qkv(S: int, hq: int, hkv: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, hq, 8, generator=g), torch.randn(S, hkv, 8, generator=g),
            torch.randn(S, hkv, 8, generator=g))


@pytest.mark.parametrize("attn", [attention_lse, attention_lse_reference])
def test_one_rank_ring_equals_causal(attn):
    for S in LENGTHS:
        q, k, v = _qkv(S, 4, 2, S)
        ref = causal_attention_reference(q, k, v, SCALE)
        out = ring_attention(zigzag_slice(q, 1, 0), zigzag_slice(k, 1, 0), zigzag_slice(v, 1, 0), S, SCALE,
                             attn=attn)
        torch.testing.assert_close(zigzag_unslice([out]), ref, atol=1e-5, rtol=1e-5)


def _ring_body(rank: int, world: int, cases: list) -> None:
    """Every rank: for each (query heads, KV heads, length), its slice of the ring result equals its
    slice of single-device causal attention, and on_kv showed it every rank's K/V once, bit-exact."""
    for hq, hkv, S in cases:
        q, k, v = _qkv(S, hq, hkv, seed=S * 7 + hkv)     # same tensors on every rank
        ref = causal_attention_reference(q, k, v, SCALE)
        seen = {}

        def keep(src, kv, seen=seen):
            seen[src] = kv.clone()
        out = ring_attention(zigzag_slice(q, world, rank), zigzag_slice(k, world, rank),
                             zigzag_slice(v, world, rank), S, SCALE, group=dist.group.WORLD, on_kv=keep)
        torch.testing.assert_close(out, zigzag_slice(ref, world, rank), atol=2e-5, rtol=1e-5,
                                   msg=lambda m: f"rank {rank}/{world}, S={S}, heads {hq}/{hkv}: {m}")
        assert sorted(seen) == list(range(world))
        kv_full = zigzag_unslice([seen[r].transpose(0, 1) for r in range(world)]).transpose(0, 1)
        assert torch.equal(kv_full, torch.stack((k, v)))


@pytest.mark.parametrize("world", [2, 4])
def test_ring_across_processes_equals_causal(world):
    # GQA (4 query heads over 2 KV heads) at every awkward length; MQA (1 KV head) and plain
    # multi-head at one. With 2*cp = 8 chunks, S = 1, 5 leave chunks empty and S = 8 gives 1-token chunks.
    cases = [(4, 2, S) for S in LENGTHS] + [(4, 1, 13), (2, 2, 9)]
    run_ranks(_ring_body, world, cases)
