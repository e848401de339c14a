"""Piecewise CUDA graphs for steps that carry prefill chunks.

A decode-only step replays one whole-model graph (model_runner.py). A step with a prefill
chunk cannot: its attention depends on how many chunks there are and how long each is. Run
eagerly, such a step costs the host 15-35 ms on an 8B model (about 1,000 kernel launches
and their Python) whatever its size (benchmarks/profile_step.py on an H200), while the
GPU needs 5 ms for a 16-token prefill. So the forward is cut at attention
(LlamaModel.forward's pieces) and every piece is captured once per token bucket:

    replay piece 0 (embed, pre 0) ─ attention 0 (eager) ─ replay piece 1 (post 0, pre 1) ─ ...
                                                           ─ replay piece L (post L-1, final norm)

A step of n tokens runs in the smallest bucket N >= n: rows n..N-1 are padding (token 0,
position 0, KV slot -1, so nothing is written to the cache), every piece works on rows
independently, and attention touches only the real rows. Pieces talk through static
buffers (q, k, v, residual, attention output, final hidden) so the graphs of all buckets
share them and one memory pool.

On CPU (or with capture=False) the same pieces run uncaptured: tests check that the chain
over padded static buffers gives model.forward's hidden states.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Token buckets. Past 2,048 tokens a step is compute-bound and the host's launches hide behind it.
BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048)


class PiecewiseGraphs:
    def __init__(self, model, kv_caches, max_tokens: int, capture: bool = True):
        self.model, self.kv_caches = model, kv_caches
        self.sizes = [b for b in BUCKETS if b <= max_tokens]
        if not self.sizes:
            raise ValueError(f"no piecewise bucket fits {max_tokens} tokens")
        cfg, dev, dt = model.cfg, model.device, model.dtype
        N = self.max_tokens = max(self.sizes)
        self.L = cfg.num_layers
        self.ids = torch.zeros(N, dtype=torch.long, device=dev)
        self.pos = torch.zeros(N, dtype=torch.long, device=dev)
        self.slots = torch.full((N,), -1, dtype=torch.long, device=dev)
        self.q = torch.zeros(N, cfg.num_heads, cfg.head_dim, device=dev, dtype=dt)
        self.k = torch.zeros(N, cfg.num_kv_heads, cfg.head_dim, device=dev, dtype=dt)
        self.v = torch.zeros_like(self.k)
        self.res = torch.zeros(N, cfg.hidden_size, device=dev, dtype=dt)
        self.attn = torch.zeros(N, cfg.num_heads * cfg.head_dim, device=dev, dtype=dt)
        self.hidden = torch.zeros(N, cfg.hidden_size, device=dev, dtype=dt)
        pin = dev.type == "cuda"
        self._stage = torch.zeros(3, N, dtype=torch.long, pin_memory=pin)
        self._stage_np = self._stage.numpy()
        self.graphs: dict[int, list] = {}
        if capture and dev.type == "cuda":
            self._capture()

    # ------------------------------------------------------------------ pieces
    def _piece(self, j: int, n: int) -> None:
        """Piece j on rows [0, n) of the static buffers."""
        m = self.model
        if j == 0:
            h, res = F.embedding(self.ids[:n], m.embed), None
        else:
            h, res = m.post(j - 1, self.attn[:n], self.res[:n])
        if j == self.L:
            self.hidden[:n].copy_(m.final_norm(h, res))
            return
        q, k, v, res = m.pre(j, h, res, self.pos[:n], self.kv_caches[j], self.slots[:n])
        self.q[:n].copy_(q)
        self.k[:n].copy_(k)
        self.v[:n].copy_(v)
        if res.data_ptr() != self.res.data_ptr():
            self.res[:n].copy_(res)

    def _capture(self) -> None:
        pool = None
        for n in reversed(self.sizes):         # largest first: the pool is sized once
            torch.cuda.synchronize()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):         # warm up (Triton compiles, cuBLAS picks kernels)
                for j in range(self.L + 1):
                    self._piece(j, n)
            torch.cuda.current_stream().wait_stream(s)
            graphs = []
            for j in range(self.L + 1):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._piece(j, n)
                pool = g.pool()
                graphs.append(g)
            self.graphs[n] = graphs
        torch.cuda.synchronize()

    # ------------------------------------------------------------------ run
    def bucket(self, n: int) -> int | None:
        for b in self.sizes:
            if b >= n:
                return b
        return None

    def run(self, ids: list[int], pos: list[int], slots: list[int], meta, layer_hook=None) -> torch.Tensor:
        """One step's forward: -> final hidden states [n, H] (a view of a static buffer: use it
        before the next step). meta: the step's AttnMetadata (its slot_mapping is not used)."""
        n = len(ids)
        N = self.bucket(n)
        st = self._stage_np
        st[0, :N], st[1, :N], st[2, :N] = 0, 0, -1
        st[0, :n], st[1, :n], st[2, :n] = np.asarray(ids), np.asarray(pos), np.asarray(slots)
        dev = self._stage[:, :N].to(self.ids.device, non_blocking=True)
        self.ids[:N].copy_(dev[0])
        self.pos[:N].copy_(dev[1])
        self.slots[:N].copy_(dev[2])
        graphs = self.graphs.get(N)
        for j in range(self.L + 1):
            if graphs is not None:
                graphs[j].replay()
            else:
                self._piece(j, N)
            if j == self.L:
                break
            self.model.attend(self.q[:n], self.k[:n], self.v[:n], self.kv_caches[j], meta, out=self.attn[:n])
            if layer_hook is not None:
                layer_hook(j, *self.kv_caches[j])
        return self.hidden[:n]
