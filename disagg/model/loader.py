"""Load a Hugging Face checkpoint directory's weights (one or several *.safetensors)."""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from safetensors import safe_open


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir!r} "
                                "(only safetensors checkpoints are supported; convert .bin files first)")
    return [os.path.join(model_dir, f) for f in files]


def iter_weights(model_dir: str, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    files = safetensors_files(model_dir)
    bar = None
    if progress:
        from tqdm import tqdm
        total = 0
        for path in files:
            with safe_open(path, framework="pt") as f:
                total += len(list(f.keys()))
        bar = tqdm(total=total, desc="Loading weights", unit="tensor", leave=False)
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()


def dummy_weights(cfg, device, dtype, std: float = 0.02, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights of the checkpoint's shapes, made on `device` (vLLM's `--load-format dummy`).

    For benchmarks of models we do not have: the arithmetic and the bytes are those of the real model.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    h, i = cfg.hidden_size, cfg.intermediate_size
    yield "model.embed_tokens.weight", rnd(cfg.vocab_size, h)
    yield "model.norm.weight", torch.ones(h, device=device, dtype=dtype)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", rnd(cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        yield p + "self_attn.q_proj.weight", rnd(cfg.q_size, h)
        yield p + "self_attn.k_proj.weight", rnd(cfg.kv_size, h)
        yield p + "self_attn.v_proj.weight", rnd(cfg.kv_size, h)
        yield p + "self_attn.o_proj.weight", rnd(h, cfg.q_size)
        if cfg.attention_bias:
            for x, size in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
                yield p + f"self_attn.{x}_proj.bias", rnd(size)
        yield p + "mlp.gate_proj.weight", rnd(i, h)
        yield p + "mlp.up_proj.weight", rnd(i, h)
        yield p + "mlp.down_proj.weight", rnd(h, i)
        yield p + "input_layernorm.weight", torch.ones(h, device=device, dtype=dtype)
        yield p + "post_attention_layernorm.weight", torch.ones(h, device=device, dtype=dtype)
