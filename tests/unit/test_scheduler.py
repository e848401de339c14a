"""Scheduler policy over a real BlockManager, driven by hand.

Each test plays the model runner: `schedule()`, then `update()` with a sampled token for
every ScheduledRequest whose `.samples` is true (read before `update`, which advances
`num_computed_tokens`).
"""
from __future__ import annotations

import random

import pytest

from decode.block_manager import BlockManager
from decode.scheduler import Scheduler, SchedulerOutput
from disagg.config import SchedulerConfig
from disagg.request import FinishReason, Request, SamplingParams

EOS = 1


def make(num_blocks=64, block_size=4, max_num_seqs=256, budget=2048, max_model_len=1024) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    return Scheduler(cfg, BlockManager(num_blocks, block_size), max_model_len)


def req(rid: str, prompt_len: int, **params) -> Request:
    params.setdefault("max_tokens", 100)
    return Request(rid, [3 + i % 300 for i in range(prompt_len)], SamplingParams(**params),
                   eos_token_ids=(EOS,))


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_tokens) for s in out.scheduled]


def step(s: Scheduler, tok: int | dict[str, int] = 7) -> tuple[SchedulerOutput, list[Request]]:
    """One step: schedule, then sample `tok` (or tok[rid]) for every row that samples."""
    out = s.schedule()
    samplers = [x.request.request_id for x in out.scheduled if x.samples]
    sampled = {r: (tok[r] if isinstance(tok, dict) else tok) for r in samplers}
    finished = s.update(out, sampled)
    s.bm.check_integrity()
    return out, finished


# ---------------------------------------------------------------- chunked prefill
def test_chunked_prefill_splits_by_token_budget():
    s = make(budget=8)
    a = req("a", 20)
    s.add(a)
    chunks = []
    for _ in range(3):
        out = s.schedule()
        assert len(out.scheduled) == 1
        sr = out.scheduled[0]
        chunks.append((sr.start, sr.num_tokens, sr.samples))
        s.update(out, {"a": 7} if sr.samples else {})
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert a.num_computed_tokens == 20 and a.output_token_ids == [7]
    out = s.schedule()
    assert plan(out) == [("a", 1)] and out.scheduled[0].is_decode and out.scheduled[0].samples
    assert out.scheduled[0].block_table == s.bm.block_table("a") == [0, 1, 2, 3, 4, 5]


def test_budget_is_shared_running_first_then_admission():
    s = make(budget=8)
    s.add(req("a", 20))
    s.add(req("b", 6))
    assert plan(step(s)[0]) == [("a", 8)]
    assert plan(step(s)[0]) == [("a", 8)]
    out, _ = step(s)
    assert plan(out) == [("a", 4), ("b", 4)]           # a samples; b gets the rest of the budget
    out, _ = step(s)
    assert plan(out) == [("a", 1), ("b", 2)]           # decode first, then b's last chunk
    out, _ = step(s)
    assert plan(out) == [("a", 1), ("b", 1)]
    assert out.num_batched_tokens == 2 and out.num_decode == 2


def test_running_prefill_chunk_comes_before_newly_admitted():
    s = make(budget=10)
    s.add(req("a", 15))
    assert plan(step(s)[0]) == [("a", 10)]
    s.add(req("b", 20))
    out = s.schedule()
    assert plan(out) == [("a", 5), ("b", 5)]
    assert [(x.start, x.samples) for x in out.scheduled] == [(10, True), (0, False)]


def test_decodes_listed_before_prefill_chunks():
    s = make(budget=64)
    s.add(req("a", 4))
    step(s)                                            # a is decoding now
    s.add(req("b", 6))
    s.add(req("c", 1))                                 # a one-token prompt is a one-token step
    out = s.schedule()
    # running a, then admitted b (prefill) and c (one token): stable sort puts c before b
    assert plan(out) == [("a", 1), ("c", 1), ("b", 6)]
    assert [x.is_decode for x in out.scheduled] == [True, True, False]
    assert out.num_decode == 2


def test_block_table_in_output_is_a_snapshot_after_allocation():
    s = make(block_size=4)
    s.add(req("a", 5))
    out = s.schedule()
    assert out.scheduled[0].block_table == [0, 1]
    s.update(out, {"a": 7})
    s.add(req("b", 3))
    out = s.schedule()
    assert plan(out) == [("a", 1), ("b", 3)]
    assert [x.block_table for x in out.scheduled] == [[0, 1], [2]]


