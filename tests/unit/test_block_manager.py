"""BlockManager: exact block ids and counts, ask-before-commit, idempotent free, integrity.

A fresh manager hands out ids in order 0, 1, 2, ... (FIFO free list); a freed table goes
to the back of the free list tail-first. Every expectation below follows from that.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decode.block_manager import BlockManager, KVCacheBlocks


def held(bm: BlockManager) -> int:
    return sum(len(bm.block_table(r)) for r in list(bm._tables))


# ---------------------------------------------------------------- allocation
def test_constructor_rejects_non_positive_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_blocks_for_is_ceil_division():
    bm = BlockManager(8, 4)
    assert [bm.blocks_for(n) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_growth_across_block_boundaries_gets_exact_ids():
    bm = BlockManager(num_blocks=8, block_size=4)
    # tokens: 1..4 fit in one block, the 5th opens a second, the 9th a third.
    assert bm.allocate_slots("a", 1) == KVCacheBlocks((0,))
    for n in (2, 3, 4):
        assert bm.allocate_slots("a", n) == KVCacheBlocks(())
    assert bm.block_table("a") == [0]
    assert bm.allocate_slots("a", 5) == KVCacheBlocks((1,))
    assert bm.allocate_slots("a", 8) == KVCacheBlocks(())
    assert bm.allocate_slots("a", 9) == KVCacheBlocks((2,))
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.num_tokens("a") == 9
    # another request interleaves: it gets the next ids, not a's
    assert bm.allocate_slots("b", 6) == KVCacheBlocks((3, 4))
    # a jump of several blocks at once (a prefill chunk)
    assert bm.allocate_slots("a", 20) == KVCacheBlocks((5, 6))
    assert bm.block_table("a") == [0, 1, 2, 5, 6]
    assert bm.block_table("b") == [3, 4]
    assert bm.num_free_blocks == 1
    bm.check_integrity()


def test_shrinking_request_is_a_no_op():
    bm = BlockManager(8, 4)
    bm.allocate_slots("a", 9)
    assert bm.allocate_slots("a", 2) == KVCacheBlocks(())
    assert bm.num_tokens("a") == 9          # never decreases
    assert bm.block_table("a") == [0, 1, 2]
    bm.check_integrity()


def test_num_new_blocks():
    bm = BlockManager(8, 4)
    assert bm.num_new_blocks("a", 9) == 3
    bm.allocate_slots("a", 5)
    assert bm.num_new_blocks("a", 5) == 0
    assert bm.num_new_blocks("a", 8) == 0
    assert bm.num_new_blocks("a", 9) == 1
    assert bm.num_new_blocks("a", 1) == 0


def test_allocate_returns_none_and_changes_nothing_when_full():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate_slots("a", 10)               # 3 blocks: 0, 1, 2
    before = (list(bm._free), list(bm._ref), {k: list(v) for k, v in bm._tables.items()},
              dict(bm._num_tokens))
    assert bm.allocate_slots("b", 5) is None          # needs 2, 1 free
    assert bm.allocate_slots("a", 17) is None         # needs 2 more, 1 free
    after = (list(bm._free), list(bm._ref), {k: list(v) for k, v in bm._tables.items()},
             dict(bm._num_tokens))
    assert after == before
    assert not bm.has("b")
    assert bm.num_tokens("a") == 10
    # exactly the last block still fits
    assert bm.allocate_slots("b", 4) == KVCacheBlocks((3,))
    assert bm.num_free_blocks == 0
    assert bm.allocate_slots("b", 5) is None
    bm.check_integrity()


@pytest.mark.parametrize("num_tokens", range(0, 30))
@pytest.mark.parametrize("reserve", [0, 1, 2])
def test_can_allocate_agrees_with_allocate(num_tokens, reserve):
    bm = BlockManager(num_blocks=6, block_size=4)
    bm.allocate_slots("other", 5)            # 2 held, 4 free
    bm.allocate_slots("a", 3)                # 1 held, 3 free
    can = bm.can_allocate("a", num_tokens, reserve)
    assert can == (max(0, bm.blocks_for(num_tokens) - 1) + reserve <= 3)
    if reserve == 0:
        assert can == (bm.allocate_slots("a", num_tokens) is not None)


# ---------------------------------------------------------------- free
def test_free_returns_count_and_is_idempotent():
    bm = BlockManager(8, 4)
    bm.allocate_slots("a", 9)
    assert bm.free("a") == 3
    assert bm.free("a") == 0
    assert bm.free("never-seen") == 0
    assert not bm.has("a")
    assert bm.block_table("a") == []
    assert bm.num_tokens("a") == 0
    assert bm.num_free_blocks == 8
    bm.check_integrity()


def test_free_of_an_empty_table_returns_zero_and_forgets_it():
    bm = BlockManager(4, 4)
    assert bm.allocate_slots("a", 0) == KVCacheBlocks(())
    assert bm.has("a")
    assert bm.free("a") == 0
    assert not bm.has("a")
    bm.check_integrity()


def test_free_order_and_reuse():
    bm = BlockManager(num_blocks=6, block_size=4)
    bm.allocate_slots("a", 12)               # [0, 1, 2]
    bm.allocate_slots("b", 4)                # [3]
    assert bm.free("a") == 3
    # never-used blocks first (4, 5), then a's blocks tail first (2, 1, 0)
    assert list(bm._free) == [4, 5, 2, 1, 0]
    assert bm.allocate_slots("c", 16) == KVCacheBlocks((4, 5, 2, 1))
    assert bm.allocate_slots("d", 1) == KVCacheBlocks((0,))
    assert bm.num_free_blocks == 0
    assert bm.free("b") == 1
    assert bm.allocate_slots("e", 3) == KVCacheBlocks((3,))
    bm.check_integrity()


def test_usage():
    bm = BlockManager(num_blocks=8, block_size=2)
    assert bm.usage == 0.0
    bm.allocate_slots("a", 3)                # 2 blocks
    assert bm.usage == pytest.approx(0.25)
    bm.allocate_slots("b", 12)               # 6 blocks
    assert bm.usage == 1.0
    bm.free("a")
    assert bm.usage == pytest.approx(0.75)
    bm.free("b")
    assert bm.usage == 0.0


# ---------------------------------------------------------------- integrity
def _populated() -> BlockManager:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate_slots("a", 9)     # [0, 1, 2]
    bm.allocate_slots("b", 4)     # [3]
    bm.free("b")
    bm.allocate_slots("c", 5)     # [4, 5]
    bm.check_integrity()
    return bm


def test_integrity_detects_block_on_free_list_twice():
    bm = _populated()
    bm._free.append(bm._free[0])
    with pytest.raises(AssertionError, match="free list twice"):
        bm.check_integrity()


def test_integrity_detects_held_block_also_free():
    bm = _populated()
    bm._free.append(0)            # block 0 belongs to "a"
    with pytest.raises(AssertionError, match="block 0"):
        bm.check_integrity()


def test_integrity_detects_ref_count_off():
    bm = _populated()
    bm._ref[1] += 1
    with pytest.raises(AssertionError, match="ref count"):
        bm.check_integrity()
    bm._ref[1] -= 2
    with pytest.raises(AssertionError, match="ref count"):
        bm.check_integrity()


def test_integrity_detects_leaked_block():
    bm = _populated()
    leaked = bm._free.popleft()   # neither free nor held
    assert leaked not in bm.block_table("a") + bm.block_table("c")
    with pytest.raises(AssertionError, match=f"block {leaked}"):
        bm.check_integrity()


def test_integrity_detects_table_size_mismatch():
    bm = _populated()
    bm._num_tokens["a"] = 13      # would need 4 blocks, holds 3
    with pytest.raises(AssertionError, match="needs 4"):
        bm.check_integrity()


def test_integrity_detects_block_in_two_tables():
    bm = _populated()
    bm._tables["c"].append(0)     # shared without a ref count
    bm._num_tokens["c"] = 9
    with pytest.raises(AssertionError, match="block 0"):
        bm.check_integrity()


# ---------------------------------------------------------------- property test
ops = st.lists(
    st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 7), st.integers(0, 40)),
    min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4, 8]), ops=ops)
def test_random_interleavings_keep_integrity_and_conservation(num_blocks, block_size, ops):
    bm = BlockManager(num_blocks, block_size)
    model: dict[str, int] = {}                      # request id -> tokens held (reference model)
    for op, r, n in ops:
        rid = f"r{r}"
        if op == "grow":
            cur = model.get(rid, 0)
            target = cur + n
            need = max(0, bm.blocks_for(target) - bm.blocks_for(cur))
            free_before = bm.num_free_blocks
            assert bm.can_allocate(rid, target) == (need <= free_before)
            got = bm.allocate_slots(rid, target)
            if need > free_before:
                assert got is None
                assert bm.num_free_blocks == free_before
                assert bm.num_tokens(rid) == cur
            else:
                assert got is not None and len(got.block_ids) == need
                assert bm.block_table(rid)[len(bm.block_table(rid)) - need:] == list(got.block_ids)
                model[rid] = target
        else:
            expect = bm.blocks_for(model.pop(rid, 0))
            assert bm.free(rid) == expect
            assert bm.free(rid) == 0                 # idempotent
        bm.check_integrity()
        assert bm.num_free_blocks + held(bm) == num_blocks
        for rid2, toks in model.items():
            assert len(bm.block_table(rid2)) == bm.blocks_for(toks)
        all_held = [b for t in bm._tables.values() for b in t]
        assert len(all_held) == len(set(all_held))
        assert sorted(all_held + list(bm._free)) == list(range(num_blocks))
    for rid in list(model):
        bm.free(rid)
    assert bm.num_free_blocks == num_blocks
    bm.check_integrity()
