"""Performance models: how long one engine step, one codec pass and one KV transfer take.

The simulator asks a PerfModel for the duration of each step its (real) schedulers make:

    step_time(B, K, chunks, M)   B decoding requests reading K KV tokens in total, the longest
                              M of them, plus prefill chunks [(n, c)]: n new tokens after c cached
        decode-only (no chunks):   decode(B, K) + straggler(B, M, K / B)   a CUDA-graph replay
        with chunks (piecewise):   prefill(N, C_eff) + prefill(P, 0) - prefill(N, 0)
                                   + per_prompt * (chunks - 1)
                                   + decode(B, K) - decode(B, B * c0)   the decodes' KV reads
                                   + mixed_extra(B)                     their eager attention
                                   + straggler(B, M, K / B)
           straggler: the decode kernel gives every request of a batch the same number of
           programs (split-K), so one long context among short ones makes its programs the
           step's tail; the tables are measured at equal contexts. A profile measures the step
           with one request at M and the rest at 1,024 tokens against the equal-context table
           at the same K (`decode_straggler`); the model takes straggler(B, M) - straggler(B, K / B).
           N = sum n + B (every token goes through the GEMMs), C_eff the context that gives one
           prompt of N tokens the chunks' attention work A = sum(n c + n (n + 1) / 2) (negative
           for several short prompts), c0 the smallest measured decode context, P the piecewise
           graph bucket the engine pads N up to (the GEMMs run on P rows, attention on N; a
           profile without buckets: P = N).
        plus the host: sched_s + sched_seq_s * (requests in the step)  (schedule + update + outputs)
                       + chunk_s * chunks + chunk_token_s * (prompt tokens)  (blocks, prefix hashes)

Two sources, one interface:

    ProfileModel    tables measured on a GPU by `disagg profile` (disagg/sim/profile.py), in profile_model.py,
                    interpolated piecewise-linearly (linear extrapolation past the last point)
    RooflineModel   datasheet FLOP/s and bandwidth (disagg/sim/gpus.py) times efficiencies
                    fitted to our H200 Llama-3-8B figures (benchmarks/RESULTS.md: decode steps
                    within 1%, 2K prefill within 0.3%)

Tensor parallelism (tp > 1; the model has TP, `disagg serve` does not use it yet): the per-layer
fixed cost and the per-request cost stay, the rest (weights, KV, FLOPs) splits over tp GPUs, plus 2
all-reduces per layer of the step's hidden states (latency + ring traffic over NVLink); KV capacity
grows by what the weights no longer occupy. Against benchmarks/RESULTS.md issue 6 (H200 pair, 1,024
cached tokens): TP=2 decode 4.11 ms at batch 1 (model 4.11), 6.14 ms at batch 64 (model 5.9).

Profile JSON (format disagg-perf-profile-v1): see disagg/sim/profile.py's docstring.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from disagg.config import ModelConfig
from disagg.sim.gpus import GPUSpec, LinkSpec, gpu, link

FORMAT = "disagg-perf-profile-v1"
DTYPE_BYTES = 2                       # bf16 weights and KV on the GPU
# One small all-reduce inside a CUDA graph; NVLink's fitted to the issue-6 TP=2 decode steps.
ALLREDUCE_LATENCY_S = {"nvlink": 23e-6, "pcie": 40e-6, "ib": 40e-6, "tcp": 120e-6}
CODECS = ("none", "fp8", "int8", "int4")
# Wire bytes / raw bytes of one layer (kvtransfer/codec.py layouts, 1024 tokens, head_dim 128);
# a profile records the exact figure for its model.
DEFAULT_RATIO = {"none": 1.0, "fp8": 1.94, "int8": 1.94, "int4": 3.46}


@dataclass(frozen=True)
class Shape:
    """What the models need of a ModelConfig (bf16)."""
    name: str
    num_layers: int
    hidden: int
    q_size: int
    kv_size: int
    layer_params: int         # matmul parameters of all layers (each token multiplies them)
    embed_params: int         # one vocabulary x hidden matrix
    tied: bool

    @classmethod
    def of(cls, mc: ModelConfig) -> "Shape":
        emb = mc.vocab_size * mc.hidden_size
        layer = mc.num_params - emb * (1 if mc.tie_word_embeddings else 2) - mc.hidden_size
        return cls(mc.name, mc.num_layers, mc.hidden_size, mc.q_size, mc.kv_size, layer, emb,
                   mc.tie_word_embeddings)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_size * DTYPE_BYTES

    @property
    def weight_bytes(self) -> int:
        return (self.layer_params + self.embed_params * (1 if self.tied else 2)) * DTYPE_BYTES

    @property
    def decode_read_bytes(self) -> int:
        """Weights a decode step reads: all but the embedding table (the LM head is read)."""
        return (self.layer_params + self.embed_params) * DTYPE_BYTES


def attn_pairs(n: int, c: int) -> float:
    """Query-key pairs of a causal chunk of n tokens after c cached ones."""
    return n * c + n * (n + 1) / 2


def _lerp(xs: list[float], ys: list[float], x: float, clamp_low: bool = True) -> float:
    """Piecewise-linear through (xs, ys) (xs ascending); linear extrapolation above the last point,
    flat below the first (clamp_low) or extrapolated."""
    if len(xs) == 1:
        return ys[0]
    if x <= xs[0] and clamp_low:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1 = xs[i], xs[i + 1]
    return ys[i] + (ys[i + 1] - ys[i]) * (x - x0) / (x1 - x0)


class PerfModel:
    """Step, codec and transfer times for one model on one GPU kind (tp GPUs per worker)."""
    shape: Shape
    spec: GPUSpec
    source: str = ""

    def __init__(self, shape: Shape, spec: GPUSpec, tp: int = 1, link_kind: str = "nvlink"):
        if tp < 1 or tp & (tp - 1):
            raise ValueError("tp must be a power of two")
        self.shape, self.spec, self.tp = shape, spec, tp
        self.link: LinkSpec = link(link_kind, spec)
        self.tp_link: LinkSpec = link("nvlink", spec)
        self._c0 = 1.0
        self._lines: dict[int, tuple[list[float], list[float]]] = {}

    # ------------------------------------------------------------------ to implement (tp = 1)
    def _decode_line(self, b: int) -> tuple[list[float], list[float]]:
        """Decode-step time of batch b against total KV tokens k: breakpoints (k, seconds),
        piecewise-linear, extrapolated linearly at both ends."""
        raise NotImplementedError

    def _prefill(self, n: int, c: float) -> float: ...
    def _kv_cache_bytes_tp1(self, gpu_memory_utilization: float) -> float: ...
    per_prompt_s: float = 0.0
    sched_s: float = 20e-6
    sched_seq_s: float = 2e-6
    chunk_s: float = 0.0
    chunk_token_s: float = 0.0

    def codec_layer_s(self, codec: str, tokens: int) -> tuple[float, float]:
        """(encode, decode + checksum) seconds for one layer's KV of `tokens` tokens."""
        raise NotImplementedError

    def codec_ratio(self, codec: str) -> float:
        return DEFAULT_RATIO[codec]

    # ------------------------------------------------------------------ tensor parallelism
    def _allreduce_s(self, tokens: int) -> float:
        if self.tp == 1:
            return 0.0
        nbytes = tokens * self.shape.hidden * DTYPE_BYTES
        one = ALLREDUCE_LATENCY_S[self.tp_link.name] + 2 * (self.tp - 1) / self.tp * nbytes / self.tp_link.bytes_per_s
        return 2 * self.shape.num_layers * one

    def _tp(self, t: float, tokens: int, requests: int) -> float:
        """A TP=1 step time on tp GPUs: its fixed part (per layer, per request) stays, the rest splits."""
        if self.tp == 1:
            return t
        fixed = min(t, self.shape.num_layers * ROOFLINE["layer_fixed_s"] + requests * ROOFLINE["seq_s"])
        return fixed + (t - fixed) / self.tp + self._allreduce_s(tokens)

    # ------------------------------------------------------------------ what the simulator asks
    def _decode(self, b: int, k: float) -> float:
        line = self._lines.get(b)
        if line is None:
            line = self._lines[b] = self._decode_line(b)
        return _lerp(line[0], line[1], k, clamp_low=False)

    def decode_time(self, b: int, k: float, maxc: int = 0) -> float:
        """A decode-only step (CUDA graph) of b requests reading k KV tokens (the longest maxc,
        0: unknown, taken as equal contexts), host included."""
        return self._tp(self._decode(b, k) + self._straggler(b, k, maxc), b, b) + self.host_s(b, [])

    def prefill_chunks_time(self, chunks: list[tuple[int, int]], b: int = 0, k: float = 0.0, maxc: int = 0) -> float:
        """An eager step: prefill chunks [(n, c)] and b decodes reading k KV tokens."""
        n = sum(x for x, _ in chunks) + b
        a = sum(attn_pairs(x, c) for x, c in chunks)
        c_eff = a / n - (n + 1) / 2 if n else 0.0     # < 0 for several short prompts: less attention
        t = self._prefill(n, c_eff) + self.per_prompt_s * (len(chunks) - 1)
        p = self._bucket(n)
        if p > n:                                       # padding rows: GEMMs of p rows, attention of n
            t += self._prefill(p, 0.0) - self._prefill(n, 0.0)
        if b:
            t += (max(0.0, self._decode(b, k) - self._decode(b, b * self._c0)) + self._mixed_extra(b, n - b)
                  + self._straggler(b, k, maxc))
        return self._tp(t, n, len(chunks) + b) + self.host_s(b, chunks)

    def host_s(self, b: int, chunks: list[tuple[int, int]]) -> float:
        """The engine's host work of a step (outside the runner): schedule, update, outputs."""
        return (self.sched_s + self.sched_seq_s * (len(chunks) + b) + self.chunk_s * len(chunks)
                + self.chunk_token_s * sum(n for n, _ in chunks))

    def _mixed_extra(self, b: int, tokens: int = 0) -> float:
        """What b decodes cost on top of the tables when they share a step with prefill chunks
        of `tokens` prompt tokens in all."""
        return 0.0

    def _bucket(self, n: int) -> int:
        """The token count a step of n tokens runs at (piecewise CUDA-graph padding)."""
        return n

    def step_time(self, b: int, k: float, chunks: list[tuple[int, int]], maxc: int = 0) -> float:
        return self.prefill_chunks_time(chunks, b, k, maxc) if chunks else self.decode_time(b, k, maxc)

    def _straggler(self, b: int, k: float, maxc: int) -> float:
        """What the longest context costs a batch of b (k KV tokens) beyond equal contexts."""
        return 0.0

    def num_kv_blocks(self, block_size: int, gpu_memory_utilization: float = 0.9) -> int:
        """KV blocks of one worker (tp GPUs): each GPU holds 1/tp of the weights and of the KV."""
        tp1 = self._kv_cache_bytes_tp1(gpu_memory_utilization)
        total = self.tp * tp1 + (self.tp - 1) * self.shape.weight_bytes
        return max(int(total // (block_size * self.shape.kv_bytes_per_token)), 0)

    def kv_wire_bytes(self, tokens: int, codec: str) -> float:
        return tokens * self.shape.kv_bytes_per_token / self.codec_ratio(codec)

    def transfer_tail_s(self, tokens: int, codec: str, forward_s: float) -> tuple[float, float]:
        """Layer-wise streaming of a `tokens`-token prompt's KV during a forward of forward_s.
        Returns (encode seconds the prefill GPU spends, seconds after the forward ends until the
        last layer is on the decode GPU). Layer l is done at (l + 1) forward_s / L, then encoded
        (on the compute stream) and sent; sends are serial on the link:

            sent_l = max(done_l + enc, sent_{l-1}) + wire     (wire: one layer's bytes)
            landed = sent_{L-1} (+ the decode side's decode, charged to its next step)
        """
        L = self.shape.num_layers
        enc, _ = self.codec_layer_s(codec, tokens)
        wire = self.link.seconds(self.kv_wire_bytes(tokens, codec) / L)
        per = forward_s / L
        # closed form of the recurrence: the link keeps up (per >= wire) or it is the bottleneck
        sent_last = max(forward_s + enc, per + enc + (L - 1) * wire) + wire
        return L * enc, sent_last - forward_s

    def describe(self) -> str:
        return f"{self.source} {self.shape.name} on {self.spec.name}" + (f" x TP{self.tp}" if self.tp > 1 else "")


# ====================================================================== analytic
# Fitted to benchmarks/RESULTS.md (H200, Llama-3-8B shape, bf16; decode steps at 8 (batch,
# context) points and the three prefill figures; max error 1%): see the module docstring.
ROOFLINE = dict(
    layer_fixed_s=9.4e-6,       # per layer per step (graph replay: kernel tails, launches)
    eager_layer_s=70e-6,        # per layer, host-side kernel launches of an eager step (lower bound)
    eta_weights=0.686,          # weight reads of a decode step, fraction of HBM peak
    eta_kv=0.838,               # paged-attention KV reads, fraction of HBM peak
    seq_s=9.9e-6,               # per decoding request (sampling, metadata)
    eta_gemm=0.651,             # matmuls, fraction of bf16 peak
    eta_attn=0.204,             # prefill attention (SDPA over GQA-expanded KV), fraction of peak
    token_s=0.55e-6,            # per prefill token (host-side input preparation)
    activation_bytes=2.0e9,     # activation peak + allocator slack kept out of the KV budget
    context_bytes=0.6e9,        # CUDA context and kernels, outside torch's budget
)
# Codec time per layer = a + bytes / rate; from the H200 8 MiB-layer figures (RESULTS.md issue 3),
# with a 20 us floor; rates scale with HBM bandwidth on other GPUs.
CODEC_H200 = {"none": (200e-6, 99e-6), "fp8": (190e-6, 244e-6), "int8": (197e-6, 240e-6),
              "int4": (259e-6, 314e-6)}
CODEC_FLOOR_S = 20e-6


class RooflineModel(PerfModel):
    source = "roofline"

    def __init__(self, mc: ModelConfig, gpu_name: str, tp: int = 1, link_kind: str = "nvlink", **overrides):
        super().__init__(Shape.of(mc), gpu(gpu_name), tp, link_kind)
        self.k = dict(ROOFLINE, **overrides)
        self._c0 = 0.0

    def _linear(self, tokens: int) -> float:
        s, g, k = self.shape, self.spec, self.k
        mem = s.decode_read_bytes / (k["eta_weights"] * g.hbm_bytes_per_s)
        flops = 2 * s.layer_params * tokens / (k["eta_gemm"] * g.bf16_flops)
        return max(mem, flops)

    def _decode_line(self, b: int) -> tuple[list[float], list[float]]:
        s, g, c = self.shape, self.spec, self.k
        lm_head = 2 * s.embed_params * b / (c["eta_gemm"] * g.bf16_flops)
        t0 = s.num_layers * c["layer_fixed_s"] + self._linear(b) + lm_head + b * c["seq_s"]
        per_token = s.kv_bytes_per_token / (c["eta_kv"] * g.hbm_bytes_per_s)
        return [0.0, 1e6], [t0, t0 + 1e6 * per_token]

    def _prefill(self, n: int, c: float) -> float:
        s, g, k = self.shape, self.spec, self.k
        gpu_s = (s.num_layers * k["layer_fixed_s"] + self._linear(n)
                 + 4 * s.num_layers * s.q_size * attn_pairs(n, c) / (k["eta_attn"] * g.bf16_flops))
        return max(gpu_s, s.num_layers * k["eager_layer_s"]) + n * k["token_s"]

    def _kv_cache_bytes_tp1(self, util: float) -> float:
        k = self.k
        return self.spec.memory_bytes * util - self.shape.weight_bytes - k["activation_bytes"] - k["context_bytes"]

    def codec_layer_s(self, codec: str, tokens: int) -> tuple[float, float]:
        raw = 2 * tokens * self.shape.kv_size * DTYPE_BYTES
        ref = 8 * 2**20 * (4.8e12 / self.spec.hbm_bytes_per_s)     # H200 layer bytes, speed-scaled
        enc, dec = CODEC_H200[codec]
        return CODEC_FLOOR_S + (enc - CODEC_FLOOR_S) * raw / ref, CODEC_FLOOR_S + (dec - CODEC_FLOOR_S) * raw / ref


def make_model(mc: ModelConfig | None, gpu_name: str, tp: int = 1, link_kind: str = "nvlink",
               profile: dict | None = None) -> PerfModel:
    """A profile when given (its GPU must match), else the roofline model."""
    if profile is not None:
        from disagg.sim.profile_model import ProfileModel
        if gpu(profile["gpu"]) is not gpu(gpu_name):
            raise ValueError(f"the profile was measured on {profile['gpu']}, not {gpu_name}")
        return ProfileModel(profile, tp, link_kind)
    if mc is None:
        raise ValueError("a model config or a profile is needed")
    return RooflineModel(mc, gpu_name, tp, link_kind)