# ---------------------------------------------------------------- admission
def test_max_num_seqs_is_respected():
    s = make(max_num_seqs=2)
    for r in "abcd":
        s.add(req(r, 3, max_tokens=2))
    out, _ = step(s)
    assert plan(out) == [("a", 3), ("b", 3)]
    assert s.num_running == 2 and s.num_waiting == 2
    out, fin = step(s)
    assert plan(out) == [("a", 1), ("b", 1)]
    assert [r.request_id for r in fin] == ["a", "b"]   # max_tokens=2 reached
    out, _ = step(s)
    assert plan(out) == [("c", 3), ("d", 3)]


def test_waiting_requests_admitted_fcfs_with_head_of_line_blocking():
    s = make(num_blocks=4, block_size=4)
    s.add(req("x", 11))
    step(s)                                            # x: 12 tokens in 3 blocks, 1 block free
    s.add(req("y", 8))                                 # needs 2 blocks: blocks the queue
    s.add(req("z", 2))                                 # would fit, but must wait behind y
    out = s.schedule()
    assert plan(out) == [("x", 1)]
    assert [r.request_id for r in s.waiting] == ["y", "z"]
    assert s.bm.num_free_blocks == 1


def test_fcfs_order_of_admission():
    s = make(budget=9)
    for r in "pqrs":
        s.add(req(r, 3))
    out, _ = step(s)
    assert plan(out) == [("p", 3), ("q", 3), ("r", 3)]
    assert [r.request_id for r in s.waiting] == ["s"]
    out, _ = step(s)
    assert plan(out) == [("p", 1), ("q", 1), ("r", 1), ("s", 3)]


# ---------------------------------------------------------------- preemption
def test_preemption_takes_youngest_first_and_requeues_in_order():
    # 5 one-block requests fill the cache; each decode then needs a second block.
    s = make(num_blocks=5, block_size=2)
    reqs = {r: req(r, 2) for r in "abcde"}
    for r in reqs.values():
        s.add(r)
    out, _ = step(s)
    assert plan(out) == [(r, 2) for r in "abcde"]
    assert s.bm.num_free_blocks == 0
    s.add(req("late", 1))                              # would fit after preemption frees blocks
    out = s.schedule()
    # a needs a block: e goes; b needs one: d goes; c needs one: none left, c is the youngest.
    assert plan(out) == [("a", 1), ("b", 1)]
    assert [r.request_id for r in out.preempted] == ["e", "d", "c"]
    assert [r.request_id for r in s.running] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c", "d", "e", "late"]   # front, admission order
    for r in "cde":
        assert reqs[r].num_computed_tokens == 0
        assert reqs[r].num_preemptions == 1
        assert reqs[r].output_token_ids == [7]         # output kept, recomputed later
        assert not s.bm.has(r)
    assert s.bm.block_table("a") == [0, 4] and s.bm.block_table("b") == [1, 3]
    assert s.bm.num_free_blocks == 1
    s.bm.check_integrity()


def test_no_admission_in_a_step_that_preempted():
    s = make(num_blocks=5, block_size=4)
    s.add(req("a", 8))                                 # 2 blocks
    s.add(req("b", 12))                                # 3 blocks
    step(s)
    assert s.bm.num_free_blocks == 0
    s.add(req("c", 2))                                 # 1 block: fits once b is gone
    out = s.schedule()
    assert plan(out) == [("a", 1)]                     # a's 9th token opens block 3
    assert [r.request_id for r in out.preempted] == ["b"]
    assert s.bm.num_free_blocks == 2
    assert [r.request_id for r in s.waiting] == ["b", "c"]
    s.update(out, {"a": 7})
    # next step: b (13 tokens, 4 blocks) heads the queue and does not fit: c waits behind it
    out = s.schedule()
    assert plan(out) == [("a", 1)]
    assert out.preempted == []
    assert [r.request_id for r in s.waiting] == ["b", "c"]


def test_request_that_is_itself_youngest_preempts_itself():
    s = make(num_blocks=5, block_size=4)
    a, b = req("a", 7), req("b", 12)                   # 2 + 3 blocks
    s.add(a)
    s.add(b)
    step(s)                                            # a: 8 tokens (2 blocks), b: 13 (needs 4)
    out = s.schedule()
    assert plan(out) == [("a", 1)]
    assert out.preempted == [b]
    assert s.waiting[0] is b and b.num_computed_tokens == 0
    assert s.bm.block_table("a") == [0, 1] and not s.bm.has("b")
    s.update(out, {"a": 7})
    # b is recomputed from scratch as a 13-token prefill once it fits
    s.abort("a")
    out = s.schedule()
    assert plan(out) == [("b", 13)] and out.scheduled[0].samples


def test_recompute_after_preemption_continues_the_output():
    s = make(num_blocks=5, block_size=2)
    for r in "abcde":
        s.add(req(r, 2, max_tokens=3))
    step(s, 10)
    out, _ = step(s, 11)                               # c, d, e preempted
    e = next(r for r in out.preempted if r.request_id == "e")
    while s.has_unfinished():
        step(s, 12)
    assert e.output_token_ids == [10, 12, 12]
    assert e.finish_reason == FinishReason.LENGTH and e.num_preemptions >= 1
    assert s.bm.num_free_blocks == 5


