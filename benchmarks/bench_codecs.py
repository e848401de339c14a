"""KV codec benchmark: what each codec costs in time and buys in bytes, per transferred layer.

    python benchmarks/bench_codecs.py            # CUDA + triton: the Triton kernels
    python benchmarks/bench_codecs.py --quick    # any device, small sizes (CPU: the torch reference)

Shape: one Llama-3-8B layer of a 2048-token batch, kv [2, 2048, Hkv 8, D 128] bf16 (8 MiB),
32 layers. Per codec:

    payload       bytes on the wire and ratio raw / payload
    encode/decode median time per layer (triton.testing.do_bench on CUDA, L2 flushed; host
                  timer on CPU) and throughput in uncompressed bytes/s; the checksum is included
    32 layers     one call per layer over 32 distinct layer tensors, launches included
    reference     the torch reference on the same device (the CPU path), for the speedup
    break-even    link bandwidth below which compressing pays when nothing overlaps:
                  raw/B > t_enc + t_dec + payload/B  <=>  B < (raw - payload) / (t_enc + t_dec)
    rel err       ||decode(encode(kv)) - kv|| / ||kv|| on N(0,1) keys with outlier channels

and the device's copy bandwidth as the ceiling (a codec reads raw and writes payload bytes).
Writes benchmarks/results/codecs_<device>.json (codecs_quick_<device>.json with --quick), and
$OUT/ when set. The table printed last is the summary.
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

from benchmarks import common  # noqa: E402
from kvtransfer.codec import CODECS, get_codec  # noqa: E402

GB = 1e9


def make_kv(T: int, H: int, D: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    kv = torch.randn(2, T, H, D, device=device, generator=g)
    kv[0] += 8.0 * (torch.rand(D, device=device, generator=g) < 0.05)   # a few outlier key channels
    return kv.to(dtype)


def median_s(fn, device: torch.device, quick: bool) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100 if not quick else 20, return_mode="median") / 1e3
    return common.summarize(common.time_host(fn, device, iters=3 if quick else 10, warmup=1))["median_s"]


def bench_codec(name: str, layers: list[torch.Tensor], device: torch.device, quick: bool,
                with_ref: bool) -> dict:
    codec = get_codec(name)
    kv = layers[0]
    shape, dtype = tuple(kv.shape), kv.dtype
    raw = kv.numel() * kv.element_size()
    payload = codec.encode(kv)
    out, ok = codec.decode(payload, shape, dtype)
    assert bool(ok), f"{name}: checksum failed on an intact payload"
    rel_err = ((out.double() - kv.double()).norm() / kv.double().norm()).item()
    out = torch.empty_like(kv)
    t_enc = median_s(lambda: codec.encode(kv), device, quick)
    t_dec = median_s(lambda: codec.decode(payload, shape, dtype, out=out), device, quick)
    payloads = [codec.encode(x) for x in layers]
    t_enc_all = median_s(lambda: [codec.encode(x) for x in layers], device, quick)
    t_dec_all = median_s(lambda: [codec.decode(p, shape, dtype, out=out) for p in payloads], device, quick)
    row = {"codec": name, "raw_bytes": raw, "payload_bytes": payload.numel(), "ratio": raw / payload.numel(),
           "encode_s": t_enc, "decode_s": t_dec, "encode_raw_gbps": raw / t_enc / GB,
           "decode_raw_gbps": raw / t_dec / GB,
           "encode_traffic_gbps": (raw + payload.numel()) / t_enc / GB,   # bytes read + written
           "decode_traffic_gbps": (raw + payload.numel()) / t_dec / GB,
           f"encode_{len(layers)}_layers_s": t_enc_all, f"decode_{len(layers)}_layers_s": t_dec_all,
           "break_even_link_gbps": (raw - payload.numel()) / (t_enc + t_dec) / GB if raw > payload.numel()
           else None, "rel_err": rel_err}
    if with_ref:
        ref = get_codec(name, use_triton=False)
        row["ref_encode_s"] = median_s(lambda: ref.encode(kv), device, quick)
        row["ref_decode_s"] = median_s(lambda: ref.decode(payload, shape, dtype, out=out), device, quick)
        row["speedup_encode"] = row["ref_encode_s"] / t_enc
        row["speedup_decode"] = row["ref_decode_s"] / t_dec
    return row


def print_table(res: dict) -> None:
    s = res["shape"]
    print(f"\nKV codecs on {res['machine'].get('gpu') or 'cpu'}: kv [2, {s['T']}, {s['Hkv']}, {s['D']}] "
          f"{s['dtype']} per layer, {s['layers']} layers; copy bandwidth {res['copy_gbps']:.0f} GB/s"
          f"{' (crude)' if res['machine']['device_type'] != 'cuda' else ''}")
    L = s["layers"]
    print(f"{'codec':6s} {'ratio':>6s} {'enc us':>9s} {'dec us':>9s} {'enc GB/s':>9s} {'dec GB/s':>9s} "
          f"{f'{L}L enc ms':>10s} {f'{L}L dec ms':>10s} {'ref enc x':>9s} {'break-even':>11s} {'rel err':>8s}")
    for r in res["codecs"]:
        be = f"{r['break_even_link_gbps']:8.2f} GB/s" if r["break_even_link_gbps"] else f"{'-':>11s}"
        sp = f"{r['speedup_encode']:8.1f}x" if "speedup_encode" in r else f"{'-':>9s}"
        print(f"{r['codec']:6s} {r['ratio']:6.2f} {r['encode_s'] * 1e6:9.1f} {r['decode_s'] * 1e6:9.1f} "
              f"{r['encode_raw_gbps']:9.1f} {r['decode_raw_gbps']:9.1f} {r[f'encode_{L}_layers_s'] * 1e3:10.2f} "
              f"{r[f'decode_{L}_layers_s'] * 1e3:10.2f} {sp} {be} {r['rel_err']:8.1e}")
    print("GB/s: uncompressed bytes per second; break-even: compress on links slower than this "
          "(no overlap of encode/decode with the transfer)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few iterations (CPU smoke run)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per layer (default 2048, quick 256)")
    ap.add_argument("--layers", type=int, default=None, help="layers (default 32, quick 4)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-ref", action="store_true", help="skip timing the torch reference on the GPU")
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    T = args.tokens or (256 if args.quick else 2048)
    L = args.layers or (4 if args.quick else 32)
    dtype = getattr(torch, args.dtype)
    layers = [make_kv(T, args.kv_heads, args.head_dim, dtype, device, seed=i) for i in range(L)]
    copy = common.copy_bandwidth(device, nbytes=None if not args.quick else 16 * 2**20)
    res = {"what": "KV codec encode/decode per transferred layer", "command": " ".join(sys.argv),
           "machine": common.machine_info(device), "copy_gbps": copy["bytes_per_s"] / GB, "copy": copy,
           "shape": {"T": T, "Hkv": args.kv_heads, "D": args.head_dim, "dtype": args.dtype, "layers": L},
           "timer": "triton.testing.do_bench median" if device.type == "cuda" else "host timer median",
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "codecs": []}
    for name in CODECS:
        res["codecs"].append(bench_codec(name, layers, device, args.quick,
                                         with_ref=device.type == "cuda" and not args.no_ref))
        print(f"  {name}: done", flush=True)
    slug = common.device_slug(device)
    res["json_paths"] = common.write_json(res, f"codecs_{'quick_' if args.quick else ''}{slug}.json",
                                          args.results_dir)
    print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
