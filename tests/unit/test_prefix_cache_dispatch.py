"""The cluster dispatcher with cache-aware routing (a mirror PrefixIndex) against least-loaded picks."""
from __future__ import annotations

import asyncio

from disagg.deploy.dispatch import Dispatcher
from disagg.messages import ReserveReply, WorkerLoad
from router.policy import FCFS
from router.prefix_index import PrefixIndex


def _dispatcher(cache_aware: bool) -> Dispatcher:
    d = Dispatcher([0, 1], [2, 3], FCFS(), block_size=4, kv_bytes_per_token=1000.0,
                   default_prefill_s_per_token=1e-4, local_prefill="never")
    if cache_aware:
        d.prefix = PrefixIndex(4)
    d.loads = {0: WorkerLoad(0, "prefill", 0, 0, 100, 500, 500), 1: WorkerLoad(1, "prefill", 0, 0, 0, 500, 500),
               2: WorkerLoad(2, "decode", 0, 0, 0, 400, 500), 3: WorkerLoad(3, "decode", 0, 0, 0, 380, 500)}
    return d


def test_prefill_pick_goes_where_the_prefix_is():
    prompt = list(range(3, 403))                      # 400 tokens; worker 0 holds 300 of them
    for cache_aware, expect in ((False, 1), (True, 0)):
        d = _dispatcher(cache_aware)
        keys = d.keys(prompt)
        assert bool(keys) == cache_aware
        d.holds(0, d.keys(prompt[:300]))
        assert d.cached_tokens([0, 1], keys, len(prompt)) == ({0: 300, 1: 0} if cache_aware else {})
        # 100 queued + 100 uncached on worker 0 against 0 + 400 on worker 1
        assert d.pick_prefill(keys, len(prompt)) == expect


def test_reserve_carries_the_prompt_and_the_decode_pick_follows_the_history():
    prompt = list(range(3, 103))
    sent = []

    async def reserve(rank, msg):
        sent.append((rank, msg))
        return ReserveReply(msg.request_id, True, 300, num_cached_tokens=96 if rank == 3 else 0)

    for cache_aware, expect in ((False, 2), (True, 3)):
        d = _dispatcher(cache_aware)
        d.holds(3, d.keys(prompt))                    # worker 3 kept this conversation (25 blocks)
        rank, local = asyncio.run(d.acquire("r", len(prompt), 10.0, 10, reserve, prompt_ids=prompt,
                                            keys=d.keys(prompt)))
        assert (rank, local) == (expect, False)       # 380 free + 24 held beats 400 free only when cache-aware
        assert sent[-1][1].prompt_token_ids == prompt
        assert d.dest_cached.pop("r") == (96 if expect == 3 else 0)


def test_a_finished_prefill_stops_counting_as_load_on_its_worker():
    """A conversation's next turn, sent right after the previous one: the previous turn's bump must
    not make the worker that caches the history look busier than the other."""
    d = _dispatcher(True)
    d.loads[0] = WorkerLoad(0, "prefill", 0, 0, 0, 500, 500)
    turn1 = list(range(3, 203))
    turn2 = turn1 + list(range(500, 520))
    k1 = d.keys(turn1)
    assert d.pick_prefill(k1, len(turn1)) == 0
    d.bump(0, tokens=len(turn1))
    d.holds(0, k1)
    k2 = d.keys(turn2)
    assert d.pick_prefill(k2, len(turn2)) == 1        # still counted: 200 + 220 - 200 ties 220, 1 request more
    d.prefill_done(0, len(turn1))                     # its first token came back
    assert d.pick_prefill(k2, len(turn2)) == 0
    assert d.loads[0].queued_prompt_tokens == 0 and d.loads[0].num_waiting == 0


def test_a_load_report_older_than_a_received_first_token_is_ignored():
    d = _dispatcher(True)
    d.loads[0] = WorkerLoad(0, "prefill", 0, 0, 0, 500, 500)
    for _ in range(4):                                # 4 prompts sent to rank 0, their first tokens back
        d.bump(0, tokens=200)
        d.prefill_done(0, 200)
    stale = WorkerLoad(0, "prefill", 1, 0, 200, 500, 500, num_prompts_done=3)   # taken before the 4th finished
    assert not d.report(0, stale) and d.loads[0].queued_prompt_tokens == 0
    fresh = WorkerLoad(0, "prefill", 0, 1, 50, 500, 500, num_prompts_done=4)
    assert d.report(0, fresh) and d.loads[0] is fresh
    assert d.report(2, WorkerLoad(2, "decode", 0, 0, 0, 1, 500))     # decode reports are always taken


def test_waiting_requests_are_woken_when_the_head_leaves():
    """Only the ordering's head may reserve; the others must move as soon as it is done, not after
    their backoff (a 60 s backoff here: without the wake-ups the queue would hang the test)."""
    d = _dispatcher(False)
    d.first_backoff_s = d.max_backoff_s = 60.0
    order = []

    async def reserve(rank, msg):
        await asyncio.sleep(0.01)                     # a Reserve RPC in flight while the others queue
        order.append(msg.request_id)
        return ReserveReply(msg.request_id, True, 300)

    async def main():
        tasks = []
        for i in range(20):
            tasks.append(asyncio.create_task(d.acquire(f"r{i}", 8, 4.0, 4, reserve)))
            await asyncio.sleep(0)                    # arrive in order
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    asyncio.run(main())
    assert order == [f"r{i}" for i in range(20)]      # FCFS kept
