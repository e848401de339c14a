"""Prefix caching in the colocated engine (tiny checkpoint): the same tokens with the cache on as
off, greedy and seeded sampling, while computing only the uncached suffix."""
from __future__ import annotations

import pytest
import torch

from disagg.request import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)


def _engine(model_dir, caching: bool, budget=16, num_blocks=256):
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.llm_engine import LLMEngine
    eng = LLMEngine(EngineConfig(model_dir, dtype="float32",
                                 cache=CacheConfig(block_size=4, num_blocks=num_blocks, enable_prefix_caching=caching),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=budget)))
    eng.computed = {}                          # request id -> prompt tokens run through the model
    execute = eng.runner.execute

    def spy(sched, *a, **k):
        for s in sched.scheduled:
            n = max(0, min(s.start + s.num_tokens, s.request.num_prompt_tokens) - s.start)
            eng.computed[s.request.request_id] = eng.computed.get(s.request.request_id, 0) + n
        return execute(sched, *a, **k)
    eng.runner.execute = spy
    return eng


def _tokens(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 384, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def model_dir(tiny_ckpts):
    return tiny_ckpts("llama_gqa")


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_shared_prefix_and_next_turn_compute_only_the_suffix(model_dir, params):
    system = _tokens(1, 37)                    # 9 full blocks of 4 + 1 token
    a = system + _tokens(2, 5)
    b = system + _tokens(3, 9)
    outs, computed, stats = {}, {}, None
    for caching in (True, False):
        eng = _engine(model_dir, caching)
        ra = eng.generate([a], params)[0]
        c = a + ra.output_token_ids + _tokens(4, 6)      # the next turn of a's conversation
        rb, rc = (eng.generate([p], params)[0] for p in (b, c))
        outs[caching] = [ra.output_token_ids, rb.output_token_ids, rc.output_token_ids]
        computed[caching] = [eng.computed[r.request_id] for r in (ra, rb, rc)]
        if caching:
            stats = eng.scheduler.prefix_stats
            eng.block_manager.check_integrity()
            assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert outs[True] == outs[False]
    n_c = len(a) + 12 + 6
    assert computed[False] == [len(a), len(b), n_c]
    # b reuses the system prompt's 9 full blocks; a computed 42 + 12 - 1 = 53 tokens (13 full
    # blocks, its answer included), all of which head c
    assert computed[True] == [len(a), len(b) - 36, n_c - 52]
    assert (stats.queries, stats.hits) == (len(a) + len(b) + n_c, 36 + 52)


def test_outputs_equal_cache_off(model_dir):
    """Token for token: a shared system prompt, a next turn, a duplicate prompt, a batch sharing a
    live prefix, greedy and seeded."""
    system = _tokens(5, 30)
    a = system + _tokens(6, 7)
    prompts = [a, system + _tokens(7, 3), a, system + _tokens(8, 11), system[:13]]
    params = [GREEDY, SEEDED, GREEDY, SEEDED, GREEDY]
    results = {}
    for caching in (True, False):
        eng = _engine(model_dir, caching)
        first = eng.generate(prompts[:1], params[:1])[0]
        turn2 = a + first.output_token_ids + _tokens(9, 4)
        rest = eng.generate(prompts[1:] + [turn2], params[1:] + [GREEDY])   # batched, sharing `system`
        results[caching] = [first.output_token_ids] + [r.output_token_ids for r in rest]
        if caching:
            assert eng.scheduler.prefix_stats.hits > 0
            eng.block_manager.check_integrity()
    assert results[True] == results[False]


def test_salts_never_share(model_dir):
    p = _tokens(10, 40)
    eng = _engine(model_dir, True)
    salted = [SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, cache_salt=s)
              for s in ("tenant-1", "tenant-2", "tenant-1", None)]
    outs = [eng.generate([p], sp)[0] for sp in salted]
    # tenant-2 and the unsalted request compute everything; tenant-1 again reuses its 9 blocks
    assert [eng.computed[r.request_id] for r in outs] == [40, 40, 4, 40]
    ref = _engine(model_dir, False).generate([p], salted[0])[0].output_token_ids
    assert [r.output_token_ids for r in outs] == [ref] * 4
    eng.block_manager.check_integrity()


def test_preemption_with_cache_equals_alone(model_dir):
    """Memory pressure: preempted requests come back over their cached blocks; same tokens."""
    prompts = [_tokens(20, 20) for _ in range(4)]
    shared = _tokens(21, 16)
    prompts = [shared + p for p in prompts]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = _engine(model_dir, False)
    alone = [ref.generate([p], params)[0].output_token_ids for p in prompts]   # one at a time
    eng = _engine(model_dir, True, budget=64, num_blocks=40)
    reqs = eng.generate(prompts, params)
    assert sum(r.num_preemptions for r in reqs) > 0
    assert [r.output_token_ids for r in reqs] == alone
    eng.block_manager.check_integrity()
    assert eng.block_manager.num_free_blocks == 40
