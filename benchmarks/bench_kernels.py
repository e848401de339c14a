"""Kernel benchmark: each Triton kernel against the device's copy bandwidth and the torch reference.

    python3 benchmarks/bench_kernels.py            (on a CUDA GPU with triton)

One run measures
  * device-to-device copy bandwidth (1 GiB buffers; bytes read + written over time), the
    ceiling every kernel here is held to (all are memory bound);
  * per kernel at Llama-3-8B shapes (bf16; 32 q heads, 8 KV heads, head_dim 128, hidden
    4096, block_size 16): Triton time (triton.testing.do_bench, median; L2 flushed before
    each call, launch overhead included where it exceeds the flush), bytes moved / time,
    % of copy bandwidth, the same as CUDA-graph replays, and the torch reference's time;
  * paged_attention_decode at batch {1, 16, 64, 256} x context {512, 4096, 8192}, bytes =
    the KV cache read (B * ctx * Hkv * D * 2 tensors * 2 bytes), also timed as CUDA-graph
    replays (no launch gaps; inputs rotated among copies that overflow L2) - the way the
    decode loop runs it; plus batch 64 with mixed context lengths (S = splits used);
  * a sweep of split counts and tile configs at a few shapes, timed as graph replays.
Prints a table last; writes benchmarks/results/kernels_<gpu>.json (and $OUT/ if set).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from disagg.kernels import reference  # noqa: E402
from disagg.kernels import paged_attention as pa  # noqa: E402
from disagg.kernels.triton_ops import TRITON  # noqa: E402

DT = torch.bfloat16
HQ, HKV, D, HIDDEN, BS = 32, 8, 128, 4096, 16
GB = 1e9


def bench_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fns, calls: int = 20) -> float:
    """Median time of one call, from replays of a graph of `calls` calls cycling through `fns`
    (one per copy of the inputs, so that small problems are not served from a warm L2)."""
    fns = fns if isinstance(fns, list) else [fns]
    calls = max(calls, len(fns))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median") / calls


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def copy_bandwidth() -> dict:
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    copy = 2 * n / (ms * 1e-3) / GB
    x = src.view(torch.bfloat16)
    ms_read = bench_ms(lambda: x.sum(dtype=torch.float32))
    read = n / (ms_read * 1e-3) / GB
    del src, dst, x
    torch.cuda.empty_cache()
    return {"copy_gbps": copy, "copy_ms": ms, "read_sum_gbps": read, "buffer_bytes": n}


def row(name, nbytes, tri_fn, ref_fn, copy_gbps, err, graph_fns=None, **extra) -> dict:
    t = bench_ms(tri_fn)
    r = bench_ms(ref_fn) if ref_fn is not None else None
    g = graph_ms(graph_fns or tri_fn)
    gbps = nbytes / (t * 1e-3) / GB
    out = {"kernel": name, "bytes": nbytes, "triton_us": t * 1e3, "gbps": gbps,
           "pct_copy": 100 * gbps / copy_gbps, "ref_us": r * 1e3 if r else None,
           "speedup": r / t if r else None, "rel_err_vs_ref": err,
           "graph_us": g * 1e3, "graph_gbps": nbytes / (g * 1e-3) / GB, **extra}
    print(f"  {name:44s} {t * 1e3:9.1f} us {gbps:7.0f} GB/s {out['pct_copy']:5.1f}% copy"
          + (f"  ref {r * 1e3:9.1f} us" if r else ""), flush=True)
    return out


def bench_elementwise(copy_gbps) -> list[dict]:
    rows = []
    T = 8192
    x = torch.randn(T, HIDDEN, device="cuda", dtype=DT)
    res = torch.randn(T, HIDDEN, device="cuda", dtype=DT)
    w = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(DT)
    e = rel_err(TRITON.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    rows.append(row(f"rms_norm T={T} H={HIDDEN}", 2 * x.numel() * 2,
                    lambda: TRITON.rms_norm(x, w, 1e-5), lambda: reference.rms_norm(x, w, 1e-5),
                    copy_gbps, e))
    e = rel_err(TRITON.fused_add_rms_norm(x, res, w, 1e-5)[0],
                reference.fused_add_rms_norm(x, res, w, 1e-5)[0])
    rows.append(row(f"fused_add_rms_norm T={T} H={HIDDEN}", 4 * x.numel() * 2,
                    lambda: TRITON.fused_add_rms_norm(x, res, w, 1e-5),
                    lambda: reference.fused_add_rms_norm(x, res, w, 1e-5), copy_gbps, e))
    del x, res

    qkv = torch.randn(T, (HQ + 2 * HKV) * D, device="cuda", dtype=DT)
    q = qkv[:, :HQ * D].view(T, HQ, D)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(T, HKV, D)
    v = qkv[:, (HQ + HKV) * D:].view(T, HKV, D)
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float64) / D)
    ang = torch.arange(8192, device="cuda", dtype=torch.float64)[:, None] * inv
    cs = torch.cat([ang.cos(), ang.sin()], 1).float()
    pos = torch.randint(0, 8192, (T,), device="cuda")
    rq_tri = TRITON.rotary_embedding(q, k, pos, cs)[0]
    rq_gpu = reference.rotary_embedding(q, k, pos, cs)[0]
    rq_cpu = reference.rotary_embedding(q[:256].cpu(), k[:256].cpu(), pos[:256].cpu(), cs.cpu())[0]
    e = rel_err(rq_tri, rq_gpu)
    print(f"  rotary bf16 elements differing: triton vs torch-gpu "
          f"{(rq_tri != rq_gpu).float().mean().item():.4f}, triton vs torch-cpu "
          f"{(rq_tri[:256].cpu() != rq_cpu).float().mean().item():.4f}, torch-gpu vs torch-cpu "
          f"{(rq_gpu[:256].cpu() != rq_cpu).float().mean().item():.4f}")
    rows.append(row(f"rotary_embedding T={T} q32/k8 D={D}", 2 * (HQ + HKV) * D * 2 * T + T * D * 4,
                    lambda: TRITON.rotary_embedding(q, k, pos, cs),
                    lambda: reference.rotary_embedding(q, k, pos, cs), copy_gbps, e))

    nb = 2 * T // BS
    kc = torch.randn(nb, BS, HKV, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    slots = torch.randperm(nb * BS, device="cuda")[:T]
    rk, rv = kc.clone(), vc.clone()
    TRITON.write_kv(k, v, kc, vc, slots)
    reference.write_kv(k, v, rk, rv, slots)
    e = 0.0 if torch.equal(kc, rk) and torch.equal(vc, rv) else float("nan")
    rows.append(row(f"write_kv T={T} Hkv={HKV} D={D}", 2 * 2 * T * HKV * D * 2,
                    lambda: TRITON.write_kv(k, v, kc, vc, slots),
                    lambda: reference.write_kv(k, v, rk, rv, slots), copy_gbps, e))
    return rows


def make_decode(lens: list[int], copies: int = 1):
    """`copies` independent input sets [(q, k_cache, v_cache, block_tables, context_lens)]."""
    B, M = len(lens), triton.cdiv(max(lens), BS)
    sets = []
    for _ in range(copies):
        kc = torch.randn(B * M, BS, HKV, D, device="cuda", dtype=DT)
        vc = torch.randn_like(kc)
        bt = torch.randperm(B * M, device="cuda", dtype=torch.int32).view(B, M)
        cl = torch.tensor(lens, dtype=torch.int32, device="cuda")
        q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
        sets.append((q, kc, vc, bt, cl))
    return sets


def kv_bytes(lens) -> int:
    return sum(lens) * HKV * D * 2 * 2


def copies_for(nbytes: int) -> int:
    """Enough input copies to overflow L2 three times (at most 64)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(64, triton.cdiv(3 * l2, nbytes)))


