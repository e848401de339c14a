"""The model runner: scheduler output in, sampled tokens out. It thinks in tensors.

It owns the weights and the paged KV cache (one [num_blocks, block_size, Hkv, D] pair
per layer, carved from one tensor so kvtransfer can address blocks), builds the
flattened batch and the attention metadata, and on CUDA replays captured graphs for
decode-only steps (batch padded up to the next captured size; padding rows write to
slot -1 and attend over a zero-length context) and piecewise graphs, cut at attention, for
steps with prefill chunks (disagg/engine/piecewise.py).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from decode.sampler import SampleResult, sample
from decode.scheduler import ScheduledRequest, SchedulerOutput
from disagg.config import EngineConfig, ModelConfig
from disagg.kernels import get_kernels
from disagg.model.llama import AttnMetadata, LlamaModel, PrefillSeq

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def _token_slice(req, start: int, n: int) -> list[int]:
    """req.all_token_ids[start:start+n] without concatenating prompt and output every step."""
    np_ = req.num_prompt_tokens
    if start >= np_:
        return req.output_token_ids[start - np_:start - np_ + n]
    if start + n <= np_:
        return req.prompt_token_ids[start:start + n]
    return req.prompt_token_ids[start:] + req.output_token_ids[:start + n - np_]


@dataclass
class StepResult:
    sampled: dict[str, int]                 # request id -> new token
    logprobs: dict[str, tuple]              # request id -> (logprob, top) when asked
    seconds: float = 0.0


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, max_model_len: int, progress: bool = False):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = cfg.torch_device
        self.dtype = cfg.torch_dtype
        self.max_model_len = max_model_len
        self.block_size = cfg.cache.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.kernels = get_kernels(cfg.use_triton)
        torch.manual_seed(cfg.seed)
        self.model = self._load_model(progress)
        self.num_blocks = self._decide_num_blocks()
        self.kv_cache = torch.zeros(model_cfg.num_layers, 2, self.num_blocks, self.block_size,
                                    model_cfg.num_kv_heads, model_cfg.head_dim, device=self.device, dtype=self.dtype)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(model_cfg.num_layers)]
        self.graphs: dict[int, tuple] = {}
        self.piecewise = None
        if self.device.type == "cuda":
            # cuDNN's SDPA builds an execution plan for every new prompt length (60-90 ms on an H200,
            # benchmarks/profile_step.py) and serving rarely repeats one: flash / memory-efficient only.
            torch.backends.cuda.enable_cudnn_sdp(False)
        if self.device.type == "cuda" and self.kernels.name != "torch-reference":
            # every decode-kernel variant now, none mid-serving (_meta keeps the table this wide)
            from disagg.kernels.paged_attention import compile_variants
            compile_variants(*self.kv_caches[0], model_cfg.num_heads, cfg.scheduler.max_num_seqs,
                             self.max_blocks_per_seq)
            torch.cuda.synchronize()
        if self.device.type == "cuda" and cfg.use_cuda_graphs:
            self._capture_graphs(cfg.scheduler.max_num_seqs)
            limit = min(cfg.piecewise_max_tokens, cfg.scheduler.max_num_batched_tokens)
            if limit >= 16:
                from disagg.engine.piecewise import PiecewiseGraphs
                self.piecewise = PiecewiseGraphs(self.model, self.kv_caches, limit)
        # What start-up built (the model's modules, graphs, kernels) lives as long as the process:
        # out of the cyclic collector's reach, a full collection while serving scans only what
        # serving allocated (the same reason vLLM freezes after start-up). GPU only: CPU test
        # processes build many runners and must get their cycles back.
        if self.device.type == "cuda":
            gc.collect()
            gc.freeze()

    def _load_model(self, progress: bool) -> LlamaModel:
        """The weights on this device (disagg/model/tensor_parallel.TPModelRunner loads one shard)."""
        return LlamaModel.from_pretrained(self.cfg.model_dir, self.model_cfg, self.kernels, self.device, self.dtype,
                                          max_positions=self.max_model_len, progress=progress,
                                          load_format=self.cfg.load_format)

    # ------------------------------------------------------------------ memory
    @property
    def bytes_per_block(self) -> int:
        c = self.model_cfg
        return 2 * c.num_layers * self.block_size * c.kv_size * torch.empty((), dtype=self.dtype).element_size()

    def _decide_num_blocks(self) -> int:
        cc = self.cfg.cache
        if cc.num_blocks is not None:
            return cc.num_blocks
        if self.device.type != "cuda":
            return max(int(cc.cpu_kv_gib * 2**30) // self.bytes_per_block, 1)
        # Profile the activation peak with one full-budget prefill (slots -1: nothing cached).
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        T = min(self.cfg.scheduler.max_num_batched_tokens, self.max_model_len)
        dummy = [(torch.empty(1, self.block_size, self.model_cfg.num_kv_heads, self.model_cfg.head_dim,
                              device=self.device, dtype=self.dtype),) * 2 for _ in range(self.model_cfg.num_layers)]
        ids = torch.zeros(T, dtype=torch.long, device=self.device)
        meta = AttnMetadata(slot_mapping=torch.full((T,), -1, dtype=torch.long, device=self.device),
                            prefills=[PrefillSeq(0, T, T, torch.zeros(1, dtype=torch.long, device=self.device))])
        h = self.model.forward(ids, torch.arange(T, device=self.device), meta, dummy)
        logits = self.model.compute_logits(h[-min(T, self.cfg.scheduler.max_num_seqs):])
        from disagg.request import SamplingParams
        sample(logits, [SamplingParams(temperature=1.0, top_p=0.9)] * logits.shape[0], [0] * logits.shape[0])
        del logits
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del dummy, h
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = total * cc.gpu_memory_utilization - peak - max(used_by_others, 0)
        n = int(budget // self.bytes_per_block)
        if n < 1:
            raise RuntimeError("no GPU memory left for the KV cache: lower the model size or raise "
                               "--gpu-memory-utilization")
        torch.cuda.empty_cache()
        return n

    # ------------------------------------------------------------------ inputs
    def _prepare(self, sched: SchedulerOutput):
        """Flatten the step into token ids, positions, slots and attention metadata."""
        bs = self.block_size
        ids, pos, slots = [], [], []
        dec_tables, dec_lens, prefills = [], [], []
        for s in sched.scheduled:
            start, n = s.start, s.num_tokens
            toks = _token_slice(s.request, start, n)
            q_start = len(ids)
            ids.extend(toks)
            pos.extend(range(start, start + n))
            table = s.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if s.is_decode:
                dec_tables.append(table)
                dec_lens.append(start + 1)
            else:
                prefills.append((q_start, n, start + n, table))
        return ids, pos, slots, dec_tables, dec_lens, prefills

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device="cpu").to(self.device, non_blocking=True)

    def _block_table_tensor(self, tables: list[list[int]], width: int) -> torch.Tensor:
        bt = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        return bt.to(self.device, non_blocking=True)

    def _meta(self, slots, dec_tables, dec_lens, prefills) -> AttnMetadata:
        nd = len(dec_tables)
        # On CUDA the table is always max_blocks_per_seq wide (as in the decode graphs): the Triton
        # kernel's split count and integer specialisations then depend on the batch size only, all
        # compiled at start-up (paged_attention.compile_variants), never in the middle of serving.
        width = self.max_blocks_per_seq if self.device.type == "cuda" else max((len(t) for t in dec_tables), default=1)
        return AttnMetadata(
            slot_mapping=self._tensor(slots), num_decode=nd,
            decode_block_tables=self._block_table_tensor(dec_tables, width) if nd else None,
            decode_context_lens=self._tensor(dec_lens, torch.int32) if nd else None,
            prefills=[PrefillSeq(q, n, c, self._tensor(t)) for q, n, c, t in prefills])

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, layer_hook=None) -> StepResult:
        t0 = time.perf_counter()
        ids, pos, slots, dec_tables, dec_lens, prefills = self._prepare(sched)
        nd = len(dec_tables)
        sample_rows, sample_reqs = [], []
        row = 0
        for s in sched.scheduled:
            row += s.num_tokens
            if s.samples:
                sample_rows.append(row - 1)
                sample_reqs.append(s.request)
        if not prefills and layer_hook is None and self.graphs and 0 < nd <= max(self.graphs):
            logits = self._run_graph(ids, pos, slots, dec_tables, dec_lens)
        else:
            pw = self.piecewise
            meta = self._meta(slots, dec_tables, dec_lens, prefills)
            if pw is not None and len(ids) <= pw.max_tokens:
                hidden = pw.run(ids, pos, slots, meta, layer_hook)
            else:
                hidden = self.model.forward(self._tensor(ids), self._tensor(pos), meta, self.kv_caches, layer_hook)
            logits = self.model.compute_logits(hidden[self._tensor(sample_rows)]) if sample_rows else None
        if not sample_reqs:
            return StepResult({}, {}, time.perf_counter() - t0)
        if logits.shape[0] != len(sample_reqs):   # graph path: rows are exactly the decodes, padded
            logits = logits[torch.tensor(sample_rows, device=logits.device)]
        res: SampleResult = sample(logits, [r.params for r in sample_reqs],
                                   [r.num_output_tokens for r in sample_reqs])
        sampled = {r.request_id: t for r, t in zip(sample_reqs, res.token_ids)}
        lps = {r.request_id: lp for r, lp in zip(sample_reqs, res.logprobs) if lp is not None}
        return StepResult(sampled, lps, time.perf_counter() - t0)

    # ------------------------------------------------------------------ CUDA graphs
    def _capture_graphs(self, max_bs: int) -> None:
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_bs]
        B, W = max(sizes), self.max_blocks_per_seq
        dev = self.device
        self._g_ids = torch.zeros(B, dtype=torch.long, device=dev)
        self._g_pos = torch.zeros(B, dtype=torch.long, device=dev)
        self._g_slots = torch.full((B,), -1, dtype=torch.long, device=dev)
        self._g_bt = torch.zeros(B, W, dtype=torch.int32, device=dev)
        self._g_lens = torch.zeros(B, dtype=torch.int32, device=dev)
        self._g_stage = torch.zeros(B, 4 + W, dtype=torch.long).pin_memory()
        self._g_stage_np = self._g_stage.numpy()
        pool = None
        for b in reversed(sizes):   # largest first so smaller graphs reuse its memory pool
            meta = AttnMetadata(slot_mapping=self._g_slots[:b], num_decode=b,
                                decode_block_tables=self._g_bt[:b], decode_context_lens=self._g_lens[:b])
            run = lambda b=b, meta=meta: self.model.compute_logits(  # noqa: E731
                self.model.forward(self._g_ids[:b], self._g_pos[:b], meta, self.kv_caches))
            torch.cuda.synchronize()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = run()
            pool = g.pool()
            self.graphs[b] = (g, out)
        torch.cuda.synchronize()

    def _run_graph(self, ids, pos, slots, dec_tables, dec_lens) -> torch.Tensor:
        """Fill the static inputs with one host->device copy of a pinned staging row block, replay."""
        n = len(ids)
        b = min(k for k in self.graphs if k >= n)
        w = max(len(t) for t in dec_tables)
        st = self._g_stage_np                       # [B, 4 + W] int64 view of pinned memory
        st[:b, :4] = (0, 0, -1, 0)                  # padding rows: token 0, pos 0, slot -1, len 0
        st[:n, 0], st[:n, 1], st[:n, 2], st[:n, 3] = ids, pos, slots, dec_lens
        for i, t in enumerate(dec_tables):
            st[i, 4:4 + len(t)] = t
        dev = self._g_stage[:b, :4 + w].to(self.device, non_blocking=True)
        self._g_ids[:b].copy_(dev[:, 0])
        self._g_pos[:b].copy_(dev[:, 1])
        self._g_slots[:b].copy_(dev[:, 2])
        self._g_lens[:b].copy_(dev[:, 3])
        self._g_bt[:b, :w].copy_(dev[:, 4:])     # columns past w are stale but beyond every context
        g, out = self.graphs[b]
        g.replay()
        return out[:n]
