"""Ordering, dispatch and reservation policy (router/policy.py), and the scheduler's ordering hook.

Time is a fake clock: plain floats passed as `now` (or a list read by the scheduler's
`clock`), so every expectation is exact.
"""
from __future__ import annotations

import math
import random

import pytest

from decode.block_manager import BlockManager
from decode.scheduler import Scheduler
from disagg.config import SchedulerConfig
from disagg.messages import WorkerLoad
from disagg.request import Request, SamplingParams
from router.policy import (FCFS, ORDERINGS, QueueItem, ShortestPredictedFirst, blocks_for, decode_preference,
                           make_ordering, reserved_blocks, should_prefill_locally)


def item(rid: str, arrival: float, predicted: float, prompt: int = 10) -> QueueItem:
    return QueueItem(rid, arrival, prompt, predicted)


def ids(queue: list[QueueItem], order: list[int]) -> list[str]:
    return [queue[i].request_id for i in order]


# ====================================================================== ordering
def test_fcfs_orders_by_arrival_ties_by_queue_position():
    q = [item("c", 3.0, 1), item("a", 1.0, 900), item("b", 2.0, 5), item("b2", 2.0, 1)]
    assert ids(q, FCFS().order(q, now=10.0)) == ["a", "b", "b2", "c"]
    assert q[FCFS().pick(q, now=10.0)].request_id == "a"


def test_spf_orders_by_predicted_length():
    spf = ShortestPredictedFirst(aging_rate=0.0, max_wait_s=100.0)
    q = [item("long", 0.0, 500), item("mid", 1.0, 50), item("short", 2.0, 5), item("short2", 3.0, 5)]
    assert ids(q, spf.order(q, now=4.0)) == ["short", "short2", "mid", "long"]
    assert spf.pick(q, now=4.0) == 2


def test_spf_aging_trades_length_for_waiting_time():
    spf = ShortestPredictedFirst(aging_rate=10.0, max_wait_s=1000.0)
    # key = predicted - 10 * wait: a request of 300 passes one of 100 that arrived >= 20 s after it.
    old_long, new_short = item("long", 0.0, 300), item("short", 10.0, 100)
    assert spf.priority(old_long, 15.0) == (1, 150.0, 0.0)
    assert spf.priority(new_short, 15.0) == (1, 50.0, 10.0)
    assert ids([old_long, new_short], spf.order([old_long, new_short], 15.0)) == ["short", "long"]
    newer_short = item("short", 25.0, 100)                     # arrived 25 s after long
    assert ids([old_long, newer_short], spf.order([old_long, newer_short], 30.0)) == ["long", "short"]
    # The relative order of non-overdue items does not change with `now`.
    for now in (25.0, 30.0, 100.0, 500.0):
        assert spf.pick([old_long, new_short], now) == 1


def test_overdue_request_goes_first_at_the_bound_fcfs_among_overdue():
    spf = ShortestPredictedFirst(aging_rate=0.0, max_wait_s=10.0)
    q = [item("short1", 5.0, 1), item("long", 0.0, 1000), item("short2", 8.0, 1)]
    assert ids(q, spf.order(q, now=9.5)) == ["short1", "short2", "long"]     # waited 9.5 < 10
    assert ids(q, spf.order(q, now=10.0)) == ["long", "short1", "short2"]    # waited exactly 10: overdue
    assert spf.priority(q[1], 10.0) == (0, 0.0, 0.0)
    # Several overdue: FCFS among them, whatever their lengths; all before the rest.
    q2 = [item("late-long", 2.0, 900), item("early-long", 1.0, 1000), item("fresh-short", 19.0, 1)]
    assert ids(q2, spf.order(q2, now=20.0)) == ["early-long", "late-long", "fresh-short"]


def simulate(policy, horizon: int = 200) -> dict[str, float]:
    """One server taking one pick per second at t = 0, 1, 2, ...; a short request (predicted 10)
    arrives at t = k + 0.5 for every k, so the queue never drains. A long request (predicted 1000)
    is in the queue from t = 0, behind three shorts that arrived with it. Returns start times."""
    queue = [item("long", 0.0, 1000), item("s-a", 0.0, 10), item("s-b", 0.0, 10), item("s-c", 0.0, 10)]
    started = {}
    for t in range(horizon):
        now = float(t)
        i = policy.pick(queue, now)
        started[queue.pop(i).request_id] = now
        queue.append(item(f"s{t}", t + 0.5, 10))
    return started


