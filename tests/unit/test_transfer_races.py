"""Races on the KV path, in one process (a PrefillWorker and a DecodeWorker on a loopback
channel): an abort that overtakes its request's TransferPlan must neither crash the decode
worker nor desynchronise the wire for the next request."""
from __future__ import annotations

import torch

from conftest import make_engine
from loopback import LoopbackHub
from disagg.messages import PrefillRequest, Reserve, decode, encode, params_to_dict
from disagg.request import SamplingParams

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _workers(model_dir, stamp_epoch: int | None = None):
    """A PrefillWorker (rank 0) and a DecodeWorker (rank 1) on one loopback hub; stamp_epoch: the
    prefill's messages carry that epoch (as the deploy layer stamps a restarted process's)."""
    from dataclasses import replace

    from decode.worker import DecodeWorker
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvtransfer.codec import get_codec
    from prefill.worker import PrefillWorker
    cfg = EngineConfig(model_dir, dtype="float32", device="cpu", cache=CacheConfig(block_size=4, num_blocks=128),
                       scheduler=SchedulerConfig(max_num_batched_tokens=64))
    hub = LoopbackHub()
    dw = DecodeWorker(cfg, 1, hub.endpoint(1), get_codec("none"))

    def send(dest, msg):
        dw.control(decode(encode(msg if stamp_epoch is None else replace(msg, epoch=stamp_epoch))))
    pw = PrefillWorker(cfg, 0, hub.endpoint(0), get_codec("none"), send)
    return pw, dw


def _serves_exactly(model_dir, pw, dw, rid, prompt) -> None:
    """Reserve, prefill and decode `prompt` through the pair: the colocated engine's tokens."""
    want = make_engine(model_dir).generate([prompt], PARAMS)[0].output_token_ids
    assert dw.reserve(Reserve(rid, len(prompt))).ok
    pw.submit(PrefillRequest(rid, prompt, params_to_dict(PARAMS), 1))
    toks = []
    for _ in range(100):
        pw.run_step()
        dw.run_step()
        for o in pw.take_outputs(0) + dw.take_outputs(0):
            assert not o.error
            toks += o.new_token_ids
        if len(toks) == PARAMS.max_tokens:
            break
    assert toks == want


def _prompt(seed, n):
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_abort_that_overtakes_its_transfer_plan(tiny_ckpts):
    d = tiny_ckpts("llama_gqa")
    pw, dw = _workers(d)
    a, b = _prompt(1, 23), _prompt(2, 17)
    assert dw.reserve(Reserve("a", len(a))).ok
    pw.submit(PrefillRequest("a", a, params_to_dict(PARAMS), 1))
    dw.control("a")              # the client left: the abort reaches the decode side first
    dw.run_step()                # reservation dropped (no plan known yet)
    assert "a" not in dw.reserved
    pw.run_step()                # the prefill computes "a" and streams its plan and KV anyway
    for _ in range(5):
        dw.run_step()            # must receive (and discard) a's KV without crashing
    pw.take_outputs(0)
    assert not dw.receiver.pending and dw.take_outputs(0) == []
    bm = dw.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks

    # the wire is still in step: the next request is served exactly
    _serves_exactly(d, pw, dw, "b", b)


def test_messages_from_a_restarted_prefills_old_process_are_dropped(tiny_ckpts):
    """The prefill rank died after streaming "a" (its TransferPlan and PlanDone still on their way)
    and came back: the decode worker re-formed the pair (reset_peer, epoch 1). Its predecessor's
    messages, delivered after that, must not be taken for the new process's: plan ids restart from 0,
    so "a"'s stale plan 0 would be matched with the new process's plan 0 (another request's KV)."""
    from disagg.messages import PlanDone, TransferPlan
    d = tiny_ckpts("llama_gqa")
    pw, dw = _workers(d, stamp_epoch=1)
    a, b = _prompt(3, 23), _prompt(4, 17)
    assert dw.reserve(Reserve("a", len(a))).ok
    dw.reset_peer(0, epoch=1)
    dw.control(TransferPlan(0, 0, ["a"], [len(a)], "none", epoch=0))
    dw.control(PlanDone(0, 0, [5], [params_to_dict(PARAMS)], [a], epoch=0))
    dw.run_step()
    out = dw.take_outputs(0)
    assert [(o.request_id, o.finish_reason) for o in out] == [("a", "retry")]
    assert "a" not in dw.reserved and not dw.plans[0] and not dw.done_msgs and not dw.receiver.pending

    # the new process (epoch 1) numbers its plans from 0 again: "b" is served exactly
    _serves_exactly(d, pw, dw, "b", b)
