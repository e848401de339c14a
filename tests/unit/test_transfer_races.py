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


def _workers(model_dir):
    from decode.worker import DecodeWorker
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvtransfer.codec import get_codec
    from prefill.worker import PrefillWorker
    cfg = EngineConfig(model_dir, dtype="float32", device="cpu", cache=CacheConfig(block_size=4, num_blocks=128),
                       scheduler=SchedulerConfig(max_num_batched_tokens=64))
    hub = LoopbackHub()
    dw = DecodeWorker(cfg, 1, hub.endpoint(1), get_codec("none"))
    pw = PrefillWorker(cfg, 0, hub.endpoint(0), get_codec("none"), lambda dest, msg: dw.control(decode(encode(msg))))
    return pw, dw


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
    want = make_engine(d).generate([b], PARAMS)[0].output_token_ids
    assert dw.reserve(Reserve("b", len(b))).ok
    pw.submit(PrefillRequest("b", b, params_to_dict(PARAMS), 1))
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
