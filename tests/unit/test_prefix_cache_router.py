"""Cache-aware routing: the router's mirror index, the policy functions given cached tokens, metrics."""
from __future__ import annotations

import pytest

from disagg.messages import WorkerLoad
from router.metrics import Metrics
from router.policy import decode_preference, pick_prefill, should_prefill_locally
from router.prefix_index import PrefixIndex


def pload(rank, queued, n=0):
    return WorkerLoad(rank, "prefill", n, 0, queued, 1000, 1000)


def dload(rank, free, queued=0, running=0):
    return WorkerLoad(rank, "decode", running, 0, queued, free, 1000)


# ---------------------------------------------------------------- mirror index
def test_index_matches_the_workers_keys():
    ix = PrefixIndex(block_size=4)
    system = list(range(10, 30))                       # 5 blocks
    ix.insert(0, ix.keys(system + [1, 2, 3, 4]))       # worker 0 served system + 1 block
    ix.insert(1, ix.keys(system[:8]))                  # worker 1 holds 2 blocks of it
    q = ix.keys(system + [9, 9, 9])
    assert [ix.match(w, q) for w in (0, 1, 2)] == [5, 2, 0]
    assert ix.match_tokens([0, 1, 2], q, len(system) + 3) == {0: 20, 1: 8, 2: 0}
    # never the whole prompt: a 20-token prompt fully held still leaves its last block to compute
    assert ix.match_tokens([0], ix.keys(system), 20) == {0: 16}
    assert ix.match(0, ix.keys(system, cache_salt="t")) == 0          # salted keys differ
    ix.drop(0)
    assert ix.match(0, q) == 0 and ix.size(0) == 0


def test_index_is_an_lru_bounded_by_the_workers_capacity():
    ix = PrefixIndex(block_size=2)
    a, b = ix.keys([1, 1, 2, 2, 3, 3]), ix.keys([7, 7, 8, 8])
    ix.set_capacity(0, 4)
    ix.insert(0, a)
    ix.insert(0, b)                                    # 5 keys > 4: a's tail goes first
    assert ix.size(0) == 4
    assert ix.match(0, a) == 2 and ix.match(0, b) == 2
    ix.insert(0, a[:1])                                # touch a's head
    ix.set_capacity(0, 2)
    assert ix.match(0, a) == 1 and ix.match(0, b) == 1


# ---------------------------------------------------------------- policy
def test_pick_prefill_weighs_cache_overlap_against_queued_tokens():
    loads = [pload(0, 300), pload(1, 100)]
    assert pick_prefill(loads) == 1                                       # least loaded
    assert pick_prefill(loads, 1000, {0: 800}) == 0                       # 300 + 200 < 100 + 1000
    assert pick_prefill(loads, 1000, {0: 150}) == 1                       # 300 + 850 > 100 + 1000
    assert pick_prefill(loads, 1000, {0: 200}) == 0                       # a tie: fewer requests, lower rank
    assert pick_prefill([pload(0, 300, n=2), pload(1, 100)], 1000, {0: 200}) == 1
    assert pick_prefill(loads, 1000, {0: 800, 1: 800}) == 1


def test_decode_preference_counts_held_blocks_as_headroom_in_the_ranking():
    loads = [dload(0, 100), dload(1, 120), dload(2, 5)]
    assert decode_preference(loads, 10) == [1, 0]
    assert decode_preference(loads, 10, cached_blocks={0: 30}) == [0, 1]    # 90 + 30 > 110
    assert decode_preference(loads, 10, cached_blocks={0: 10}) == [1, 0]    # 90 + 10 < 110
    assert decode_preference(loads, 10, cached_blocks={2: 50}) == [1, 0]    # held blocks never make room


def test_conditional_disaggregation_counts_only_uncached_tokens():
    c, x = 1e-4, 5e-5
    d = dload(0, 500, running=8)
    pl = [pload(1, 0)]
    # a long next turn is remote without a cache...
    assert not should_prefill_locally(2000, d, pl, x, c, 256)
    # ...and local when the decode worker holds all but its last 200 tokens (no stall, no transfer)
    assert should_prefill_locally(2000, d, pl, x, c, 256, decode_cached_tokens=1800)
    # a prefill worker holding the same prefix makes remote cheap again: 200 tokens to compute,
    # 200 to move, against 200 computed locally: local still wins (no transfer)
    assert should_prefill_locally(2000, d, pl, x, c, 256, decode_cached_tokens=1800,
                                  prefill_cached_tokens={1: 1800})
    # the decode worker holds nothing but the prefill worker holds most: remote
    assert not should_prefill_locally(600, dload(0, 500, running=2), pl, x, c, 256,
                                      prefill_cached_tokens={1: 500})
    # defaults are the uncached rule
    assert should_prefill_locally(100, dload(0, 50, running=32), [pload(1, 0)], x, c, 256) == \
        should_prefill_locally(100, dload(0, 50, running=32), [pload(1, 0)], x, c, 256,
                               decode_cached_tokens=0, prefill_cached_tokens={})


# ---------------------------------------------------------------- metrics
def test_prefix_cache_metrics_per_worker():
    m = Metrics("tiny")
    rows = [{"worker": 0, "role": "prefill", "queries": 120, "hits": 64},
            {"worker": 1, "role": "decode", "queries": 90, "hits": 44}]
    m.add_prefix_cache_source(lambda: rows)
    text = m.render().decode()
    assert 'disagg:prefix_cache_queries_total{model_name="tiny",role="prefill",worker="0"} 120.0' in text
    assert 'disagg:prefix_cache_hits_total{model_name="tiny",role="decode",worker="1"} 44.0' in text


@pytest.mark.parametrize("caching", [True, False])
def test_colocated_engine_reports_its_counters(tiny_ckpts, caching):
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.async_engine import AsyncEngine
    from disagg.engine.llm_engine import LLMEngine
    from disagg.request import SamplingParams
    eng = LLMEngine(EngineConfig(tiny_ckpts("llama_gqa"), dtype="float32",
                                 cache=CacheConfig(block_size=4, num_blocks=64, enable_prefix_caching=caching),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=64)))
    p = list(range(3, 23))
    for _ in range(2):
        eng.generate([p], SamplingParams(max_tokens=2, temperature=0.0))
    rows = AsyncEngine(eng).prefix_cache_stats()
    assert rows == [{"worker": 0, "role": "colocated", "queries": 40 if caching else 0, "hits": 16 if caching else 0}]
