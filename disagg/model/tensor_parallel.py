"""Tensor parallelism inside one worker: the model's heads and MLP split Megatron-style over tp ranks.

    attention:  qkv_proj  column-parallel: rank r computes its query heads and their KV heads
                o_proj    row-parallel:    partial [T, H] sums  ── all-reduce ──▶ full output
    MLP:        gate_up   column-parallel: rank r computes I/tp of the intermediate features
                down      row-parallel:    partial [T, H] sums  ── all-reduce ──▶ full output
    replicated: embeddings, norms, LM head, the residual stream (identical on every rank)

Head assignment (Hq query heads, Hkv KV heads, group size G = Hq / Hkv):

    query heads of rank r:  [r * Hq/tp, (r+1) * Hq/tp)
    KV heads of rank r:     Hkv >= tp: [r * Hkv/tp, (r+1) * Hkv/tp)   (split)
                            Hkv <  tp: the one head r // (tp/Hkv)     (replicated on tp/Hkv ranks)

    Hq=8, Hkv=2, tp=4:   rank      0     1     2     3
                         q heads  0,1   2,3   4,5   6,7
                         KV head   0     0     1     1      (q head h uses KV head h // G, G = 4)

Each rank's paged KV cache holds only its KV heads; a rank's local model is an ordinary
LlamaModel over `local_config` (Hq/tp heads, its KV heads, I/tp features) whose forward calls
`tp_reduce` after o_proj and down_proj. Every rank runs the same schedule on the same inputs;
the all-reduced results are identical on all ranks, so sampling agrees everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.distributed as dist

from disagg.config import ModelConfig
from disagg.engine.model_runner import ModelRunner
from disagg.model.llama import LlamaModel
from disagg.model.loader import dummy_weights, iter_weights


# ---------------------------------------------------------------------- layout
def check_tp(cfg: ModelConfig, tp: int) -> None:
    if tp < 1:
        raise ValueError("tensor-parallel size must be at least 1")
    if cfg.num_heads % tp or cfg.intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide the {cfg.num_heads} query heads and the "
                         f"{cfg.intermediate_size} MLP features")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ValueError(f"tp={tp} and the {cfg.num_kv_heads} KV heads must divide one another")


def q_heads(cfg: ModelConfig, tp: int, rank: int) -> range:
    n = cfg.num_heads // tp
    return range(rank * n, (rank + 1) * n)


def kv_heads(cfg: ModelConfig, tp: int, rank: int) -> range:
    return kv_head_range(cfg.num_kv_heads, tp, rank)


def kv_head_range(num_kv_heads: int, tp: int, rank: int) -> range:
    """The KV heads TP rank `rank` of `tp` holds (kvtransfer/reshard.py plans transfers with it)."""
    if num_kv_heads >= tp:
        n = num_kv_heads // tp
        return range(rank * n, (rank + 1) * n)
    h = rank // (tp // num_kv_heads)
    return range(h, h + 1)


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    check_tp(cfg, tp)
    return replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=len(kv_heads(cfg, tp, 0)),
                   intermediate_size=cfg.intermediate_size // tp)


def shard_weights(weights, cfg: ModelConfig, tp: int, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Full checkpoint tensors (HF names) -> this rank's slices, same names (LlamaModel.load_state reads them)."""
    D, I = cfg.head_dim, cfg.intermediate_size
    qh, kh = q_heads(cfg, tp, rank), kv_heads(cfg, tp, rank)
    q_rows = slice(qh.start * D, qh.stop * D)
    kv_rows = slice(kh.start * D, kh.stop * D)
    i_rows = slice(rank * I // tp, (rank + 1) * I // tp)
    for name, t in weights:
        if ".self_attn.q_proj." in name:
            t = t[q_rows]
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            t = t[kv_rows]
        elif ".self_attn.o_proj." in name:
            t = t[:, q_rows]
        elif ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
            t = t[i_rows]
        elif ".mlp.down_proj." in name:
            t = t[:, i_rows]
        yield name, t.contiguous()


# ---------------------------------------------------------------------- group
@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in a tensor-parallel group (gloo on CPU, NCCL on GPU; None: the default group)."""
    size: int
    rank: int
    group: dist.ProcessGroup | None = None

    @classmethod
    def of(cls, group: dist.ProcessGroup | None = None) -> "TensorParallel":
        from kvtransfer import groups
        return cls(groups.size(group), groups.rank(group), group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] partial sums -> the sum over the group, in place."""
        from kvtransfer import groups
        return groups.all_reduce(self.group, x)


class TPModelRunner(ModelRunner):
    """A ModelRunner over one shard: local heads and MLP features, a KV cache of the local KV heads.

    Every rank of the group builds one and calls execute() with the same SchedulerOutput; the
    number of cache blocks is agreed (the minimum) so that block ids mean the same on every rank.
    """

    def __init__(self, cfg, model_cfg: ModelConfig, max_model_len: int, tp: TensorParallel,
                 progress: bool = False):
        self.tp = tp
        self.full_model_cfg = model_cfg
        super().__init__(cfg, local_config(model_cfg, tp.size), max_model_len, progress=progress)

    def _load_model(self, progress: bool) -> LlamaModel:
        c = self.cfg
        m = LlamaModel(self.model_cfg, self.kernels, self.device, self.dtype, max_positions=self.max_model_len)
        # dummy: the single-device model's random weights, sharded (tensor by tensor), so that TP and
        # single-device runs of a benchmark serve the same model
        full = (dummy_weights(self.full_model_cfg, self.device, self.dtype) if c.load_format == "dummy"
                else iter_weights(c.model_dir, progress=progress))
        m.load_state(shard_weights(full, self.full_model_cfg, self.tp.size, self.tp.rank))
        m.tp_reduce = self.tp.all_reduce
        return m

    def _decide_num_blocks(self) -> int:
        n = torch.tensor([super()._decide_num_blocks()], dtype=torch.long,
                         device=self.device if self.device.type == "cuda" else "cpu")
        from kvtransfer import groups
        groups.all_reduce(self.tp.group, n, op=dist.ReduceOp.MIN)
        return int(n.item())
