"""Colocated engine on tiny random checkpoints: HF equality, batching, chunking, preemption, abort."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_VARIANTS, hf_greedy, make_engine
from disagg.request import FinishReason, SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def _prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_greedy_matches_hf(tiny_ckpts, variant):
    import transformers
    d = tiny_ckpts(variant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    eng = make_engine(d, budget=16)   # budget 16: the 33-token prompt is prefilled in 3 chunks
    prompts = _prompts(1, (5, 17, 33, 1))
    reqs = eng.generate(prompts, GREEDY)
    for p, r in zip(prompts, reqs):
        assert r.output_token_ids == hf_greedy(hf, p, 20), f"{variant}: prompt of {len(p)} tokens"
    eng.block_manager.check_integrity()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_sharded_checkpoint_loads_and_matches(tiny_ckpts):
    import transformers
    d = tiny_ckpts("llama_gqa", shards=True)
    import os
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    eng = make_engine(d)
    p = _prompts(2, (11,))[0]
    assert eng.generate([p], GREEDY)[0].output_token_ids == hf_greedy(hf, p, 20)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_close_to_hf(tiny_ckpts, dtype):
    """bf16/fp16 checkpoints load and run in their dtype; last-position logits match HF's within rounding."""
    import transformers
    d = tiny_ckpts("qwen2_bias", dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    eng = make_engine(d, dtype=str(dtype).split(".")[-1])
    assert eng.runner.dtype == dtype
    p = _prompts(3, (23,))[0]
    ref = hf(torch.tensor([p])).logits[0, -1].float()
    from disagg.model.llama import AttnMetadata, PrefillSeq
    n = len(p)
    dev = eng.runner.device
    slots = torch.arange(n, device=dev)   # blocks 0.. in order
    meta = AttnMetadata(slot_mapping=slots,
                        prefills=[PrefillSeq(0, n, n, torch.arange(-(-n // 4), device=dev))])
    h = eng.runner.model.forward(torch.tensor(p, device=dev), torch.arange(n, device=dev), meta,
                                 eng.runner.kv_caches)
    ours = eng.runner.model.compute_logits(h[-1:])[0].cpu()
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


def test_batch_equals_alone(tiny_ckpts):
    d = tiny_ckpts("llama_gqa")
    prompts = _prompts(4, (3, 40, 9, 27, 1, 64, 15))
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (5, 30, 12, 1, 25, 8, 17)]
    alone = [make_engine(d).generate([p], sp)[0].output_token_ids for p, sp in zip(prompts, params)]
    eng = make_engine(d, budget=32)
    batched = eng.generate(prompts, params)
    assert [r.output_token_ids for r in batched] == alone
    assert [len(a) for a in alone] == [5, 30, 12, 1, 25, 8, 17]


def test_requests_arriving_mid_run_equal_alone(tiny_ckpts):
    """Continuous batching: requests joining a running batch get the same tokens as alone."""
    d = tiny_ckpts("tied")
    prompts = _prompts(5, (12, 30, 7))
    alone = [make_engine(d).generate([p], GREEDY)[0].output_token_ids for p in prompts]
    eng = make_engine(d, budget=8)
    reqs = [eng.add_request(prompts[0], GREEDY)]
    for _ in range(6):
        eng.step()
    reqs.append(eng.add_request(prompts[1], GREEDY))
    for _ in range(3):
        eng.step()
    reqs.append(eng.add_request(prompts[2], GREEDY))
    while eng.has_unfinished():
        eng.step()
    assert [r.output_token_ids for r in reqs] == alone


def test_preemption_recomputes_to_same_output(tiny_ckpts):
    d = tiny_ckpts("llama_gqa")
    prompts = _prompts(6, (20, 20, 20, 20))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    alone = [make_engine(d).generate([p], params)[0].output_token_ids for p in prompts]
    # 4 requests x 60 tokens need 60 blocks of 4; give 40 so some must be preempted and recomputed.
    eng = make_engine(d, num_blocks=40, budget=64)
    reqs = eng.generate(prompts, params)
    assert sum(r.num_preemptions for r in reqs) > 0
    assert [r.output_token_ids for r in reqs] == alone
    eng.block_manager.check_integrity()
    assert eng.block_manager.num_free_blocks == 40


def test_abort_running_request_frees_blocks(tiny_ckpts):
    eng = make_engine(tiny_ckpts("llama_gqa"))
    a = eng.add_request(_prompts(7, (30,))[0], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    b = eng.add_request(_prompts(8, (10,))[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.block_manager.has(a.request_id)
    out = eng.abort(a.request_id)
    assert out.finish_reason == FinishReason.ABORT and a.finish_reason == FinishReason.ABORT
    assert not eng.block_manager.has(a.request_id)
    while eng.has_unfinished():
        eng.step()
    assert b.num_output_tokens == 5
    eng.block_manager.check_integrity()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert eng.abort("no-such-request") is None


def test_eos_max_tokens_and_stop_token_ids(tiny_ckpts):
    eng = make_engine(tiny_ckpts("llama_gqa"))
    p = _prompts(9, (10,))[0]
    free_run = eng.generate([p], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].output_token_ids
    stop_tok = free_run[5]
    first = free_run.index(stop_tok)
    r = eng.generate([p], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop_tok,)))[0]
    assert r.output_token_ids == free_run[:first + 1] and r.finish_reason == FinishReason.STOP
    # the same token as the model's eos: stops unless ignore_eos
    eng.eos_token_ids = (stop_tok,)
    r = eng.generate([p], SamplingParams(max_tokens=20, temperature=0))[0]
    assert r.output_token_ids == free_run[:first + 1]
    r = eng.generate([p], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert r.output_token_ids == free_run[:7] and r.finish_reason == FinishReason.LENGTH


def test_stop_string_ends_request_and_cuts_text(tiny_ckpts):
    eng = make_engine(tiny_ckpts("llama_gqa"))
    p = _prompts(10, (10,))[0]
    free = eng.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    words = free.output_text.split()
    stop = words[4]
    r = eng.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)))[0]
    assert r.finish_reason == FinishReason.STOP
    assert stop not in r.output_text and free.output_text.startswith(r.output_text)
    assert r.num_output_tokens == words.index(stop) + 1


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_ckpts):
    d = tiny_ckpts("llama_gqa")
    p = _prompts(11, (9,))[0]
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = make_engine(d).generate([p], sp)[0].output_token_ids
    eng = make_engine(d)
    others = [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)] * 3
    b = eng.generate(_prompts(12, (4, 30, 17)) + [p], others + [sp])[-1].output_token_ids
    c = make_engine(d).generate([p], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50,
                                                    seed=99, ignore_eos=True))[0].output_token_ids
    assert a == b
    assert a != c


def test_max_model_len_caps_generation(tiny_ckpts):
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.llm_engine import LLMEngine
    eng = LLMEngine(EngineConfig(tiny_ckpts("llama_gqa"), dtype="float32", cache=CacheConfig(block_size=4, num_blocks=64),
                                 scheduler=SchedulerConfig(max_model_len=32)))
    r = eng.generate(_prompts(13, (20,)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert r.num_tokens == 32 and r.finish_reason == FinishReason.LENGTH
    with pytest.raises(ValueError, match="maximum context length"):
        eng.add_request(list(range(3, 40)), SamplingParams())
