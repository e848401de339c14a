"""Prefix cache in the block manager: keys, sharing, LRU eviction, salts, integrity.

Exact expectations follow from the allocation order: free blocks FIFO from 0, then the
evictable ones oldest first; a freed table goes back tail first.
"""
from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from decode.block_manager import BlockManager, KVCacheBlocks
from decode.prefix_cache import block_hashes, hash_block, root_hash


def keys(tokens, bs=4, salt=None):
    return block_hashes(tokens, bs, salt)


def snapshot(bm: BlockManager):
    return (list(bm._free), list(bm._evictable), list(bm._ref), list(bm._key), dict(bm._cached),
            {k: list(v) for k, v in bm._tables.items()}, dict(bm._num_tokens))


# ---------------------------------------------------------------- keys
def test_keys_chain_over_the_whole_prefix_and_skip_the_partial_block():
    a = list(range(10))
    ka = keys(a)
    assert len(ka) == 2                                           # 10 tokens: 2 full blocks of 4
    assert ka[0] == hash_block(root_hash(), a[:4]) and ka[1] == hash_block(ka[0], a[4:8])
    b = [99] + a[1:]                                              # differs in block 0 only
    kb = keys(b)
    assert kb[0] != ka[0] and kb[1] != ka[1]                      # ...but block 1's key differs too
    assert keys(a + [5, 6]) == keys(a) + [hash_block(ka[1], [8, 9, 5, 6])]
    assert block_hashes(a, 4, known=ka[:1]) == ka                 # extended, not recomputed
    assert block_hashes(a, 4, limit=1) == ka[:1]
    assert all(len(k) == 32 for k in ka)                          # sha256


def test_salts_change_every_key():
    t = list(range(12))
    plain, s1, s2 = keys(t), keys(t, salt="tenant-1"), keys(t, salt="tenant-2")
    assert keys(t, salt="") == plain
    assert not set(plain) & set(s1) and not set(s1) & set(s2) and not set(plain) & set(s2)
    assert keys(t, salt="tenant-1") == s1


# ---------------------------------------------------------------- sharing
def _computed(bm: BlockManager, rid: str, tokens, salt=None) -> list[int]:
    """Admit `rid` with whatever is cached, 'compute' the rest, key its full blocks."""
    k = keys(tokens, bm.block_size, salt)
    hit = bm.lookup(k)
    assert bm.allocate_slots(rid, len(tokens), hit) is not None
    bm.cache_blocks(rid, k)
    return hit


def test_a_finished_request_leaves_its_full_blocks_for_the_next():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    p = list(range(10))
    assert _computed(bm, "a", p) == []
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.num_cached_blocks == 2                             # the partial block 2 is not keyed
    assert bm.free("a") == 3
    assert list(bm._free) == [3, 4, 5, 6, 7, 2] and list(bm._evictable) == [1, 0]
    assert bm.num_free_blocks == 8 and bm.usage == 0.0          # evictable counts as free
    # same prefix, new suffix: blocks 0 and 1 are reused, one new block from the free list
    assert bm.lookup(keys(p[:8] + [50, 51, 52])) == [0, 1]
    assert bm.allocate_slots("b", 11, [0, 1]) == KVCacheBlocks((3,))
    assert bm.block_table("b") == [0, 1, 3] and bm.num_free_blocks == 5
    bm.check_integrity()


def test_live_blocks_are_shared_with_ref_counts():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    _computed(bm, "a", list(range(9)))                           # [0, 1, 2]
    assert _computed(bm, "b", list(range(8)) + [70]) == [0, 1]   # [0, 1, 3]
    assert bm._ref[:4] == [2, 2, 1, 1]
    assert bm.free("a") == 1                                     # only block 2 reached ref 0
    assert bm._ref[:2] == [1, 1] and not bm._evictable           # 2 was never keyed: free
    bm.check_integrity()
    assert bm.free("b") == 3
    bm.check_integrity()


def test_ask_before_commit_counts_revived_blocks():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    _computed(bm, "a", list(range(8)))
    bm.free("a")                                                 # blocks 0, 1 evictable, 2, 3 free
    assert bm.num_free_blocks == 4
    before = snapshot(bm)
    # reuse 0 and 1 (they leave the pool) and need 3 more: 5 > 4
    assert bm.allocate_slots("b", 20, [0, 1]) is None
    assert snapshot(bm) == before
    assert bm.allocate_slots("b", 16, [0, 1]) == KVCacheBlocks((2, 3))
    assert bm.num_free_blocks == 0
    bm.check_integrity()


def test_cached_blocks_only_start_a_new_table():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    _computed(bm, "a", list(range(8)))
    bm.allocate_slots("b", 3)
    with pytest.raises(ValueError):
        bm.allocate_slots("b", 12, [0])


