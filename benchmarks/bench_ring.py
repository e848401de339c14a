"""Ring prefill (context parallelism) on N GPUs against one GPU; Llama-3-8B shape, random bf16 weights.

    python3 benchmarks/bench_ring.py               # 2 GPUs (NCCL): 32K, 64K, 128K prompts; ~4-6 min
    python3 benchmarks/bench_ring.py --tiny        # CPU smoke run: gloo, 2 processes, tiny shape (~1 min)

The parent spawns one process per GPU (no torchrun; rendezvous on 127.0.0.1). Every rank builds the
whole model with the same random weights (EngineConfig's load_format "dummy"), so only the sequence
is split. Per prompt length S, rank 0 of the result table reports:

    cp=1       one GPU, the engine's own prefill path (flash causal SDPA over the whole prompt),
               KV written to a paged cache, logits of the last token only
    ring1      (--ring1-lengths) one GPU through the ring code (zigzag chunks, LSE merge, no
               communication): the cost of splitting the attention into blocks
    cp=N       prefill/ring_prefill.ring_prefill on N GPUs; the leader writes every KV slice into
               its cache as the single-GPU prefill does; time = slowest rank, ranks start together
    speedup    cp=1 / cp=N  (target: >= 1.7x at 64K on 2 GPUs)

Communication hidden behind compute, measured on one layer's attention at the same S (random
q [S/N, 32, 128], k/v [S/N, 8, 128]):  t_both = ring_attention; t_compute = the same blocks with the
K/V slices already local; t_comm = the same isend/irecv steps alone;
    hidden = (t_compute + t_comm - t_both) / t_comm     (1: fully hidden, 0: fully exposed)

Roofline in the same run: R = bf16 matmul rate (benchmarks/common.matmul_rate, 8192^3) per GPU;
    FLOPs = 2 * (linear params of the layers) * S + 4 * layers * S(S+1)/2 * q_size + 2 * (LM head) * 1
    fraction = FLOPs / (gpus * R * time)
Before timing, a check at S = 4096: the ring's last-token logits against the single-GPU prefill's.

Results: benchmarks/results/ring_<gpu>.json (rewritten after every length, copied to $OUT).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import common  # noqa: E402
from disagg.config import ModelConfig  # noqa: E402
from disagg.kernels import get_kernels  # noqa: E402
from disagg.model.llama import AttnMetadata, LlamaModel, PrefillSeq  # noqa: E402
from disagg.model.loader import dummy_weights  # noqa: E402
from prefill.ring_attention import (_Accumulator, _step, attention_lse, attention_lse_reference,  # noqa: E402
                                    ring_attention, slice_len, zigzag_bounds, zigzag_positions)
from prefill.ring_prefill import ring_prefill  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                 rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
                 rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192))
TINY = dict(LLAMA3_8B, vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64)
BLOCK = 16


def log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[bench_ring {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_config(tiny: bool) -> ModelConfig:
    return ModelConfig.from_hf_dict(dict(architectures=["LlamaForCausalLM"], **(TINY if tiny else LLAMA3_8B)),
                                    name="llama3-8b-shape" if not tiny else "tiny")


def flops(cfg: ModelConfig, S: int) -> tuple[int, int]:
    """(total, attention) FLOPs of prefilling S tokens with logits of the last one."""
    h = cfg.hidden_size
    lin = cfg.num_layers * (h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * cfg.intermediate_size)
    attn = 4 * cfg.num_layers * (S * (S + 1) // 2) * cfg.q_size
    return 2 * lin * S + attn + 2 * cfg.vocab_size * h, attn


# ---------------------------------------------------------------------- timing across ranks
def timed(fn, dev: torch.device, iters: int, warmup: int, together: bool) -> list[float]:
    """Host seconds per call; together: all ranks start each call at a barrier and the slowest counts."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        common.sync(dev)
        if together:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        common.sync(dev)
        out.append(time.perf_counter() - t0)
    if together:
        t = torch.tensor(out, dtype=torch.float64, device=dev if dev.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = t.tolist()
    return out


class Prefill:
    """The model, its cache and the three prefill paths on one rank."""

    def __init__(self, cfg: ModelConfig, dev: torch.device, max_len: int, keeps_kv: bool):
        self.cfg, self.dev = cfg, dev
        self.model = LlamaModel(cfg, get_kernels(), dev, torch.bfloat16 if dev.type == "cuda" else torch.float32,
                                max_positions=max_len)
        self.model.load_state(dummy_weights(cfg, dev, self.model.dtype, seed=0))   # same weights on every rank
        nb = -(-max_len // BLOCK) if keeps_kv else 1
        self.cache = torch.zeros(cfg.num_layers, 2, nb, BLOCK, cfg.num_kv_heads, cfg.head_dim, device=dev,
                                 dtype=self.model.dtype)
        self.kv = [(self.cache[i, 0], self.cache[i, 1]) for i in range(cfg.num_layers)]
        self.keeps_kv = keeps_kv

    def ids(self, S: int) -> torch.Tensor:
        return torch.randint(0, self.cfg.vocab_size, (S,), generator=torch.Generator().manual_seed(S)).to(self.dev)

    @torch.inference_mode()
    def single(self, ids: torch.Tensor) -> torch.Tensor:
        S = ids.shape[0]
        meta = AttnMetadata(slot_mapping=torch.arange(S, device=self.dev),
                            prefills=[PrefillSeq(0, S, S, torch.zeros(1, dtype=torch.long, device=self.dev))])
        h = self.model.forward(ids, torch.arange(S, device=self.dev), meta, self.kv)
        return self.model.compute_logits(h[-1:])

    @torch.inference_mode()
    def ring(self, ids: torch.Tensor, group) -> torch.Tensor | None:
        slots = torch.arange(ids.shape[0], device=self.dev) if self.keeps_kv else None
        h = ring_prefill(self.model, self.kv, ids, group, slots)
        return None if h is None else self.model.compute_logits(h)


# ---------------------------------------------------------------------- overlap of one layer's attention
@torch.inference_mode()
def attention_overlap(cfg: ModelConfig, S: int, dev, dtype, iters: int) -> dict:
    cp, rank = dist.get_world_size(), dist.get_rank()
    L, Hq, Hkv, D = slice_len(S, cp, rank), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = torch.Generator(device=dev).manual_seed(rank)
    q = torch.randn(L, Hq, D, device=dev, dtype=dtype, generator=g)
    k, v = (torch.randn(L, Hkv, D, device=dev, dtype=dtype, generator=g) for _ in range(2))
    kvs = {src: torch.randn(2, slice_len(S, cp, src), Hkv, D, device=dev, dtype=dtype, generator=g)
           for src in range(cp)}
    scale = D ** -0.5
    bounds = zigzag_bounds(S, cp)
    nxt, prv = (rank + 1) % cp, (rank - 1) % cp

    def both():
        ring_attention(q, k, v, S, scale, dist.group.WORLD)

    def compute():
        torch.stack((k, v)).contiguous()
        acc = _Accumulator(L, Hq, D, dev)
        for s in range(cp):
            src = (rank - s) % cp
            _step(acc, q, kvs[src], bounds, cp, rank, src, scale, attention_lse)
        acc.out.to(dtype)

    def comm():
        send = kvs[rank]
        for s in range(cp - 1):
            buf = torch.empty_like(kvs[(rank - s - 1) % cp])
            for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, buf, prv)]):
                w.wait()
            send = buf

    res = {}
    for name, fn in (("compute", compute), ("comm", comm), ("both", both)):
        res[name] = common.summarize(timed(fn, dev, iters, warmup=2, together=True))
    tc, tm, tb = (res[n]["median_s"] for n in ("compute", "comm", "both"))
    res["hidden_fraction"] = max(0.0, min(1.0, (tc + tm - tb) / tm)) if tm > 0 else None
    res["exposed_comm_s"] = max(0.0, tb - tc)
    res["bytes_per_step"] = kvs[rank].numel() * kvs[rank].element_size()
    return res


