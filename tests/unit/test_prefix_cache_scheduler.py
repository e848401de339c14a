"""Scheduler with prefix caching over a real BlockManager, driven by hand (see test_scheduler.py).

A fake runner keeps a shadow KV cache: each computed position writes (salt, position, token)
into its slot, and every scheduled chunk first reads back its prefix, so a step that would
attend over the wrong KV fails the test.
"""
from __future__ import annotations

import random

import pytest

from decode.block_manager import BlockManager
from decode.scheduler import Scheduler, SchedulerOutput
from disagg.config import SchedulerConfig
from disagg.request import FinishReason, Request, SamplingParams

EOF_TOKEN = 1


def make(num_blocks=64, block_size=4, budget=2048, max_num_seqs=256, max_model_len=1024, caching=True):
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, enable_prefix_caching=caching), max_model_len)


def req(rid: str, tokens, salt=None, **params) -> Request:
    params.setdefault("max_tokens", 100)
    return Request(rid, list(tokens), SamplingParams(cache_salt=salt, **params), eos_token_ids=(EOF_TOKEN,))


class ShadowRunner:
    def __init__(self, s: Scheduler):
        self.s = s
        self.kv: dict[int, tuple] = {}                         # slot -> (salt, position, token)
        self.computed: dict[str, int] = {}                     # request id -> tokens computed in steps

    def run(self, out: SchedulerOutput, tok=7) -> dict[str, int]:
        bs = self.s.bm.block_size
        sampled = {}
        for x in out.scheduled:
            r, salt = x.request, x.request.params.cache_salt
            toks = r.all_token_ids
            slot = lambda p: x.block_table[p // bs] * bs + p % bs   # noqa: E731
            for p in range(x.start):                                  # the prefix it attends over
                assert self.kv.get(slot(p)) == (salt, p, toks[p]), f"{r.request_id}: wrong KV at {p}"
            for p in range(x.start, x.start + x.num_tokens):
                self.kv[slot(p)] = (salt, p, toks[p])
            self.computed[r.request_id] = self.computed.get(r.request_id, 0) + x.num_tokens
            if x.samples:
                sampled[r.request_id] = tok(r) if callable(tok) else tok
        return sampled

    def step(self, tok=7):
        out = self.s.schedule()
        fin = self.s.update(out, self.run(out, tok))
        self.s.bm.check_integrity()
        return out, fin

    def drain(self, tok=7):
        while self.s.has_unfinished():
            self.step(tok)


def plan(out: SchedulerOutput):
    return [(x.request.request_id, x.start, x.num_tokens) for x in out.scheduled]


# ---------------------------------------------------------------- admission with a cached prefix
def test_second_request_computes_only_the_uncached_suffix():
    s = make()
    run = ShadowRunner(s)
    system = list(range(10, 22))                               # 12 tokens: 3 full blocks
    s.add(req("a", system + [50, 51], max_tokens=1))
    run.drain()
    assert s.bm.num_cached_blocks == 3 and s.bm.num_free_blocks == 64
    s.add(req("b", system + [60, 61, 62], max_tokens=1))
    out, _ = run.step()
    assert plan(out) == [("b", 12, 3)]                         # starts after the 3 cached blocks
    assert out.scheduled[0].block_table[:3] == [0, 1, 2]
    assert run.computed == {"a": 14, "b": 3}
    assert (s.prefix_stats.queries, s.prefix_stats.hits) == (14 + 15, 12)


def test_never_the_whole_prompt_at_least_one_token_runs():
    s = make()
    run = ShadowRunner(s)
    p8, p9 = list(range(10, 18)), list(range(10, 19))
    s.add(req("a", p9, max_tokens=1))
    run.drain()                                                # blocks 0, 1 cached (8 tokens)
    s.add(req("same8", p8, max_tokens=1))
    out, _ = run.step()
    assert plan(out) == [("same8", 4, 4)]                      # 8 cached, but the last block must run
    s.add(req("same9", p9, max_tokens=1))
    out, _ = run.step()
    assert plan(out) == [("same9", 8, 1)] and out.scheduled[0].samples


def test_finished_request_leaves_prompt_and_output_blocks_for_the_next_turn():
    s = make()
    run = ShadowRunner(s)
    turn1 = list(range(10, 20))                                # 10 tokens
    a = req("a", turn1, max_tokens=6)
    s.add(a)
    run.drain(tok=lambda r: 100 + r.num_output_tokens)
    assert a.output_token_ids == [100, 101, 102, 103, 104, 105]
    # 16 tokens, 15 of them computed (the last output never is): 3 full blocks cached
    assert s.bm.num_cached_blocks == 3
    turn2 = turn1 + a.output_token_ids + [70, 71, 72]
    s.add(req("b", turn2, max_tokens=1))
    out, _ = run.step()
    assert plan(out) == [("b", 12, 7)]


def test_salts_keep_tenants_apart():
    s = make()
    run = ShadowRunner(s)
    p = list(range(10, 30))
    for rid, salt in (("a", "t1"), ("b", "t2"), ("c", None), ("d", "t1")):
        s.add(req(rid, p, salt=salt, max_tokens=1))
        out, _ = run.step()
        run.drain()
        assert out.scheduled[0].start == (16 if rid == "d" else 0), rid
    assert s.bm.num_cached_blocks == 3 * 5                      # 20 tokens: 5 full blocks per salt, 3 salts
    assert (s.prefix_stats.queries, s.prefix_stats.hits) == (80, 16)


def test_caching_off_changes_nothing():
    s = make(caching=False)
    run = ShadowRunner(s)
    p = list(range(10, 30))
    for rid in "ab":
        s.add(req(rid, p, max_tokens=2))
        run.drain()
    assert run.computed == {"a": 21, "b": 21}
    assert s.bm.num_cached_blocks == 0 and s.prefix_stats.queries == 0


def test_requests_sharing_a_live_prefix_hold_it_together():
    s = make(budget=8)
    run = ShadowRunner(s)
    sys_prompt = list(range(10, 18))
    s.add(req("a", sys_prompt + [40, 41, 42, 43], max_tokens=20))
    run.step()
    run.step()                                                  # a: 12 computed, decoding
    s.add(req("b", sys_prompt + [50], max_tokens=20))
    out, _ = run.step()
    assert ("b", 8, 1) in plan(out)
    assert s.bm.block_table("a")[:2] == s.bm.block_table("b")[:2]
    assert [s.bm._ref[b] for b in s.bm.block_table("a")[:2]] == [2, 2]
    s.abort("a")
    assert [s.bm._ref[b] for b in s.bm.block_table("b")[:2]] == [1, 1]
    run.drain()
    assert s.bm.num_free_blocks == 64


# ---------------------------------------------------------------- preemption, abort
def test_preempted_request_finds_its_own_blocks_again():
    s = make(num_blocks=6, block_size=4, budget=64)
    run = ShadowRunner(s)
    a = req("a", list(range(10, 18)), max_tokens=12, ignore_eos=True)
    b = req("b", list(range(30, 42)), max_tokens=12, ignore_eos=True)
    s.add(a)
    s.add(b)
    run.step()                                                  # a: 2 blocks, b: 3 blocks, 1 free
    preempted = []
    while s.has_unfinished():
        out, _ = run.step()
        preempted += [(r.request_id, len(r.output_token_ids)) for r in out.preempted]
        for x in out.scheduled:
            if x.request.request_id == "b" and x.request.num_preemptions and not x.is_decode:
                assert x.start > 0                              # re-admitted over its cached blocks
    assert preempted and preempted[0][0] == "b"
    assert a.num_output_tokens == b.num_output_tokens == 12
    assert s.prefix_stats.hits > 0
    assert s.bm.num_free_blocks == 6


def test_abort_in_every_state_releases_refs_and_keeps_the_cache():
    s = make(budget=8)
    run = ShadowRunner(s)
    p = list(range(10, 26))
    s.add(req("a", p, max_tokens=1))
    run.drain()
    for rid in "bcd":
        s.add(req(rid, p + [ord(rid)] * 5, max_tokens=50))
    out, _ = run.step()                                         # b admitted over the cache; c, d too
    s.abort("b")                                                # running
    s.abort("d")                                                # running or waiting
    run.step()
    s.abort("c")
    s.bm.check_integrity()
    assert s.bm.num_free_blocks == 64 and not s.has_unfinished()
    assert len(s.bm.lookup(s._keys(req("x", p), 4))) == 4       # a's prompt is still cached


# ---------------------------------------------------------------- randomized
@pytest.mark.parametrize("seed", range(6))
def test_random_workload_with_shared_prefixes(seed):
    """Conversations and shared system prompts under memory pressure, with aborts: the shadow KV
    check holds in every step, outputs are those of the fake model, nothing leaks."""
    rng = random.Random(seed)
    num_blocks, bs, budget = rng.choice([(16, 4, 16), (24, 2, 12), (12, 8, 32)])
    s = make(num_blocks=num_blocks, block_size=bs, budget=budget, max_num_seqs=4, max_model_len=96)
    run = ShadowRunner(s)
    systems = [[3 + i] * rng.randint(1, 20) for i in range(3)]
    cap = min(95, num_blocks * bs - 1)
    reqs = []
    for i in range(30):
        sys_p = rng.choice(systems)
        prompt = (sys_p + [200 + i] * rng.randint(1, 12))[:cap]
        if reqs and rng.random() < 0.4:                         # a next turn of an earlier conversation
            prev = rng.choice(reqs)
            prompt = (prev.prompt_token_ids + prev.output_token_ids + [250 + i])[:cap]
        r = req(f"r{i}", prompt, salt=rng.choice([None, None, "t"]), max_tokens=rng.randint(1, 8))
        s.add(r)
        reqs.append(r)
        for _ in range(rng.randint(0, 3)):
            if s.has_unfinished():
                run.step(tok=lambda q: 3 + (int(q.request_id[1:]) * 7 + q.num_output_tokens) % 50)
        if rng.random() < 0.1:
            s.abort(rng.choice(reqs).request_id)
    run.drain(tok=lambda q: 3 + (int(q.request_id[1:]) * 7 + q.num_output_tokens) % 50)
    assert s.bm.num_free_blocks == num_blocks and not s.bm._tables
    for r in reqs:
        assert r.finished
        if r.finish_reason != FinishReason.ABORT:
            k = int(r.request_id[1:])
            assert r.output_token_ids == [3 + (k * 7 + j) % 50 for j in range(r.num_output_tokens)]