# ---------------------------------------------------------------- update / stop
def test_update_appends_and_only_samplers_get_tokens():
    s = make(budget=4)
    a = req("a", 6)
    s.add(a)
    out = s.schedule()
    assert not out.scheduled[0].samples
    assert s.update(out, {}) == []
    assert a.num_computed_tokens == 4 and a.output_token_ids == []
    out = s.schedule()
    assert out.scheduled[0].samples
    s.update(out, {"a": 42})
    assert a.num_computed_tokens == 6 and a.output_token_ids == [42] and a.num_tokens == 7


def test_stops_on_eos():
    s = make()
    a = req("a", 3)
    s.add(a)
    step(s, 9)
    _, fin = step(s, EOS)
    assert fin == [a] and a.finish_reason == FinishReason.STOP
    assert a.output_token_ids == [9, EOS]
    assert s.num_running == 0 and not s.bm.has("a") and s.bm.num_free_blocks == 64


def test_ignore_eos_keeps_going_until_max_tokens():
    s = make()
    a = req("a", 3, ignore_eos=True, max_tokens=3)
    s.add(a)
    assert step(s, EOS)[1] == []
    assert step(s, EOS)[1] == []
    assert step(s, EOS)[1] == [a]
    assert a.output_token_ids == [EOS, EOS, EOS] and a.finish_reason == FinishReason.LENGTH


def test_stop_token_ids_stop_even_with_ignore_eos():
    s = make()
    a = req("a", 3, stop_token_ids=(50, 51), ignore_eos=True)
    s.add(a)
    step(s, 9)
    _, fin = step(s, 51)
    assert fin == [a] and a.finish_reason == FinishReason.STOP and a.output_token_ids == [9, 51]


def test_stops_on_max_tokens():
    s = make()
    a = req("a", 3, max_tokens=4)
    s.add(a)
    results = [step(s, 9)[1] for _ in range(4)]
    assert results == [[], [], [], [a]]
    assert a.num_output_tokens == 4 and a.finish_reason == FinishReason.LENGTH


def test_stops_on_max_model_len():
    s = make(max_model_len=10)
    a = req("a", 8)
    s.add(a)
    assert step(s, 9)[1] == []
    assert step(s, 9)[1] == [a]
    assert a.num_tokens == 10 and a.finish_reason == FinishReason.LENGTH


def test_stops_when_the_request_could_no_longer_fit_the_cache():
    s = make(num_blocks=2, block_size=4)
    a = req("a", 7)
    s.add(a)
    assert step(s, 9)[1] == []                         # 8 tokens: 2 blocks, still fits
    assert step(s, 9)[1] == [a]                        # 9 tokens would need 3 blocks
    assert a.finish_reason == FinishReason.LENGTH and a.output_token_ids == [9, 9]
    assert s.bm.num_free_blocks == 2


def test_finish_from_outside():
    s = make()
    a = req("a", 3)
    s.add(a)
    step(s)
    assert s.finish("a", FinishReason.STOP) is a
    assert a.finish_reason == FinishReason.STOP and not s.bm.has("a") and s.num_running == 0
    assert s.finish("a", FinishReason.STOP) is None


# ---------------------------------------------------------------- abort
def test_abort_frees_blocks_from_running_and_waiting():
    s = make(num_blocks=5, block_size=2)
    for r in "abcde":
        s.add(req(r, 2))
    step(s)
    out, _ = step(s)                                   # c, d, e preempted to waiting
    s.add(req("f", 2))
    assert s.bm.has("a") and not s.bm.has("d")
    a = s.abort("a")
    assert a.finish_reason == FinishReason.ABORT and not s.bm.has("a")
    d = s.abort("d")
    assert d.finish_reason == FinishReason.ABORT
    assert s.abort("f").finish_reason == FinishReason.ABORT
    assert s.abort("f") is None and s.abort("nope") is None
    assert [r.request_id for r in s.running] == ["b"]
    assert [r.request_id for r in s.waiting] == ["c", "e"]
    assert s.bm.num_free_blocks == 5 - len(s.bm.block_table("b"))
    s.bm.check_integrity()


def test_abort_while_the_step_runs_is_ignored_by_update():
    s = make()
    a, b = req("a", 3), req("b", 3)
    s.add(a)
    s.add(b)
    out = s.schedule()
    s.abort("a")
    fin = s.update(out, {"a": 9, "b": 9})
    assert fin == []
    assert a.output_token_ids == [] and a.num_computed_tokens == 0
    assert b.output_token_ids == [9]
    assert [r.request_id for r in s.running] == ["b"]
    s.bm.check_integrity()


