"""Rotary embedding tables: inverse frequencies (with llama3 scaling) and the cos/sin cache."""
from __future__ import annotations

import math

import torch

from disagg.config import ModelConfig


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[D/2] float32, HF's `_compute_default_rope_parameters` / `_compute_llama3_parameters`."""
    d = cfg.head_dim
    freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type == "default":
        return freq
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / rs.factor, freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_cache(cfg: ModelConfig, max_positions: int, device: torch.device) -> torch.Tensor:
    """[max_positions, D] float32: cos of the D/2 frequencies, then their sin."""
    f = inv_freq(cfg).to(device)
    t = torch.arange(max_positions, device=device, dtype=torch.float32)
    freqs = torch.outer(t, f)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()