def test_same_prefix_computed_twice_at_once_keeps_the_first_copy():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    p = list(range(8))
    bm.allocate_slots("a", 8)
    bm.allocate_slots("b", 8)                                   # both miss: neither is keyed yet
    assert bm.cache_blocks("a", keys(p)) == 2
    assert bm.cache_blocks("b", keys(p)) == 0                   # a's copy stays the cached one
    assert bm.lookup(keys(p)) == [0, 1]
    bm.free("b")
    assert list(bm._free)[-2:] == [3, 2] and not bm._evictable  # b's duplicates: plain free
    bm.check_integrity()


def test_caching_off_keys_nothing():
    bm = BlockManager(8, 4)
    bm.allocate_slots("a", 8)
    assert bm.cache_blocks("a", keys(list(range(8)))) == 0
    bm.free("a")
    assert bm.lookup(keys(list(range(8)))) == [] and bm.num_cached_blocks == 0
    bm.check_integrity()


# ---------------------------------------------------------------- eviction
def test_eviction_is_lru_and_only_after_the_free_list():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    _computed(bm, "a", [1, 1, 1, 1])          # [0, 1]
    _computed(bm, "b", [2, 2])                # [2]
    bm.free("a")                              # evictable: 1, 0 (tail first)
    bm.free("b")                              # evictable: 1, 0, 2
    assert list(bm._evictable) == [1, 0, 2] and list(bm._free) == [3]
    assert bm.allocate_slots("c", 2) == KVCacheBlocks((3,))        # the free block first
    assert bm.allocate_slots("d", 2) == KVCacheBlocks((1,))        # then the oldest evictable
    assert bm.num_evictions == 1
    assert bm.lookup(keys([1, 1, 1, 1], 2)) == [0]                 # a's tail is gone, its head survives
    # reusing a cached block touches it: it leaves the LRU and comes back as the newest
    bm.allocate_slots("e", 2, [0])
    bm.free("e")
    assert list(bm._evictable) == [2, 0]
    bm.check_integrity()


def test_eviction_under_pressure_never_takes_a_block_in_use():
    bm = BlockManager(6, 2, enable_prefix_caching=True)
    shared = [5, 5, 6, 6]
    _computed(bm, "a", shared + [7])          # [0, 1, 2]
    _computed(bm, "b", shared + [8])          # [0, 1, 3]
    bm.free("a")                              # 0, 1 still held by b; 2 (partial) free
    in_use = set(bm.block_table("b"))
    # fill the cache with one-block prompts, each freed at once (evictable), far more than fit
    for i in range(20):
        got = bm.allocate_slots(f"x{i}", 2)
        assert got is not None and not in_use & set(got.block_ids)
        bm.cache_blocks(f"x{i}", keys([100 + i] * 2, 2))
        bm.free(f"x{i}")
        bm.check_integrity()
    assert bm.block_table("b") == [0, 1, 3] and bm._ref[0] == bm._ref[1] == 1
    assert bm.lookup(keys(shared, 2)) == [0, 1]                    # in use, never evicted
    # nothing fits beyond what is not held by b: asking for more fails without evicting b's blocks
    assert bm.allocate_slots("big", 8) is None
    assert bm.allocate_slots("big", 6) is not None
    assert bm.num_free_blocks == 0
    bm.check_integrity()


def test_reset_prefix_cache():
    bm = BlockManager(6, 2, enable_prefix_caching=True)
    _computed(bm, "a", [1, 1, 2, 2])
    _computed(bm, "b", [3, 3])
    bm.free("b")
    assert bm.reset_prefix_cache() == 3
    assert bm.num_cached_blocks == 0 and not bm._evictable and bm.num_free_blocks == 4
    bm.check_integrity()
    bm.free("a")
    assert bm.num_free_blocks == 6
    bm.check_integrity()


# ---------------------------------------------------------------- integrity detects cache damage
def _damaged() -> BlockManager:
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    _computed(bm, "a", [1, 1, 2, 2, 3])
    _computed(bm, "b", [1, 1, 2, 2, 4])
    bm.free("a")
    _computed(bm, "c", [9, 9])
    bm.free("c")
    bm.check_integrity()
    return bm


def test_integrity_detects_evictable_block_in_use():
    bm = _damaged()
    bm._evictable[0] = None                   # block 0 is held by b
    with pytest.raises(AssertionError, match="block 0"):
        bm.check_integrity()


def test_integrity_detects_a_stale_key_map():
    bm = _damaged()
    k = bm._key[0]
    bm._cached[k] = 5
    with pytest.raises(AssertionError, match="key"):
        bm.check_integrity()


def test_integrity_detects_an_unkeyed_evictable_block():
    bm = _damaged()
    b = next(iter(bm._evictable))
    del bm._cached[bm._key[b]]
    bm._key[b] = None
    with pytest.raises(AssertionError, match=f"block {b}: evictable without a key"):
        bm.check_integrity()