def attn_fn(inputs, **kw):
    return lambda: pa.paged_attention_decode(*inputs, D ** -0.5, **kw)


def bench_decode(copy_gbps) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    mixed = torch.randint(1, 8193, (64,), generator=gen).tolist()
    mixed[0] = 8192
    cases = [(f"B={B} ctx={ctx}", [ctx] * B) for B in (1, 16, 64, 256) for ctx in (512, 4096, 8192)]
    cases.append(("B=64 ctx=mixed(1..8192)", mixed))
    for label, lens in cases:
        nbytes = kv_bytes(lens)
        sets = make_decode(lens, copies_for(nbytes))
        tri = attn_fn(sets[0])
        ref = lambda: reference.paged_attention_decode(*sets[0], D ** -0.5)  # noqa: E731
        try:
            e = rel_err(tri(), ref())
        except torch.OutOfMemoryError:
            ref, e = None, None
        torch.cuda.empty_cache()
        B, M = len(lens), sets[0][3].shape[1]
        splits = pa.choose_num_splits(B, HKV, M, BS, pa.default_config(DT, D)[0], pa._num_sms(0))
        r = row(f"paged_attention {label} S={splits}", nbytes, tri, ref, copy_gbps, e,
                batch=B, context=lens[0] if len(set(lens)) == 1 else "mixed",
                graph_fns=[attn_fn(x) for x in sets], num_splits=splits, input_copies=len(sets))
        rows.append(r)
        del sets
        torch.cuda.empty_cache()
    return rows


SWEEP_CONFIGS = [(64, 4, 3), (64, 4, 2), (64, 4, 4), (32, 4, 3), (128, 4, 3), (128, 8, 3), (64, 8, 3)]


