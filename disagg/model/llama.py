"""Llama-family forward (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Tokens of all requests in a step are flattened into one [T] batch, decodes first:

    tokens:  d0 d1 d2 | p0 p0 p0 p0 | p1 p1          (3 decodes, chunks of 2 prefills)
             ^ num_decode          ^ PrefillSeq(q_start=3, q_len=4, ctx_len=...)

Linear layers run on all T tokens at once. Attention runs the paged decode kernel on
the decode rows and causal SDPA on each prefill chunk (against its cached prefix when
the chunk is not the first). Weights are fused: qkv_proj = [q; k; v], gate_up = [gate; up].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from disagg.config import ModelConfig
from disagg.kernels import KernelSet
from disagg.model.loader import dummy_weights, iter_weights
from disagg.model.rope import cos_sin_cache


@dataclass
class PrefillSeq:
    q_start: int              # first row of this chunk in the flattened batch
    q_len: int                # tokens computed in this step
    ctx_len: int              # cached tokens after this step (prefix + chunk)
    block_table: torch.Tensor  # [n_blocks] int64 on device


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor              # [T] int64, -1 for padding rows
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None   # [Bd, M] int32
    decode_context_lens: torch.Tensor | None = None   # [Bd] int32
    prefills: list[PrefillSeq] = field(default_factory=list)
    # Context parallelism (prefill/ring_prefill.py): the step's one prefill is this rank's zigzag
    # slice of a prompt; ring.attend(q, k, v, k_cache, v_cache) replaces its causal attention.
    ring: object | None = None


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class LlamaModel:
    def __init__(self, cfg: ModelConfig, kernels: KernelSet, device: torch.device, dtype: torch.dtype,
                 max_positions: int):
        self.cfg = cfg
        self.k = kernels
        self.device = device
        self.dtype = dtype
        self.scale = cfg.head_dim ** -0.5
        self.cos_sin = cos_sin_cache(cfg, max_positions, device)
        self.layers: list[LayerWeights] = []
        self.embed: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.lm_head: torch.Tensor | None = None
        # Tensor parallelism (disagg/model/tensor_parallel.py): this rank holds a slice of the heads
        # and of the MLP; tp_reduce(x) sums the partial o_proj / down_proj outputs over the group.
        self.tp_reduce = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_dir: str, cfg: ModelConfig, kernels: KernelSet, device: torch.device,
                        dtype: torch.dtype, max_positions: int, progress: bool = False,
                        load_format: str = "auto") -> "LlamaModel":
        m = cls(cfg, kernels, device, dtype, max_positions)
        if load_format == "dummy":
            m.load_state(dummy_weights(cfg, device, dtype))
        else:
            m.load_state(iter_weights(model_dir, progress=progress))
        return m

    def load_state(self, weights) -> None:
        cfg, dev, dt = self.cfg, self.device, self.dtype
        raw: dict[str, torch.Tensor] = {}
        for name, t in weights:
            if "rotary_emb" in name:
                continue
            raw[name.removeprefix("model.")] = t

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            t = raw.pop(name, None)
            if t is None and required:
                raise KeyError(f"checkpoint is missing tensor {name!r}")
            return None if t is None else t.to(device=dev, dtype=dt)

        self.embed = take("embed_tokens.weight")
        self.norm = take("norm.weight")
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            q, k, v = (take(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            bias = None
            if cfg.attention_bias:
                bias = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            self.layers.append(LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=torch.cat([q, k, v]).contiguous(),
                qkv_bias=bias,
                o=take(p + "self_attn.o_proj.weight"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]).contiguous(),
                down=take(p + "mlp.down_proj.weight"),
            ))
            del q, k, v
        head = raw.pop("lm_head.weight", None)
        if head is not None and not cfg.tie_word_embeddings:
            self.lm_head = head.to(device=dev, dtype=dt)
        else:
            self.lm_head = self.embed
        leftover = [n for n in raw if not n.endswith(".bias")]
        if leftover:
            raise KeyError(f"unexpected tensors in checkpoint: {leftover[:5]}")

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], layer_hook=None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, H] (after the last norm).

        layer_hook(i, k_cache, v_cache), if given, runs right after layer i wrote its KV
        (the prefill worker streams that layer's KV out while the next layers compute).

        The forward is a chain of pieces cut at attention (disagg/engine/piecewise.py replays
        the pieces as CUDA graphs and runs only attention eagerly):
            piece 0:     embed, pre(0)              pre(i):  norm, qkv_proj, rotary, write KV
            piece i:     post(i-1), pre(i)          post(i): o_proj, norm, MLP
            piece L:     post(L-1), final norm
        """
        L = self.cfg.num_layers
        h, residual = F.embedding(input_ids, self.embed), None
        for i in range(L + 1):
            if i:
                h, residual = self.post(i - 1, attn_out, residual)
            if i == L:
                break
            q, kk, v, residual = self.pre(i, h, residual, positions, kv_caches[i], meta.slot_mapping)
            attn_out = self.attend(q, kk, v, kv_caches[i], meta)
            if layer_hook is not None:
                layer_hook(i, *kv_caches[i])
        return self.final_norm(h, residual)

    def pre(self, i: int, h, residual, positions, kv_cache, slot_mapping):
        """Layer i up to attention: -> q [T, Hq, D], k, v [T, Hkv, D] (already in the cache), residual."""
        k, cfg, lw = self.k, self.cfg, self.layers[i]
        if residual is None:
            residual = h
            x = k.rms_norm(h, lw.input_norm, cfg.rms_norm_eps)
        else:
            x, residual = k.fused_add_rms_norm(h, residual, lw.input_norm, cfg.rms_norm_eps)
        T = x.shape[0]
        qkv = F.linear(x, lw.qkv, lw.qkv_bias)
        q, kk, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(T, cfg.num_heads, cfg.head_dim)
        kk = kk.view(T, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(T, cfg.num_kv_heads, cfg.head_dim)
        q, kk = k.rotary_embedding(q, kk, positions, self.cos_sin)
        k.write_kv(kk, v, kv_cache[0], kv_cache[1], slot_mapping)
        return q, kk, v, residual

    def post(self, i: int, attn_out, residual):
        """Layer i after attention: attn_out [T, Hq * D] -> (MLP output, residual)."""
        k, lw = self.k, self.layers[i]
        x = F.linear(attn_out, lw.o)
        if self.tp_reduce is not None:
            x = self.tp_reduce(x)
        x, residual = k.fused_add_rms_norm(x, residual, lw.post_norm, self.cfg.rms_norm_eps)
        h = F.linear(k.silu_and_mul(F.linear(x, lw.gate_up)), lw.down)
        if self.tp_reduce is not None:
            h = self.tp_reduce(h)
        return h, residual

    def final_norm(self, h, residual) -> torch.Tensor:
        h, _ = self.k.fused_add_rms_norm(h, residual, self.norm, self.cfg.rms_norm_eps)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> float32 logits [N, V]."""
        return F.linear(hidden, self.lm_head).float()

    def attend(self, q, kk, v, kv_cache, meta: AttnMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of rows q [T, Hq, D] (their k, v already written to the cache) -> [T, Hq * D].

        Decode rows (the first meta.num_decode) use the paged kernel, each prefill chunk causal
        SDPA over its prefix. out, if given, receives the rows (a CUDA-graph piece's static input).
        """
        kc, vc = kv_cache
        nd = meta.num_decode
        if not meta.prefills and out is None:
            o = self.k.paged_attention_decode(q, kc, vc, meta.decode_block_tables,
                                              meta.decode_context_lens, self.scale)
            return o.view(q.shape[0], q.shape[1] * q.shape[2])
        o = torch.empty_like(q) if out is None else out.view(out.shape[0], *q.shape[1:])
        if nd:
            o[:nd] = self.k.paged_attention_decode(q[:nd], kc, vc, meta.decode_block_tables,
                                                   meta.decode_context_lens, self.scale)
        for ps in meta.prefills:
            s, e = ps.q_start, ps.q_start + ps.q_len
            if meta.ring is not None:
                o[s:e] = meta.ring.attend(q[s:e], kk[s:e], v[s:e], kc, vc)
            else:
                o[s:e] = self._prefill_attention(q[s:e], kk[s:e], v[s:e], kc, vc, ps)
        return o.view(o.shape[0], q.shape[1] * q.shape[2])     # explicit: a ring slice may be empty

    def _prefill_attention(self, q, k, v, kc, vc, ps: PrefillSeq) -> torch.Tensor:
        """Causal attention of a chunk's q: [L, Hq, D] over its prefix (from the cache) and itself.

        SDPA's fused backends (flash, memory-efficient) take only 4-D [B, H, L, D] inputs and no
        GQA broadcast together with a mask; anything else silently runs the unfused math path.
        """
        L = ps.q_len
        g = q.shape[1] // k.shape[1]
        if ps.ctx_len > L:
            bs = kc.shape[1]
            n = (ps.ctx_len + bs - 1) // bs
            blocks = ps.block_table[:n]
            k = kc[blocks].flatten(0, 1)[:ps.ctx_len]      # [ctx, Hkv, D]
            v = vc[blocks].flatten(0, 1)[:ps.ctx_len]
            # query i sits at position ctx-L+i and sees keys 0..ctx-L+i: causal, aligned bottom-right
            mask, causal = causal_lower_right(L, ps.ctx_len), False
        else:
            mask, causal = None, True
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                                           scale=self.scale)
        return o[0].transpose(0, 1)
