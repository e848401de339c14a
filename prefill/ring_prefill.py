"""Ring prefill of a whole prompt across a context-parallel group (cp ranks, one model replica each).

Every rank runs the full Llama forward on its zigzag slice of the prompt (prefill/ring_attention.py),
with the slice's true positions for rotary; inside every layer the causal attention is the ring:

    rank r:  ids[pos_r] ─▶ embed ─▶ for each layer: qkv, rotary(pos_r), write own KV,
                                      ring_attention (KV slices of all ranks pass through),
                                      o_proj, MLP ─▶ final norm
             pos_r = zigzag_positions(S, cp, r);   rank 0 holds position S-1 (its last row)

The leader (rank 0 of the group) keeps the whole prompt's KV: every slice that passes through
its ring is written into its paged cache at that slice's slots, so after layer l's attention
its cache holds layer l's KV for all S tokens in token order, exactly what the single-device
prefill writes. The layer hook (the KV sender) then streams it to the decode worker as usual;
the decode side cannot tell a ring prefill from a plain one. The other ranks cache nothing
(slots -1) and compute no logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from disagg.model.llama import AttnMetadata, LlamaModel, PrefillSeq
from prefill.ring_attention import attention_lse, ring_attention, zigzag_positions


class RingStep:
    """The attention hook of one ring prefill on one rank (AttnMetadata.ring)."""

    def __init__(self, seq_len: int, scale: float, group: dist.ProcessGroup | None, kernels,
                 slots: torch.Tensor | None = None, attn=attention_lse):
        """slots: [S] int64 cache slots of the whole prompt (the leader: keep every slice), or None."""
        self.seq_len = seq_len
        self.scale = scale
        self.group = group
        self.k = kernels
        self.attn = attn
        self.cp = group.size() if group is not None else 1
        self.rank = group.rank() if group is not None else 0
        self.slots_of = None
        if slots is not None:   # src rank -> [L_src] slots of its rows
            self.slots_of = [slots[zigzag_positions(seq_len, self.cp, r, slots.device)] for r in range(self.cp)]

    def attend(self, q, k, v, k_cache, v_cache) -> torch.Tensor:
        on_kv = None
        if self.slots_of is not None:
            def on_kv(src: int, kv: torch.Tensor) -> None:
                if src != self.rank:      # this rank's own rows were written by the model already
                    self.k.write_kv(kv[0], kv[1], k_cache, v_cache, self.slots_of[src])
        return ring_attention(q, k, v, self.seq_len, self.scale, self.group, on_kv, attn=self.attn)


@torch.inference_mode()
def ring_prefill(model: LlamaModel, kv_caches, prompt_ids: torch.Tensor, group: dist.ProcessGroup | None,
                 slots: torch.Tensor | None = None, layer_hook=None, attn=attention_lse) -> torch.Tensor | None:
    """Prefill `prompt_ids` ([S] int64 on the model's device, the same on every rank) with ring attention.

    slots: the leader's [S] cache slots for the whole prompt (None on the other ranks).
    Returns the final hidden state of the prompt's last token, [1, H], on the leader; None elsewhere.
    """
    cp = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    S = prompt_ids.shape[0]
    dev = prompt_ids.device
    pos = zigzag_positions(S, cp, rank, dev)                 # [L]
    L = pos.shape[0]
    slot_mapping = slots[pos] if slots is not None else torch.full((L,), -1, dtype=torch.long, device=dev)
    meta = AttnMetadata(slot_mapping=slot_mapping,
                        prefills=[PrefillSeq(0, L, L, torch.zeros(1, dtype=torch.long, device=dev))],
                        ring=RingStep(S, model.scale, group, model.k, slots, attn))
    hidden = model.forward(prompt_ids[pos], pos, meta, kv_caches, layer_hook)
    return hidden[-1:] if rank == 0 else None


def prompt_slots(block_table: list[int], num_tokens: int, block_size: int, device) -> torch.Tensor:
    """[num_tokens] int64: slot of position p = block_table[p // bs] * bs + p % bs."""
    p = torch.arange(num_tokens)
    return (torch.tensor(block_table, dtype=torch.long)[p // block_size] * block_size + p % block_size).to(device)
