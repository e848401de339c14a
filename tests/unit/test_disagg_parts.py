"""Disaggregation parts on CPU: messages, handshake, codec choice, the prefilled-request path."""
from __future__ import annotations

import msgpack
import pytest
import torch

from conftest import make_engine
from disagg.messages import (Handshake, PlanDone, PrefillRequest, TokenOutput, decode, decode_many, encode,
                             encode_many, params_from_dict, params_to_dict)
from disagg.request import FinishReason, SamplingParams
from kvtransfer.codec_select import choose_codec
from kvtransfer.handshake import HandshakeError, check_compatible


def test_messages_round_trip_and_reject_foreign_bytes():
    sp = SamplingParams(max_tokens=9, temperature=0.5, top_p=0.8, top_k=3, seed=4, stop=("x", "yz"),
                        stop_token_ids=(7,), ignore_eos=True, logprobs=2)
    m = PrefillRequest("r1", [1, 2, 3], params_to_dict(sp), 3)
    back = decode(encode(m), PrefillRequest)
    assert back == m and params_from_dict(back.params) == sp
    many = [TokenOutput("a", [1], 3, 1), PlanDone(0, 5, [9], [params_to_dict(sp)], [[1, 2]])]
    assert decode_many(encode_many(many)) == many
    with pytest.raises(ValueError, match="unknown control message"):
        decode(msgpack.packb(["os.system", {"cmd": "rm"}]))
    with pytest.raises(ValueError, match="expected PrefillRequest"):
        decode(encode(TokenOutput("a", [], 1, 0)), PrefillRequest)
    with pytest.raises(ValueError, match="do not match"):
        decode(msgpack.packb(["TokenOutput", {"request_id": "a", "evil": 1}]))
    with pytest.raises(ValueError, match="malformed"):
        decode(b"\xc1garbage")
    with pytest.raises(TypeError):
        encode({"not": "a message"})


def test_handshake_refuses_mismatch_with_every_difference_named():
    a = Handshake("llama", 32, 8, 128, "bfloat16", 16, "fp8")
    check_compatible(a, Handshake("llama", 32, 8, 128, "bfloat16", 32, "fp8"))  # block size is per side
    with pytest.raises(HandshakeError) as e:
        check_compatible(a, Handshake("qwen", 32, 8, 128, "float16", 16, "none"))
    msg = str(e.value)
    assert "model" in msg and "dtype" in msg and "codec" in msg and "num_layers" not in msg


def test_codec_choice_follows_the_link():
    measured = {"none": {"encode_s": 1e-5, "decode_s": 1e-5, "wire_bytes": 8e6, "raw_bytes": 8e6},
                "fp8": {"encode_s": 2e-5, "decode_s": 2e-5, "wire_bytes": 4.1e6, "raw_bytes": 8e6},
                "int4": {"encode_s": 3e-5, "decode_s": 3e-5, "wire_bytes": 2.3e6, "raw_bytes": 8e6}}
    fast, _ = choose_codec(measured, 300e9)      # NVLink: moving the bytes costs less than compressing
    slow, times = choose_codec(measured, 4e9)    # a 35 Gb/s network: compression pays
    assert fast == "none" and slow == "fp8"
    assert "int4" not in times                   # int4 is outside auto's quality bound


def _prompt(seed, n):
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kv_ok", [True, False])
def test_prefilled_request_continues_like_colocated(tiny_ckpts, kv_ok):
    """A decode engine given the prompt's KV (or, when the transfer failed, garbage it must not use)
    and the first token continues exactly as the colocated engine does."""
    d = tiny_ckpts("llama_gqa")
    p = _prompt(1, 21)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = make_engine(d).generate([p], sp)[0].output_token_ids

    prefill = make_engine(d)
    pr = prefill.add_request(p, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    while prefill.has_unfinished():
        prefill.step()
    assert pr.output_token_ids == ref[:1]

    dec = make_engine(d)
    assert dec.reserve("r", len(p))
    kv = dec.runner.kv_cache
    if kv_ok:   # copy the prompt's KV from the prefill engine's blocks into the reserved ones
        src = prefill.runner.kv_cache
        pr2 = prefill.add_request(p, SamplingParams(max_tokens=1, temperature=0))
        prefill.runner.execute(prefill.scheduler.schedule())   # one step writes the whole prompt's KV
        src_table = prefill.block_manager.block_table(pr2.request_id)
        for i, b in enumerate(dec.block_table("r")):
            kv[:, :, b] = src[:, :, src_table[i]]
    else:
        kv.normal_()    # what a corrupt transfer would leave behind
    assert dec.add_prefilled("r", p, ref[0], sp, kv_ok=kv_ok) is None
    req = dec.requests["r"]
    while dec.has_unfinished():
        dec.step()
    assert req.output_token_ids == ref
    dec.block_manager.check_integrity()
    assert dec.block_manager.num_free_blocks == dec.block_manager.num_blocks


def test_first_token_eos_ends_at_once_and_releases(tiny_ckpts):
    dec = make_engine(tiny_ckpts("llama_gqa"))
    assert dec.reserve("r", 10)
    out = dec.add_prefilled("r", _prompt(2, 10), dec.eos_token_ids[0], SamplingParams(max_tokens=5))
    assert out is not None and out.finish_reason == FinishReason.STOP
    assert dec.block_manager.num_free_blocks == dec.block_manager.num_blocks
    assert dec.reserve("q", 10)
    dec.release("q")
    assert dec.block_manager.num_free_blocks == dec.block_manager.num_blocks