def test_no_starvation_long_request_in_a_stream_of_short_ones():
    max_wait = 20.0
    started = simulate(ShortestPredictedFirst(aging_rate=0.0, max_wait_s=max_wait))
    assert started["long"] - 0.0 <= max_wait
    assert started["long"] == 20.0        # the first pick at which it has waited max_wait_s
    # Without the bound, plain SPF starves it for the whole run.
    assert "long" not in simulate(ShortestPredictedFirst(aging_rate=0.0, max_wait_s=math.inf))
    # Aging alone also ends the starvation, but later and without a stated bound: long passes
    # only shorts that arrived >= (1000 - 10) / 10 = 99 s after it. The oldest short queued at t
    # is s{t-3} (arrived t - 2.5), so that happens at t - 3 >= 98.5, i.e. t = 102.
    aged = simulate(ShortestPredictedFirst(aging_rate=10.0, max_wait_s=math.inf))
    assert aged["long"] == 102.0
    # FCFS serves it at once.
    assert simulate(FCFS())["long"] == 0.0


def test_registry_and_validation():
    assert set(ORDERINGS) == {"fcfs", "spf"}
    assert isinstance(make_ordering("fcfs"), FCFS)
    spf = make_ordering("spf", aging_rate=3.0, max_wait_s=7.0)
    assert isinstance(spf, ShortestPredictedFirst) and (spf.aging_rate, spf.max_wait_s) == (3.0, 7.0)
    with pytest.raises(ValueError, match="unknown ordering"):
        make_ordering("lifo")
    with pytest.raises(ValueError):
        ShortestPredictedFirst(aging_rate=-1.0)
    with pytest.raises(ValueError):
        ShortestPredictedFirst(max_wait_s=0.0)
    with pytest.raises(ValueError):
        QueueItem("x", 0.0, 10, -1.0)
    with pytest.raises(ValueError, match="empty"):
        FCFS().pick([], 0.0)


# ====================================================================== reservation
def test_reserved_blocks_reserves_the_prediction_then_grows():
    # prompt 100, predicted 60, block 16: 160 tokens -> 10 blocks while within the prediction.
    assert reserved_blocks(100, 60, 0, 16) == 10
    assert reserved_blocks(100, 60, 59, 16) == 10
    assert reserved_blocks(100, 59.2, 0, 16) == 10                  # ceil(59.2) = 60
    # Outlived: generated + max(1, ceil(0.25 * generated)).
    assert reserved_blocks(100, 60, 60, 16) == blocks_for(100 + 60 + 15, 16) == 11
    assert reserved_blocks(100, 60, 80, 16) == blocks_for(100 + 80 + 20, 16) == 13
    assert reserved_blocks(100, 60, 80, 16, slack=0.0) == blocks_for(100 + 81, 16) == 12
    # Predicted 0 still reserves the first token.
    assert reserved_blocks(16, 0, 0, 16) == 2
    # max_tokens caps the reservation (it can never need more).
    assert reserved_blocks(100, 60, 60, 16, max_tokens=64) == blocks_for(164, 16) == 11
    assert reserved_blocks(100, 500, 0, 16, max_tokens=20) == blocks_for(120, 16) == 8


@pytest.mark.parametrize("prompt,predicted,block,max_tokens", [
    (100, 60, 16, None), (1, 0, 4, None), (37, 3.5, 8, 50), (500, 1000, 16, 300), (5, 12, 1, None)])
def test_reserved_blocks_never_below_held_and_never_shrinks(prompt, predicted, block, max_tokens):
    prev = 0
    for generated in range(0, (max_tokens or 400) + 1):
        r = reserved_blocks(prompt, predicted, generated, block, max_tokens=max_tokens)
        assert r >= blocks_for(prompt + generated, block)                 # what it holds
        if max_tokens is None or generated < max_tokens:
            assert r >= blocks_for(prompt + generated + 1, block)         # and the next step's slot
        assert r >= prev                                                  # never shrinks
        prev = r
    if max_tokens is None:   # outliving the prediction grew it past the prediction
        assert prev > reserved_blocks(prompt, predicted, 0, block)


# ====================================================================== dispatch
def dload(rank: int, free: int, running: int = 0, queued: int = 0) -> WorkerLoad:
    return WorkerLoad(rank, "decode", running, 0, queued, free, 1000)


def pload(rank: int, queued: int) -> WorkerLoad:
    return WorkerLoad(rank, "prefill", 0, 0, queued, 0, 0)


def test_decode_preference_keeps_the_old_form():
    loads = [dload(0, 5), dload(1, 2), dload(2, 9), dload(3, 5)]
    assert decode_preference(loads, 3) == [2, 0, 3]
    assert decode_preference(loads, 0) == [2, 0, 3, 1]