def test_integrity_detects_a_shared_block_without_a_key():
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    bm.allocate_slots("a", 2)
    bm._tables["b"] = [0]
    bm._num_tokens["b"] = 2
    bm._ref[0] = 2
    with pytest.raises(AssertionError, match="without a key"):
        bm.check_integrity()


# ---------------------------------------------------------------- property test
BASES = [list(range(3, 60)), list(range(3, 15)) + list(range(200, 245)), list(range(3, 9)) + [7] * 51]

ops = st.lists(st.one_of(
    st.tuples(st.sampled_from(["admit", "serve", "serve"]), st.integers(0, 2), st.integers(1, 30),
              st.sampled_from([None, None, None, "s1", "s2"])),
    st.tuples(st.just("serve"), st.integers(0, 2), st.integers(1, 30), st.just(None)),
    st.tuples(st.just("compute"), st.integers(0, 9), st.integers(1, 40)),
    st.tuples(st.just("grow"), st.integers(0, 9), st.integers(1, 6)),
    st.tuples(st.just("free"), st.integers(0, 9)),
), min_size=8, max_size=70)


@settings(max_examples=250, deadline=None)
@given(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4, 4]), ops=ops)
def test_random_interleavings_never_corrupt_a_live_block(num_blocks, block_size, ops):
    """Requests over shared prefixes, with salts, are admitted (reusing the cache), computed, grown,
    aborted, preempted when memory runs out, and evicted under pressure. A shadow copy of each
    block's contents (salt, position, token) is written only when a request computes it: every
    live request must read back exactly its own tokens, so no block in use was ever evicted and
    re-allocated, no salt ever read another's block, and no shared block was ever written."""
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    content: dict[int, dict[int, tuple]] = {}              # block -> slot -> (salt, position, token)
    live: dict[str, dict] = {}                             # rid -> tokens, salt, computed
    serial = 0

    def compute(rid: str, n: int) -> None:
        r = live[rid]
        end = min(len(r["toks"]), r["computed"] + n)
        table = bm.block_table(rid)
        for p in range(r["computed"], end):
            b = table[p // block_size]
            assert bm._ref[b] == 1, "a shared block is never written"
            content.setdefault(b, {})[p % block_size] = (r["salt"], p, r["toks"][p])
        r["computed"] = end
        bm.cache_blocks(rid, block_hashes(r["toks"], block_size, r["salt"], limit=end // block_size))

    for op in ops:
        if op[0] in ("admit", "serve"):          # serve: admit, then compute the whole prompt at once
            kind, base, n, salt = op
            toks = BASES[base][:n]
            rid = f"r{serial}"
            serial += 1
            cap = (len(toks) - 1) // block_size                  # never the whole prompt
            k = block_hashes(toks, block_size, salt, limit=cap)
            hit = bm.lookup(k)
            before = snapshot(bm)
            if bm.allocate_slots(rid, len(toks), hit) is None:
                assert snapshot(bm) == before
                continue
            live[rid] = dict(toks=toks, salt=salt, computed=len(hit) * block_size)
            if hit:
                event("prefix hit")
            if kind == "serve":
                compute(rid, len(toks))
        elif live:
            rid = sorted(live)[op[1] % len(live)]
            r = live[rid]
            if op[0] == "compute":
                compute(rid, op[2])
            elif op[0] == "grow":
                if r["computed"] < len(r["toks"]):
                    continue
                toks = r["toks"] + [300 + op[2]] * op[2]
                if bm.allocate_slots(rid, len(toks)) is None:
                    bm.free(rid)                                  # preempted
                    del live[rid]
                else:
                    r["toks"] = toks
            else:
                bm.free(rid)                                      # finished or aborted
                del live[rid]
        if any(c > 1 for c in bm._ref):
            event("a block shared by live requests")
        bm.check_integrity()
        for rid, r in live.items():
            table = bm.block_table(rid)
            assert len(table) == bm.blocks_for(len(r["toks"]))
            for p in range(r["computed"]):
                got = content.get(table[p // block_size], {}).get(p % block_size)
                assert got == (r["salt"], p, r["toks"][p]), f"{rid} position {p}"
        held = {b for t in bm._tables.values() for b in t}
        assert len(held) + bm.num_free_blocks == num_blocks
    if bm.num_evictions:
        event("evictions")
    for rid in list(live):
        bm.free(rid)
    bm.check_integrity()
    assert bm.num_free_blocks == num_blocks


# ---------------------------------------------------------------- the request field
def test_cache_salt_request_field():
    from router.openai_api import APIError, parse_common
    assert parse_common({"cache_salt": "tenant-1"}, chat=True).params.cache_salt == "tenant-1"
    assert parse_common({}, chat=False).params.cache_salt is None
    for bad in ("", 5, ["a"], "x" * 257):
        with pytest.raises(APIError) as e:
            parse_common({"cache_salt": bad}, chat=True)
        assert e.value.status == 400 and e.value.param == "cache_salt"
