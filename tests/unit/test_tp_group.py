"""A TP leader's step as the followers receive it: the schedule as plain data (through msgpack) gives the
model runner the same flattened batch (token ids, positions, slots, block tables) the leader's gives."""
from __future__ import annotations

from decode.scheduler import ScheduledRequest, SchedulerOutput
from disagg.engine.model_runner import ModelRunner
from disagg.engine.tp_group import schedule_from_items, schedule_items
from disagg.messages import TPStep, decode, encode
from disagg.request import Request, SamplingParams


def test_schedule_round_trip_gives_the_same_batch():
    p = SamplingParams(max_tokens=8)
    dec = Request("d", [5, 6, 7, 8, 9], p, output_token_ids=[10, 11])
    dec.num_computed_tokens = 6                     # decoding: token 11 at position 6
    pre = Request("p", list(range(20, 40)), p)
    pre.num_computed_tokens = 8                     # a middle chunk of a prefill: positions 8..15
    mixed = Request("m", [3, 4, 5], p, output_token_ids=[6, 7, 8])
    mixed.num_computed_tokens = 2                   # recompute after preemption: prompt and outputs in one chunk
    sched = SchedulerOutput([ScheduledRequest(dec, 1, [3, 9]), ScheduledRequest(pre, 8, [1, 4, 7, 2]),
                             ScheduledRequest(mixed, 4, [6, 5])])
    msg = decode(encode(TPStep("exec", items=schedule_items(sched), sends=[[1, [4, 5, 6]]])), TPStep)
    follower = schedule_from_items(msg.items)
    runner = ModelRunner.__new__(ModelRunner)       # _prepare reads only the block size
    runner.block_size = 4
    assert runner._prepare(follower) == runner._prepare(sched)
    assert not any(s.samples for s in follower.scheduled)      # only the leader samples
    assert [s.is_decode for s in follower.scheduled] == [True, False, False]
    assert msg.sends == [[1, [4, 5, 6]]]