def test_decode_preference_reserves_the_predicted_length():
    # prompt 100 + predicted 60 at block 16: 10 blocks needed.
    loads = [dload(0, 9), dload(1, 10), dload(2, 40), dload(3, 12)]
    pref = decode_preference(loads, prompt_tokens=100, predicted_len=60, block_size=16)
    assert pref == [2, 3, 1]                                   # rank 0 would fit the prompt, not the output
    # KV already promised on rank 2 leaves it 5 blocks of headroom: out.
    assert decode_preference(loads, prompt_tokens=100, predicted_len=60, block_size=16,
                             committed={2: 35}) == [3, 1]
    # Ordering is by headroom after the reservation.
    assert decode_preference(loads, prompt_tokens=100, predicted_len=60, block_size=16,
                             committed={2: 29}) == [3, 2, 1]         # headroom left: 2, 1, 0
    assert decode_preference(loads, prompt_tokens=100, predicted_len=60, block_size=16,
                             committed={2: 29, 3: 1}) == [2, 3, 1]
    with pytest.raises(ValueError, match="block_size"):
        decode_preference(loads, prompt_tokens=100, predicted_len=60)


@pytest.mark.parametrize("seed", range(5))
def test_decode_preference_never_picks_a_worker_short_of_the_reservation(seed):
    rng = random.Random(seed)
    for _ in range(200):
        loads = [dload(r, rng.randrange(0, 64)) for r in range(rng.randrange(1, 6))]
        committed = {w.rank: rng.randrange(0, 8) for w in loads}
        prompt, predicted, block = rng.randrange(1, 300), rng.uniform(0, 300), rng.choice([1, 4, 16])
        need = reserved_blocks(prompt, predicted, 0, block)
        pref = decode_preference(loads, prompt_tokens=prompt, predicted_len=predicted, block_size=block,
                                 committed=committed)
        by_rank = {w.rank: w for w in loads}
        headroom = [by_rank[r].free_blocks - committed[r] for r in pref]
        assert all(h >= need for h in headroom)
        assert headroom == sorted(headroom, reverse=True)
        assert set(pref) == {w.rank for w in loads if w.free_blocks - committed[w.rank] >= need}


C, X = 1e-4, 5e-5   # prefill and transfer seconds per token


def test_short_prompt_prefills_locally_when_the_pools_are_idle():
    # remote = 100 * (C + X) = 0.015 s; local = 100 * C = 0.010 s
    assert should_prefill_locally(100, dload(0, 50, running=32), [pload(1, 0), pload(2, 0)], X, C, 256)


def test_short_prompt_goes_remote_when_the_decode_worker_has_local_prefills_queued():
    # local = (2000 + 100) * C = 0.21 s > remote 0.015 s
    assert not should_prefill_locally(100, dload(0, 50, queued=2000), [pload(1, 0)], X, C, 256)


def test_long_prompt_goes_remote_when_it_would_stall_running_decodes():
    # remote = 4000 * (C + X) = 0.6 s; local = 0.4 + 8 * (4000 - 256) * C = 3.39 s
    assert not should_prefill_locally(4000, dload(0, 500, running=8), [pload(1, 0)], X, C, 256)
    # With nothing decoding there, it is just compute vs compute + transfer: local.
    assert should_prefill_locally(4000, dload(0, 500, running=0), [pload(1, 0)], X, C, 256)


def test_long_prompt_goes_local_when_the_prefill_pool_is_backed_up():
    # remote = 100_000 * C + 0.6 = 10.6 s (the least-loaded queue counts) > local 3.39 s
    backed_up = [pload(1, 100_000), pload(2, 150_000)]
    assert should_prefill_locally(4000, dload(0, 500, running=8), backed_up, X, C, 256)
    # One idle prefill worker in the pool is enough to keep it remote.
    assert not should_prefill_locally(4000, dload(0, 500, running=8), backed_up + [pload(3, 0)], X, C, 256)


def test_prefill_locally_edge_cases():
    assert should_prefill_locally(10_000, dload(0, 500, running=64), [], X, C, 256)   # no prefill worker
    # A free transfer makes it a tie for a short prompt on idle pools: stays disaggregated.
    assert not should_prefill_locally(100, dload(0, 50), [pload(1, 0)], 0.0, C, 256)


# ====================================================================== scheduler hook
def sched(ordering=None, clock=None, predicted=None, num_blocks=64, block_size=4, max_num_seqs=256):
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048)
    kw = {}
    if clock is not None:
        kw["clock"] = lambda: clock[0]
    if predicted is not None:
        kw["predicted_len"] = lambda r: predicted[r.request_id]
    return Scheduler(cfg, BlockManager(num_blocks, block_size), 1024, ordering=ordering, **kw)