def sweep_decode(copy_gbps) -> list[dict]:
    """Split counts x (BLOCK_N, num_warps, num_stages), timed as graph replays."""
    rows = []
    few = [SWEEP_CONFIGS[0], SWEEP_CONFIGS[3], SWEEP_CONFIGS[4]]
    for B, ctx, split_list, configs in ((64, 8192, (1, 2, 4, 8), SWEEP_CONFIGS),
                                        (16, 8192, (2, 4, 5, 8), few[:1]),
                                        (40, 8192, (2, 3, 4, 8), few[:1]),
                                        (1, 8192, (16, 32, 64), few)):
        nbytes = kv_bytes([ctx] * B)
        sets = make_decode([ctx] * B, copies_for(nbytes))
        base = attn_fn(sets[0])()
        for cfg in configs:
            for s in split_list:
                try:
                    e = rel_err(attn_fn(sets[0], num_splits=s, config=cfg)(), base)
                    t = graph_ms([attn_fn(x, num_splits=s, config=cfg) for x in sets])
                except Exception as exc:  # a config that fails to compile (shared memory)
                    print(f"  sweep B={B} ctx={ctx} cfg={cfg} splits={s}: {type(exc).__name__}")
                    continue
                gbps = nbytes / (t * 1e-3) / GB
                rows.append({"batch": B, "context": ctx, "block_n": cfg[0], "num_warps": cfg[1],
                             "num_stages": cfg[2], "num_splits": s, "graph_us": t * 1e3, "gbps": gbps,
                             "pct_copy": 100 * gbps / copy_gbps, "rel_err_vs_default": e})
        del sets
        torch.cuda.empty_cache()
    return rows


def compiled_kernels() -> list[dict]:
    """Registers, spills and shared memory of every paged-attention variant compiled so far."""
    rows = []
    for fn in (pa._paged_attention_decode_kernel, pa._paged_attention_reduce_kernel):
        try:
            for kernel_cache, *_ in fn.device_caches.values():
                for k in kernel_cache.values():
                    md = k.metadata
                    rows.append({"kernel": fn.__name__, "n_regs": k.n_regs, "n_spills": k.n_spills,
                                 "shared": md.shared, "num_warps": md.num_warps,
                                 "num_stages": md.num_stages,
                                 "constants": {str(a): str(b) for a, b in getattr(md, "constants", {}).items()}
                                 if isinstance(getattr(md, "constants", None), dict) else None})
        except Exception as exc:  # introspection only: Triton internals move between versions
            rows.append({"kernel": fn.__name__, "error": repr(exc)})
    return rows


def fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if value is not None else "-".rjust(width)


def main():
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    t0 = time.time()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw['copy_gbps']:.0f} GB/s (read+write), read (sum) {bw['read_sum_gbps']:.0f} GB/s",
          flush=True)
    elem = bench_elementwise(bw["copy_gbps"])
    dec = bench_decode(bw["copy_gbps"])
    sweep = sweep_decode(bw["copy_gbps"])
    gpu = re.sub(r"[^a-z0-9]+", "_", props.name.lower()).strip("_")
    result = {"gpu": props.name, "num_sms": props.multi_processor_count,
              "torch": torch.__version__, "triton": triton.__version__, "dtype": str(DT),
              "shape": {"num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "hidden": HIDDEN,
                        "block_size": BS},
              "bandwidth": bw, "kernels": elem, "paged_attention": dec, "sweep": sweep,
              "compiled": compiled_kernels(),
              "seconds": time.time() - t0,
              "command": "python3 benchmarks/bench_kernels.py"}
    text = json.dumps(result, indent=1)
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"kernels_{gpu}.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"kernels_{gpu}.json").write_text(text)

    print(f"\n== {props.name}: copy {bw['copy_gbps']:.0f} GB/s (read+write), "
          f"read-only (sum) {bw['read_sum_gbps']:.0f} GB/s; bf16, Llama-3-8B shapes")
    print(f"{'kernel':44s} {'triton us':>10s} {'GB/s':>7s} {'%copy':>6s} {'graph us':>9s} "
          f"{'%copy':>6s} {'ref us':>10s} {'x ref':>6s} {'err':>8s}")
    for r in elem + dec:
        graph_pct = 100 * r["graph_gbps"] / bw["copy_gbps"]
        print(f"{r['kernel']:44s} {r['triton_us']:10.1f} {r['gbps']:7.0f} {r['pct_copy']:6.1f} "
              f"{fmt(r.get('graph_us'), '9.1f')} {fmt(graph_pct, '6.1f')} {fmt(r['ref_us'], '10.1f')} "
              f"{fmt(r['speedup'], '6.1f')} {fmt(r['rel_err_vs_ref'], '8.1e')}")
    print("\nsweep, graph replays (B, ctx, BLOCK_N, warps, stages, splits): us, %copy; best 5 of each")
    for key in sorted({(s["batch"], s["context"]) for s in sweep}):
        best = sorted((s for s in sweep if (s["batch"], s["context"]) == key), key=lambda s: s["graph_us"])[:5]
        for s in best:
            print(f"  B={s['batch']:3d} ctx={s['context']:5d} n={s['block_n']:3d} w={s['num_warps']} "
                  f"st={s['num_stages']} splits={s['num_splits']:2d}: {s['graph_us']:8.1f} us "
                  f"{s['pct_copy']:5.1f}%  err {s['rel_err_vs_default']:.1e}")

    kinds = {(c.get("kernel"), c.get("n_regs"), c.get("n_spills"), c.get("shared"), c.get("num_warps"),
              c.get("num_stages")) for c in result["compiled"]}
    print("compiled (kernel, regs, spills, shared bytes, warps, stages):", sorted(kinds, key=str))


if __name__ == "__main__":
    main()