# ---------------------------------------------------------------------- per rank
def check(p: Prefill, rank: int, S: int, dev) -> dict:
    """Ring last-token logits vs the single-GPU prefill's, and the LSE attention kernel vs its reference."""
    ids = p.ids(S)
    ring = p.ring(ids, dist.group.WORLD)
    out = {"prompt_len": S}
    if rank == 0:
        ref = p.single(ids)
        out.update(max_abs_logit_diff=(ring - ref).abs().max().item(), ref_max_abs_logit=ref.abs().max().item(),
                   same_argmax=bool(ring.argmax() == ref.argmax()))
        g = torch.Generator(device=dev).manual_seed(1)
        q = torch.randn(257, p.cfg.num_heads, p.cfg.head_dim, device=dev, dtype=p.model.dtype, generator=g)
        k, v = (torch.randn(257, p.cfg.num_kv_heads, p.cfg.head_dim, device=dev, dtype=p.model.dtype, generator=g)
                for _ in range(2))
        for causal in (False, True):
            o1, l1 = attention_lse(q, k, v, causal, 0.1)
            o2, l2 = attention_lse_reference(q, k, v, causal, 0.1)
            out[f"lse_kernel_{'causal' if causal else 'full'}"] = dict(
                max_abs_out_diff=(o1.float() - o2.float()).abs().max().item(), max_abs_lse_diff=(l1 - l2).abs().max().item())
    return out