def rq(rid: str, arrival: float, prompt: int = 4, max_tokens: int = 100) -> Request:
    return Request(rid, [3] * prompt, SamplingParams(max_tokens=max_tokens), eos_token_ids=(1,),
                   arrival_time=arrival)


PRED = {"long1": 500, "long2": 400, "short1": 10, "short2": 20}


def admitted(s: Scheduler) -> list[str]:
    out = s.schedule()
    s.update(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    s.bm.check_integrity()
    return [x.request.request_id for x in out.scheduled]


@pytest.mark.parametrize("ordering,expect", [
    (None, ["long1", "long2"]),
    (FCFS(), ["long1", "long2"]),
    (ShortestPredictedFirst(aging_rate=0.0, max_wait_s=100.0), ["short1", "short2"]),
])
def test_scheduler_admits_in_policy_order_when_capacity_is_limited(ordering, expect):
    s = sched(ordering, clock=[5.0], predicted=PRED, max_num_seqs=2)
    for i, rid in enumerate(["long1", "long2", "short1", "short2"]):
        s.add(rq(rid, float(i)))
    assert admitted(s) == expect
    assert sorted(r.request_id for r in s.waiting) == sorted(set(PRED) - set(expect))


def test_scheduler_fcfs_policy_orders_by_arrival_not_insertion():
    s = sched(FCFS(), clock=[5.0], max_num_seqs=2)
    for rid, t in [("b", 2.0), ("c", 3.0), ("a", 1.0)]:
        s.add(rq(rid, t))
    assert admitted(s) == ["a", "b"]
    s2 = sched(None, max_num_seqs=2)                          # default: queue (insertion) order
    for rid, t in [("b", 2.0), ("c", 3.0), ("a", 1.0)]:
        s2.add(rq(rid, t))
    assert admitted(s2) == ["b", "c"]


def test_scheduler_policy_pick_that_does_not_fit_blocks_the_rest():
    # 4 blocks of 4 tokens; "big" (13 tokens: 4 blocks) is SPF's pick but 1 block is taken.
    s = sched(ShortestPredictedFirst(aging_rate=0.0, max_wait_s=100.0), clock=[0.0],
              predicted={"x": 1, "big": 1, "small": 50}, num_blocks=4)
    s.add(rq("x", 0.0, prompt=2))
    assert admitted(s) == ["x"]
    s.add(rq("big", 0.0, prompt=13))
    s.add(rq("small", 0.0, prompt=2))
    assert admitted(s) == ["x"]                              # small would fit, but no skipping
    assert [r.request_id for r in s.waiting] == ["big", "small"]


def test_scheduler_overdue_request_is_admitted_first_with_the_fake_clock():
    clock = [3.0]
    s = sched(ShortestPredictedFirst(aging_rate=0.0, max_wait_s=5.0), clock=clock,
              predicted={"long": 1000, "short1": 10, "short2": 10}, max_num_seqs=1)
    s.add(Request("long", [3] * 4, SamplingParams(max_tokens=1), arrival_time=0.0))
    s.add(Request("short1", [3] * 4, SamplingParams(max_tokens=1), arrival_time=1.0))
    assert admitted(s) == ["short1"]                          # t=3: long waited 3 < 5
    s.add(Request("short2", [3] * 4, SamplingParams(max_tokens=1), arrival_time=2.0))
    clock[0] = 6.0
    assert admitted(s) == ["long"]                            # t=6: long overdue, goes before short2
    assert admitted(s) == ["short2"]
    assert not s.has_unfinished()


def test_scheduler_preempted_requests_keep_the_front_under_a_policy():
    # Same scene as test_scheduler's preemption test, with SPF preferring the newcomer.
    s = sched(ShortestPredictedFirst(aging_rate=0.0, max_wait_s=100.0), clock=[0.0],
              predicted={**{r: 100 for r in "abcde"}, "late": 1}, num_blocks=5, block_size=2)
    for r in "abcde":
        s.add(rq(r, 0.0, prompt=2))
    assert admitted(s) == list("abcde")
    s.add(rq("late", 1.0, prompt=1))
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["e", "d", "c"]
    s.update(out, {})
    s.abort("a"), s.abort("b")                                 # free the cache
    # c, d (preempted, 3 tokens = 2 blocks each) go first; e does not fit and blocks "late".
    assert admitted(s) == ["c", "d"]
    assert [r.request_id for r in s.waiting] == ["e", "late"]