# ---------------------------------------------------------------- add
def test_add_rejects_what_can_never_run():
    s = make(num_blocks=2, block_size=4, max_model_len=10)
    with pytest.raises(ValueError, match="empty"):
        s.add(req("e", 0))
    with pytest.raises(ValueError, match="context length"):
        s.add(req("long", 10))
    with pytest.raises(ValueError, match="KV cache"):
        s.add(req("big", 8))                           # 8 + 1 tokens need 3 blocks of 4
    s.add(req("ok", 7))                                # 7 + 1 tokens fit 2 blocks
    assert [r.request_id for r in s.waiting] == ["ok"]
    s2 = make(max_model_len=10)
    s2.add(req("nine", 9))
    assert s2.num_waiting == 1


# ---------------------------------------------------------------- randomized
def _token(rid: str, k: int) -> int:
    """The 'model': a request's k-th output token depends only on (rid, k)."""
    return 3 + (int(rid[1:]) * 131 + k * 17) % 300


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_runs_to_completion(seed):
    rng = random.Random(seed)
    num_blocks, bs, budget, max_seqs, max_len = rng.choice([(12, 4, 16, 4, 40), (20, 2, 8, 8, 30),
                                                             (8, 8, 32, 3, 64)])
    s = make(num_blocks=num_blocks, block_size=bs, max_num_seqs=max_seqs, budget=budget,
             max_model_len=max_len)
    eos_at: dict[str, int] = {}
    reqs: list[Request] = []
    pending = []
    for i in range(40):
        cap = min(max_len - 1, num_blocks * bs - 1)
        r = req(f"r{i}", rng.randint(1, cap), max_tokens=rng.randint(1, 12),
                ignore_eos=rng.random() < 0.2)
        eos_at[r.request_id] = rng.randint(0, 15)
        pending.append(r)
    steps = 0
    while pending or s.has_unfinished():
        steps += 1
        assert steps < 5000, "no progress"
        for _ in range(rng.randint(0, 2)):
            if pending:
                r = pending.pop(0)
                s.add(r)
                reqs.append(r)
        if reqs and rng.random() < 0.05:
            victim = rng.choice(reqs)
            aborted = s.abort(victim.request_id)
            assert (aborted is victim) or victim.finished
            assert not s.bm.has(victim.request_id)
        running_before = {r.request_id for r in s.running}
        out = s.schedule()
        # the step as data: budget, seqs, uniqueness, ordering, blocks cover the computed tokens
        assert out.num_batched_tokens <= budget
        assert s.num_running <= max_seqs
        ids = [x.request.request_id for x in out.scheduled]
        assert len(ids) == len(set(ids))
        decode_flags = [x.is_decode for x in out.scheduled]
        assert decode_flags == sorted(decode_flags, reverse=True)
        for x in out.scheduled:
            assert x.num_tokens >= 1 and x.request in s.running
            need = x.start + x.num_tokens
            assert len(x.block_table) == s.bm.blocks_for(need)
            assert x.block_table == s.bm.block_table(x.request.request_id)
        for p in out.preempted:
            assert p in s.waiting and p.num_computed_tokens == 0 and not s.bm.has(p.request_id)
        if out.preempted:                               # no admission in a step that preempted
            assert set(ids) <= running_before
        assert sum(len(s.bm.block_table(r.request_id)) for r in s.running) == \
            num_blocks - s.bm.num_free_blocks
        for w in s.waiting:
            assert not s.bm.has(w.request_id)
        sampled = {}
        for x in out.scheduled:
            if x.samples:
                rid, k = x.request.request_id, x.request.num_output_tokens
                sampled[rid] = EOS if k == eos_at[rid] else _token(rid, k)
        if out.scheduled and rng.random() < 0.05:     # abort while the step "runs"
            s.abort(rng.choice(out.scheduled).request.request_id)
        s.update(out, sampled)
        s.bm.check_integrity()
    assert s.bm.num_free_blocks == num_blocks
    assert not s.bm._tables
    for r in reqs:
        assert r.finished
        rid = r.request_id
        if r.finish_reason == FinishReason.ABORT:
            continue
        expect = []
        for k in range(r.num_output_tokens):
            expect.append(EOS if k == eos_at[rid] else _token(rid, k))
        assert r.output_token_ids == expect              # preemption never changes the output
        if r.finish_reason == FinishReason.STOP:
            assert r.output_token_ids[-1] == EOS and not r.params.ignore_eos
        else:
            assert (r.num_output_tokens == r.params.max_tokens or r.num_tokens >= max_len
                    or s.bm.blocks_for(r.num_tokens) > num_blocks)
        assert r.num_output_tokens <= r.params.max_tokens