def _bench(rank: int, world: int, dev, a: dict) -> None:
    cfg = model_config(a["tiny"])
    lengths = a["lengths"]
    res = dict(bench="ring_prefill", machine=common.machine_info(dev), gpus=world, model=cfg.name,
               shape=dict(layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_heads,
                          kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate=cfg.intermediate_size,
                          vocab=cfg.vocab_size), command=" ".join(sys.argv), started=time.strftime("%Y-%m-%dT%H:%M:%S"),
               results=[])
    rate = common.matmul_rate(dev)
    rates = torch.tensor([rate["flop_per_s"]], dtype=torch.float64, device=dev if dev.type == "cuda" else "cpu")
    all_rates = [torch.zeros_like(rates) for _ in range(world)]
    dist.all_gather(all_rates, rates)
    res["matmul_rate"] = rate
    res["matmul_rate_per_gpu"] = [r.item() for r in all_rates]
    R = min(res["matmul_rate_per_gpu"])
    log(rank, f"matmul rate {R / 1e12:.0f} TFLOP/s (slowest GPU); building the model on {world} ranks")
    p = Prefill(cfg, dev, max(lengths + [a["check_len"]]), keeps_kv=rank == 0)
    res["check"] = check(p, rank, a["check_len"], dev)
    log(rank, f"check at S={a['check_len']}: {res['check']}")
    slug = "cpu-tiny" if a["tiny"] else common.device_slug(dev)
    for S in lengths:
        total, attn = flops(cfg, S)
        row = dict(prompt_len=S, flops=total, attention_flops=attn)
        ids = p.ids(S)
        if rank == 0:
            t = common.summarize(timed(lambda: p.single(ids), dev, a["iters"], a["warmup"], together=False))
            row["cp1"] = dict(t, fraction_of_matmul=total / (R * t["median_s"]))
            log(rank, f"S={S} cp=1: {t['median_s'] * 1e3:.1f} ms ({row['cp1']['fraction_of_matmul']:.2f} of R)")
            if S in a["ring1_lengths"]:
                t = common.summarize(timed(lambda: p.ring(ids, None), dev, a["iters"], a["warmup"], together=False))
                row["ring1"] = dict(t, fraction_of_matmul=total / (R * t["median_s"]))
                log(rank, f"S={S} ring code on 1 GPU: {t['median_s'] * 1e3:.1f} ms")
        dist.barrier()
        t = common.summarize(timed(lambda: p.ring(ids, dist.group.WORLD), dev, a["iters"], a["warmup"], together=True))
        row[f"cp{world}"] = dict(t, fraction_of_matmul=total / (world * R * t["median_s"]))
        row["overlap_one_layer_attention"] = attention_overlap(cfg, S, dev, p.model.dtype, a["overlap_iters"])
        if rank == 0:
            row["speedup"] = row["cp1"]["median_s"] / t["median_s"]
            ov = row["overlap_one_layer_attention"]
            log(rank, f"S={S} cp={world}: {t['median_s'] * 1e3:.1f} ms, speedup {row['speedup']:.2f}x, "
                      f"{row[f'cp{world}']['fraction_of_matmul']:.2f} of {world}R; one layer's attention: compute "
                      f"{ov['compute']['median_s'] * 1e3:.2f} ms, comm {ov['comm']['median_s'] * 1e3:.2f} ms, both "
                      f"{ov['both']['median_s'] * 1e3:.2f} ms -> hidden {ov['hidden_fraction']}")
            res["results"].append(row)
            res["json_paths"] = common.write_json(res, f"ring_{slug}.json")
        del ids
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        print_table(res, world)


def print_table(res: dict, world: int) -> None:
    print(f"\nring prefill, {res['model']}, {world} GPUs ({res['machine'].get('gpu') or 'cpu'})")
    print(f"{'S':>7} {'cp=1 ms':>9} {'frac':>5} {f'cp={world} ms':>9} {'frac':>5} {'speedup':>8} "
          f"{'attn comm ms':>12} {'hidden':>7}")
    for r in res["results"]:
        c1, cN, ov = r["cp1"], r[f"cp{world}"], r["overlap_one_layer_attention"]
        hid = ov["hidden_fraction"]
        print(f"{r['prompt_len']:>7} {c1['median_s'] * 1e3:>9.1f} {c1['fraction_of_matmul']:>5.2f} "
              f"{cN['median_s'] * 1e3:>9.1f} {cN['fraction_of_matmul']:>5.2f} {r['speedup']:>7.2f}x "
              f"{ov['comm']['median_s'] * 1e3:>12.2f} {'n/a' if hid is None else f'{hid:.2f}':>7}")
    print("JSON:", ", ".join(res.get("json_paths", [])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: gloo, tiny shape, short prompts")
    ap.add_argument("--gpus", type=int, default=2, help="ring size (processes)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (default 32K 64K 128K)")
    ap.add_argument("--ring1-lengths", type=int, nargs="*", default=None,
                    help="also time the ring code on one GPU at these lengths (default: 64K)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--overlap-iters", type=int, default=5)
    ap.add_argument("--check-len", type=int, default=None)
    a = ap.parse_args()
    if a.lengths is None:
        a.lengths = [256, 1000, 2048] if a.tiny else [32768, 65536, 131072]
    if a.ring1_lengths is None:
        a.ring1_lengths = [1000] if a.tiny else [65536]
    if a.check_len is None:
        a.check_len = 257 if a.tiny else 4096
    if not a.tiny and torch.cuda.device_count() < a.gpus:
        raise SystemExit(f"need {a.gpus} GPUs, found {torch.cuda.device_count()} (use --tiny on CPU)")
    common.spawn_ranks(_bench, a.gpus, vars(a))


if __name__ == "__main__":
    main()
