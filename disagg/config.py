"""Frozen config dataclasses, one per role, validated in __post_init__.

ModelConfig is read from a Hugging Face `config.json` (Llama family: Llama 2/3,
Mistral, Qwen2, SmolLM2). CacheConfig / SchedulerConfig / EngineConfig describe the
colocated engine; later roles (prefill, decode, router) add their own.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; use one of float32, float16, bfloat16") from None


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (the only rope_scaling type the Llama family ships)."""
    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("llama3", "default"):
            raise ValueError(f"unsupported rope_scaling type {self.rope_type!r} (supported: llama3)")


@dataclass(frozen=True)
class ModelConfig:
    arch: str                      # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False   # q/k/v biases (Qwen2)
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.kv_size * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name: str = "model") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHS[a] for a in archs if a in SUPPORTED_ARCHS), None)
        if arch is None:
            mt = cfg.get("model_type")
            if mt in ("llama", "mistral", "qwen2"):
                arch = mt
            else:
                raise ValueError(f"unsupported architecture {archs or mt!r}; supported: {sorted(SUPPORTED_ARCHS)}")
        nh = cfg["num_attention_heads"]
        # Older checkpoints: rope_theta + rope_scaling; transformers >= 5 writes rope_parameters.
        rp = cfg.get("rope_parameters") or {}
        rs = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        rope_scaling = None
        if rs:
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rtype != "default":
                rope_scaling = RopeScaling(
                    rope_type=rtype, factor=float(rs.get("factor", 8.0)),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope_theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=nh,
            num_kv_heads=cfg.get("num_key_value_heads") or nh,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // nh,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            rope_scaling=rope_scaling,
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{model_dir!r} is not a Hugging Face checkpoint directory: no config.json")
        with open(path) as f:
            cfg = json.load(f)
        return cls.from_hf_dict(cfg, name=os.path.basename(os.path.normpath(model_dir)))


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: `num_blocks` blocks of `block_size` tokens for every layer."""
    block_size: int = 16
    num_blocks: int | None = None          # None: size from gpu_memory_utilization / cpu_kv_gib
    gpu_memory_utilization: float = 0.90   # fraction of GPU memory for weights + activations + KV
    cpu_kv_gib: float = 1.0                # KV budget on CPU
    enable_prefix_caching: bool = True     # keep full blocks keyed by their prefix for reuse (vLLM v1's default)

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a positive power of two")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ValueError("gpu_memory_utilization must be in [0.05, 0.99]")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256              # most requests in one step
    max_num_batched_tokens: int = 2048   # token budget of one step (decode tokens + prefill chunks)
    max_model_len: int | None = None     # None: the model's max_position_embeddings
    ordering: str = "fcfs"               # which waiting request is admitted next: fcfs | spf
    aging_rate: float = 20.0             # spf: predicted tokens forgiven per second waited
    max_wait_s: float = 10.0             # spf: after this wait a request goes first (no starvation)

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.ordering not in ("fcfs", "spf"):
            raise ValueError("ordering must be 'fcfs' or 'spf'")


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    dtype: str | None = None             # None: bf16 on GPU (fp16 if no bf16), float32 on CPU
    device: str | None = None            # None: cuda if available
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    use_triton: bool | None = None       # None: Triton kernels on CUDA, torch reference on CPU
    use_cuda_graphs: bool = True
    piecewise_max_tokens: int = 2048     # steps with prefill chunks up to this many tokens replay
                                         # piecewise CUDA graphs (disagg/engine/piecewise.py); 0: eager
    load_format: str = "auto"            # "auto": the checkpoint's safetensors; "dummy": random weights
    seed: int = 0

    def __post_init__(self):
        if self.load_format not in ("auto", "dummy"):
            raise ValueError("load_format must be 'auto' or 'dummy'")
        if self.dtype is not None:
            parse_dtype(self.dtype)

    @property
    def torch_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype:
            return parse_dtype(self.dtype)
        if self.torch_device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
