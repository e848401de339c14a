"""End-to-end `disagg serve` on real GPUs: start the server, stream concurrent chat requests, report.

    python benchmarks/serve_smoke.py --mode disagg   # disagg serve DIR --prefill 1 --decode 1 (2 GPUs)
    python benchmarks/serve_smoke.py --mode colocated

The checkpoint is a Llama-3-8B-shaped directory with random bf16 weights (--load-format dummy)
and a word-level tokenizer of the same vocabulary, written to a temp dir. Prompts are random
words of --prompt-len tokens; answers are exactly --max-tokens long (ignore_eos).
Prints TTFT / ITL percentiles, the server's KV-transfer metrics, and writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                 tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=0, eos_token_id=1)


def make_checkpoint(path: str, shape: str) -> None:
    from conftest import write_tiny_tokenizer
    cfg = dict(LLAMA3_8B)
    if shape == "tiny":
        cfg.update(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, torch_dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_tiny_tokenizer(path, vocab=cfg["vocab_size"])


async def one(session, url, prompt, max_tokens):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with session.post(url, json=body) as r:
        if r.status != 200:
            return {"error": await r.text()}
        async for line in r.content:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                d = json.loads(line[6:])
                if d["choices"] and d["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "n": len(stamps),
            "e2e": stamps[-1] - t0}


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


async def drive(port, n, concurrency, prompt_len, max_tokens, vocab):
    import aiohttp
    rnd = random.Random(0)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as s:
        async def task():
            prompt = " ".join(f"t{rnd.randrange(3, vocab)}" for _ in range(prompt_len))
            async with sem:
                return await one(s, url, prompt, max_tokens)
        t0 = time.perf_counter()
        res = await asyncio.gather(*[task() for _ in range(n)])
        wall = time.perf_counter() - t0
        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            metrics = [l for l in (await r.text()).splitlines() if l.startswith("disagg:kv_transfer")]
    return res, wall, metrics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["disagg", "colocated"], default="disagg")
    ap.add_argument("--shape", choices=["llama3-8b", "tiny"], default="llama3-8b")
    ap.add_argument("--kv-codec", default="auto")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--startup-timeout", type=float, default=400)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="smoke-ckpt-")
    make_checkpoint(d, args.shape)
    cmd = [sys.executable, "-m", "disagg.cli", "serve", d, "--load-format", "dummy", "--port", str(args.port),
           "--max-model-len", "4096"]
    cmd += ["--prefill", "1", "--decode", "1", "--kv-codec", args.kv_codec] if args.mode == "disagg" else ["--colocated"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT + ":" + os.environ.get("PYTHONPATH", "")})
    try:
        import urllib.request
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=2)
                break
            except Exception:  # noqa: BLE001
                if proc.poll() is not None or time.perf_counter() - t0 > args.startup_timeout:
                    raise SystemExit(f"server did not come up (rc={proc.poll()})")
                time.sleep(2)
        startup = time.perf_counter() - t0
        vocab = 384 if args.shape == "tiny" else 128256
        res, wall, metrics = asyncio.run(drive(args.port, args.requests, args.concurrency, args.prompt_len,
                                               args.max_tokens, vocab))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    errors = [r["error"] for r in res if "error" in r]
    ok = [r for r in res if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    out = {"mode": args.mode, "shape": args.shape, "kv_codec": args.kv_codec, "requests": args.requests,
           "concurrency": args.concurrency, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
           "startup_s": startup, "wall_s": wall, "errors": errors[:3], "num_errors": len(errors),
           "tokens_per_request": sorted({r["n"] for r in ok}),
           "ttft_ms": {p: 1e3 * pct(ttft, p) for p in (50, 90, 99)},
           "itl_ms": {p: 1e3 * pct(itl, p) for p in (50, 90, 99)},
           "output_tok_per_s": sum(r["n"] for r in ok) / wall, "kv_transfer_metrics": metrics}
    print(json.dumps(out, indent=1))
    name = f"serve_smoke_{args.mode}_{args.shape}.json"
    for base in (os.path.join(ROOT, "benchmarks", "results"), os.environ.get("OUT")):
        if base:
            with open(os.path.join(base, name), "w") as f:
                json.dump(out, f, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
