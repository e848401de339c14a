"""The paged decode kernel with one long context among short ones, against the split count.

    python benchmarks/bench_straggler.py          # GPU, ~20 s

The kernel gives every request of a batch the same number of split-K programs, chosen from the
batch size and the block table's width (CUDA-graph safe), so one long context is processed by
as few programs as a short one and becomes the tail of the step. For Llama-3-8B's attention
shape (32 query / 8 KV heads, head 128, bf16, 16-token blocks scattered over the cache, 8,192-token
table width) and batches of 16 / 48 / 96: equal contexts against the same KV tokens with one
request at 6,144, at the automatic split count and forced ones. Times one layer's kernel
(median of CUDA-event timings over 50 back-to-back calls). Writes
benchmarks/results/straggler_<gpu>.json ($OUT too).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    import torch

    from disagg.kernels.paged_attention import _num_sms, choose_num_splits, default_config, paged_attention_decode
    dev = torch.device("cuda")
    hq, hkv, d, bs, width = 32, 8, 128, 16, 512
    nblocks = 96 * width
    kc = torch.randn(nblocks, bs, hkv, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    ids = list(range(nblocks))
    random.Random(0).shuffle(ids)
    rows = []
    for b in (16, 48, 96):
        mean = 1280
        long = 6144
        cases = {"equal": [mean] * b,
                 "one long": [long] + [round((mean * b - long) / (b - 1))] * (b - 1)}
        auto = choose_num_splits(b, hkv, width, bs, default_config(torch.bfloat16, d)[0], _num_sms(0))
        for name, ctx in cases.items():
            tables = torch.tensor([ids[i * width:(i + 1) * width] for i in range(b)], device=dev, dtype=torch.int32)
            lens = torch.tensor(ctx, device=dev, dtype=torch.int32)
            q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
            for s in sorted({auto, 2, 4, 8, 16, 32}):
                fn = lambda: paged_attention_decode(q, kc, vc, tables, lens, d ** -0.5, num_splits=s)  # noqa: E731
                for _ in range(5):
                    fn()
                ts = []
                for _ in range(50):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    fn()
                    e1.record()
                    e1.synchronize()
                    ts.append(e0.elapsed_time(e1) * 1e3)
                us = statistics.median(ts)
                rows.append({"batch": b, "contexts": name, "kv_tokens": sum(ctx), "splits": s, "auto": s == auto,
                             "us": us})
                print(f"B={b:>3} {name:<9} S={s:>2}{'*' if s == auto else ' '} {us:8.1f} us", flush=True)
    name = torch.cuda.get_device_name(dev)
    out = os.path.join(ROOT, "benchmarks/results", f"straggler_{name.lower().replace(' ', '-')}.json")
    with open(out, "w") as f:
        json.dump({"benchmark": "straggler", "device": name, "rows": rows}, f, indent=1)
    if os.environ.get("OUT"):
        shutil.copy(out, os.environ["OUT"])
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
