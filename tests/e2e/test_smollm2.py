"""The bundled SmolLM2-135M-Instruct: HF equality on chat prompts, batching, the Paris answer."""
from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, make_engine
from disagg.request import SamplingParams

QUESTIONS = ["What is the capital of France?",
             "Write a haiku about the sea.",
             "List three prime numbers and explain why they are prime.",
             "Translate 'good morning' into Spanish."]


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return make_engine(smollm2_dir, num_blocks=512, block_size=16, budget=256)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)


def test_paris(engine):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    r = engine.generate([ids], SamplingParams(max_tokens=32, temperature=0))[0]
    assert "Paris" in r.output_text
    assert r.finish_reason.value == "stop"     # ends on <|im_end|>


def test_chat_template_matches_hf(smollm2_dir, engine):
    import transformers
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTIONS[2]},
            {"role": "assistant", "content": "2, 3, 5."}, {"role": "user", "content": "Why?"}]
    ref = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert engine.tokenizer.encode_chat(msgs) == list(ref)


def test_greedy_matches_hf_batched(engine, hf_model):
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reqs = engine.generate(prompts, params)    # all four in one continuous batch
    for q, p, r in zip(QUESTIONS, prompts, reqs):
        assert r.output_token_ids == hf_greedy(hf_model, p, 24), q
    engine.block_manager.check_integrity()
