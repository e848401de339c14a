"""Prefix caching on the disaggregated path, in one process: a PrefillWorker and a DecodeWorker on a
tiny checkpoint, joined by a loopback channel (no Ray, no torch.distributed).

A conversation's next turn is reserved on the decode worker that served the last one: it reuses
the blocks it kept (prompt and answer), the prefill worker computes only what its own cache
lacks, and only the positions the decode worker lacks cross the channel. Outputs equal the
colocated engine's with the cache off, also when the transfer is corrupted (the decode worker
recomputes after the prefix it held).
"""
from __future__ import annotations

import pytest
import torch

from loopback import LoopbackHub
from disagg.messages import PrefillRequest, Reserve, decode, encode, params_to_dict
from disagg.request import SamplingParams

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _tokens(seed, n):
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def pair(tiny_ckpts):
    from decode.worker import DecodeWorker
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvtransfer.codec import get_codec
    from prefill.worker import PrefillWorker

    def make(corrupt: float = 0.0):
        cfg = EngineConfig(tiny_ckpts("llama_gqa"), dtype="float32", device="cpu",
                           cache=CacheConfig(block_size=4, num_blocks=128),
                           scheduler=SchedulerConfig(max_num_batched_tokens=32))
        hub = LoopbackHub()
        ch0 = hub.endpoint(0)
        if corrupt:
            from kvtransfer.faults import CorruptingChannel
            ch0 = CorruptingChannel(ch0, corrupt)
        dw = DecodeWorker(cfg, 1, hub.endpoint(1), get_codec("none"))
        pw = PrefillWorker(cfg, 0, ch0, get_codec("none"), lambda dest, msg: dw.control(decode(encode(msg))))
        return pw, dw
    return make


def _serve(pw, dw, rid, prompt, params=PARAMS):
    """What the router does: Reserve (with the prompt) on the decode worker, then PrefillRequest with
    the tokens it already holds; returns (tokens, decode-held tokens)."""
    reply = dw.reserve(Reserve(rid, len(prompt), 10.0, params.max_tokens, list(prompt), params.cache_salt))
    assert reply.ok
    pw.submit(PrefillRequest(rid, list(prompt), params_to_dict(params), 1,
                             num_dest_cached_tokens=reply.num_cached_tokens))
    toks = []
    for _ in range(400):
        pw.run_step()
        dw.run_step()
        for o in pw.take_outputs(0) + dw.take_outputs(0):
            assert o.request_id == rid and not o.error
            toks += o.new_token_ids
            if o.finish_reason:
                return toks, reply.num_cached_tokens
    raise AssertionError("no progress")


def _sent_tokens(pw) -> int:
    mc = pw.model_cfg
    return pw.sender.stats.bytes_raw // (2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4)


@pytest.mark.parametrize("corrupt", [0.0, 1.0], ids=["clean", "corrupted"])
def test_next_turn_transfers_only_what_the_decode_worker_lacks(tiny_ckpts, pair, corrupt):
    from conftest import make_engine
    pw, dw = pair(corrupt)
    a = _tokens(1, 37)
    ref_eng = make_engine(tiny_ckpts("llama_gqa"))
    ref_a = ref_eng.generate([a], PARAMS)[0].output_token_ids

    out_a, held = _serve(pw, dw, "t1", a)
    assert out_a == ref_a and held == 0
    assert _sent_tokens(pw) == 37
    assert pw.scheduler.prefix_stats.hits == 0

    b = a + out_a + _tokens(2, 6)                     # 37 + 10 + 6 = 53 tokens
    ref_b = ref_eng.generate([b], PARAMS)[0].output_token_ids
    out_b, held = _serve(pw, dw, "t2", b)
    assert out_b == ref_b
    # the decode worker computed 37 + 10 - 1 = 46 tokens of turn 1: 11 full blocks stay cached
    assert held == 44
    assert _sent_tokens(pw) == 37 + (53 - 44)
    # the prefill worker only ever saw turn 1's prompt: 9 full blocks of it
    assert (pw.scheduler.prefix_stats.queries, pw.scheduler.prefix_stats.hits) == (37 + 53, 36)
    assert (dw.engine.scheduler.prefix_stats.queries, dw.engine.scheduler.prefix_stats.hits) == (37 + 53, 44)
    if corrupt:
        assert dw.fallbacks == 2                      # both turns recomputed on the decode side
    load = dw.load()
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (90, 44)
    for bm in (pw.bm, dw.engine.block_manager):
        bm.check_integrity()
        assert bm.num_free_blocks == bm.num_blocks
        assert bm.num_cached_blocks > 0


def test_shared_system_prompt_and_salts(tiny_ckpts, pair):
    from conftest import make_engine
    pw, dw = pair()
    system = _tokens(3, 40)
    ref = make_engine(tiny_ckpts("llama_gqa"))
    for i, salt in enumerate([None, None, "tenant", "tenant", None]):
        sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, cache_salt=salt)
        prompt = system + _tokens(10 + i, 5)
        sent_before = _sent_tokens(pw)
        out, held = _serve(pw, dw, f"r{i}", prompt, sp)
        assert out == ref.generate([prompt], sp)[0].output_token_ids
        # the first request of each salt finds nothing; later ones hold the system prompt's 10 blocks
        assert held == (0 if i in (0, 2) else 40), i
        assert _sent_tokens(pw) - sent_before == 45 - held
    dw.engine.block_manager.check_integrity()
    pw.bm.check_integrity()
