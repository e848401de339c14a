"""`disagg profile`: measure the performance model of one model shape on one GPU.

    disagg profile --model-config llama3-8b --out h200_llama3_8b.json        (about 2-3 minutes)
    disagg profile /models/Llama-3.1-8B-Instruct                              (only config.json is read)

What runs is the engine's own ModelRunner with random weights of the checkpoint's shapes
(EngineConfig(load_format="dummy")), driven with hand-built SchedulerOutputs, timed end to end
(runner.execute: input preparation, CUDA-graph replay or eager forward, sampling, the host read
of the tokens; the GPU synchronized before and after; median of several runs):

    decode       batch B x context c (c - 1 cached tokens, one new token each): CUDA graphs,
                 B at every captured graph size (a batch runs padded up to the next one)
    straggler    decode steps with one long context among 1,024-token ones, against equal contexts
    prefill      one prompt chunk of n tokens after c cached ones (eager, as every prefill runs)
    multi        k prompts of n tokens in one step -> per_prompt_s (extra cost per prompt)
    mixed        decodes + a prefill chunk in one step: measured against the model's prediction
                 (PerfModel.prefill_chunks_time), reported as `validation`, not used by it
    host         LLMEngine.step minus runner.execute (scheduling, blocks, prefix hashes, updates,
                 outputs) against the batch size and a new prompt's length, around this runner
    codecs       per layer: gather + encode (prefill side), decode + checksum + scatter (decode side),
                 all of the model's layers back to back, one synchronisation (as a prompt streams)
    link         --link-peer cuda:1: copies to the peer GPU (latency + bytes / bandwidth);
                 otherwise the datasheet link (disagg/sim/gpus.py, fitted to NCCL on two H200s)

Profile JSON (format disagg-perf-profile-v1), seconds throughout:
    gpu, gpu_memory_bytes, torch, dtype, model {name, config (HF dict)},
    kv_cache {num_blocks, block_size, gpu_memory_utilization, max_num_batched_tokens},
    decode {batch [B], context [c], seconds [B][c] (null: did not fit the KV cache), graph_sizes},
    decode_straggler {batch [B], max_context [M], base_context, extra_s [B][M]}: a decode step of
             B - 1 requests at the base context and one at M, minus the same KV tokens equally shared,
    prefill {tokens [n], context [c], seconds [n][c] (null: past max_model_len), buckets [P]
             (the piecewise graphs' token buckets: a step of n tokens runs padded to the next one)},
    multi [{prompts, tokens, seconds}], per_prompt_s, host {sched_s, sched_seq_s, chunk_s, chunk_token_s},
    mixed_decode {batch [i], prefill_tokens [i], context, extra_s [i]}: a step of B decodes (at
             `context`) and one chunk of n tokens, minus what the tables predict for it,
    codecs {name: {tokens [T], encode_s [T], decode_s [T], ratio}}, link {kind, bytes_per_s,
    latency_s, method}, validation [{batch, context, prefill_tokens, prefill_context, seconds,
    predicted_s, error}], elapsed_s, partial (true when --budget-s cut the measurements short)
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from disagg.sim.serving_probe import host_overhead, write_model_dir

FULL = dict(batch=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256),     # the captured graph sizes
            context=(128, 512, 1024, 2048, 4096, 8192),
            # every piecewise bucket (disagg/engine/piecewise.py), then eager sizes
            tokens=(16, 32, 64, 128, 192, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 4096, 8192),
            pcontext=(0, 1024, 2048, 4096),     # 2,048: a long prompt's second chunk (the budget)
            multi=((4, 512), (8, 256), (16, 128), (4, 2048)), codec_tokens=(256, 1024, 4096),
            mixed=((32, 1024, 512, 0), (64, 2048, 1024, 0), (16, 512, 2048, 2048), (128, 1024, 256, 0)),
            mixed_batch=(1, 4, 8, 16, 32, 64, 128, 256), mixed_tokens=(64, 256, 1024), mixed_context=1024,
            straggler_batch=(16, 48, 96, 160), straggler_context=(2048, 4096, 8192), straggler_base=1024,
            host_s=12.0)
QUICK = dict(batch=(1, 8, 64), context=(128, 1024), tokens=(64, 512, 2048), pcontext=(0, 1024),
             multi=((4, 128),), codec_tokens=(256,), mixed=((8, 512, 256, 0),), mixed_batch=(1, 8),
             straggler_batch=(8,), straggler_context=(512,), straggler_base=128, host_s=2.0)


def log(msg: str) -> None:
    print(f"[profile {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Blocks:
    """Distinct block ids scattered over the whole cache (as after churn), one pool per measurement."""
    _order: dict[int, list[int]] = {}

    def __init__(self, n: int):
        if n not in self._order:
            import random
            ids = list(range(n))
            random.Random(0).shuffle(ids)
            self._order[n] = ids
        self.ids, self.next = self._order[n], 0

    def take(self, k: int) -> list[int]:
        if self.next + k > len(self.ids):
            raise MemoryError("KV cache too small for this point")
        out = self.ids[self.next:self.next + k]
        self.next += k
        return out


def _resolve_config(args) -> tuple[dict, str]:
    from disagg.sim.cli import HERE, MODELS
    spec = args.model_config or args.model_dir
    if spec is None:
        raise SystemExit("error: give a checkpoint directory or --model-config FILE|NAME")
    if spec in MODELS:
        path, name = os.path.join(HERE, "configs", MODELS[spec]), os.path.splitext(MODELS[spec])[0]
    elif os.path.isdir(spec):
        path, name = os.path.join(spec, "config.json"), os.path.basename(os.path.normpath(spec))
    else:
        path, name = spec, os.path.splitext(os.path.basename(spec))[0]
    with open(path) as f:
        return json.load(f), name


def main(args) -> int:
    import torch

    from disagg.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from disagg.engine.model_runner import ModelRunner
    t_start = time.perf_counter()
    hf, name = _resolve_config(args)
    grid = QUICK if args.quick else FULL
    d = write_model_dir(hf)                 # the engine's host work is measured too: it wants a tokenizer
    dev = torch.device(args.device if (args.device != "cuda" or torch.cuda.is_available()) else "cpu")
    dtype = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    mc = ModelConfig.from_hf_dict(hf, name=name)
    max_len = min(args.max_model_len, mc.max_position_embeddings)
    cfg = EngineConfig(d, dtype=dtype, device=str(dev), load_format="dummy",
                       cache=CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization),
                       scheduler=SchedulerConfig(max_num_seqs=max(grid["batch"]), max_num_batched_tokens=2048,
                                                 max_model_len=max_len))
    log(f"{name} on {dev} ({dtype}): loading random weights, sizing the KV cache, capturing graphs")
    runner = ModelRunner(cfg, mc, max_len)
    gpu_name = args.gpu_name or (torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")
    log(f"{runner.num_blocks} KV blocks of {runner.block_size}; ready in {time.perf_counter() - t_start:.0f}s")
    prof = measure(runner, hf, name, gpu_name, grid, t_start + args.budget_s, args.link_peer,
                   args.gpu_memory_utilization, quick=args.quick)
    prof["elapsed_s"] = time.perf_counter() - t_start
    out = args.out or _default_out(gpu_name, name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(prof, f, indent=1)
    log(f"wrote {out} in {prof['elapsed_s']:.0f}s" + (" (partial: --budget-s reached)" if prof["partial"] else ""))
    return 0


def measure(runner, hf: dict, name: str, gpu_name: str, grid: dict = FULL, deadline: float = float("inf"),
            link_peer: str | None = None, util: float = 0.9, quick: bool = False) -> dict:
    """Every table of the profile, measured on `runner` (a ModelRunner), until `deadline`
    (time.perf_counter()); returns the profile dict."""
    import torch
    dev, max_len = runner.device, runner.max_model_len
    t_start = time.perf_counter()
    prof = {"format": "disagg-perf-profile-v1", "gpu": gpu_name, "device": str(dev), "torch": torch.__version__,
            "dtype": str(runner.dtype).removeprefix("torch."), "model": {"name": name, "config": hf},
            "gpu_memory_bytes": torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None,
            "kv_cache": {"num_blocks": runner.num_blocks, "block_size": runner.block_size,
                         "gpu_memory_utilization": util,
                         "max_num_batched_tokens": runner.cfg.scheduler.max_num_batched_tokens},
            "partial": False}
    m = _Measure(runner, dev, quick=quick)

    def timed_out() -> bool:
        if time.perf_counter() > deadline:
            prof["partial"] = True
            return True
        return False

    # decode: a row per batch size, a column per context
    rows = []
    for b in grid["batch"]:
        row = []
        for c in grid["context"]:
            fits = c <= max_len and b * -(-c // runner.block_size) <= runner.num_blocks
            row.append(m.step([(1, c - 1)] * b) if fits and not timed_out() else None)
        if any(x is not None for x in row):
            rows.append((b, row))
        log(f"decode B={b}: " + " ".join("-" if x is None else f"{x * 1e3:.2f}" for x in row) + " ms")
    prof["decode"] = {"batch": [b for b, _ in rows], "context": list(grid["context"]),
                      "seconds": [r for _, r in rows], "graph_sizes": sorted(runner.graphs)}
    # one long context among short ones (b - 1 at the base): against equal contexts, same KV tokens
    base, st = grid.get("straggler_base", 1024), []
    for b in grid.get("straggler_batch", ()):
        row = []
        for L in grid["straggler_context"]:
            k = (b - 1) * base + L
            if timed_out() or L > max_len or b * -(-L // runner.block_size) > runner.num_blocks:
                row.append(None)
                continue
            t = m.step([(1, base - 1)] * (b - 1) + [(1, L - 1)])
            t_eq = m.step([(1, k // b - 1)] * b)
            row.append(None if t is None or t_eq is None else t - t_eq)
        if any(x is not None for x in row):
            st.append((b, _fill_missing(row)))
        log(f"decode B={b}, one at " + ", ".join(f"{L}: {'-' if x is None else f'{x * 1e3:+.2f}'}"
                                                  for L, x in zip(grid["straggler_context"], row)) + " ms")
    prof["decode_straggler"] = {"batch": [b for b, _ in st], "max_context": list(grid.get("straggler_context", ())),
                                "base_context": base, "extra_s": [r for _, r in st]}
    # prefill: a row per chunk length, a column per cached context
    tokens = [n for n in grid["tokens"] if n < max_len]
    pw = getattr(runner, "piecewise", None)
    prof["prefill"] = {"tokens": tokens, "context": list(grid["pcontext"]),
                       "buckets": list(pw.sizes) if pw is not None and pw.graphs else [], "seconds": [
        [m.step([(n, c)]) if n + c <= max_len and not timed_out() else None for c in grid["pcontext"]]
        for n in tokens]}
    log("prefill: " + ", ".join(f"{n}: {row[0] * 1e3:.1f}" for n, row in zip(tokens, prof["prefill"]["seconds"])
                                if row[0] is not None) + " ms")
    prof["multi"] = [{"prompts": k, "tokens": n, "seconds": m.step([(n, 0)] * k)}
                     for k, n in grid["multi"] if k * n <= 16384 and not timed_out()]
    on_runner = runner.device.type == "cuda" or grid.get("host_on_runner", False)
    prof["host"], served = host_overhead(runner if on_runner else None, grid.get("host_s", 12.0))
    prof["codecs"] = m.codecs(grid["codec_tokens"])
    prof["link"] = m.link(link_peer, gpu_name)
    # per-prompt overhead and validation need the tables: fit through a ProfileModel
    from disagg.sim.profile_model import ProfileModel
    pm = ProfileModel({**prof, "gpu": _gpu_for_model(gpu_name)})
    extra = [(x["seconds"] - pm.prefill_chunks_time([(x["tokens"], 0)] * x["prompts"])
              + pm.host_s(0, [(x["tokens"], 0)] * x["prompts"])) / (x["prompts"] - 1) for x in prof["multi"]]
    prof["per_prompt_s"] = max(0.0, statistics.median(extra)) if extra else 0.0
    pm = ProfileModel({**prof, "gpu": _gpu_for_model(gpu_name)})
    # decodes riding along a prefill chunk: their attention runs eagerly between the graph pieces
    # (a kernel launch per layer that a decode-only graph does not pay); what the tables miss.
    # From the serving run of host_overhead when it drove this runner: each of its steps with
    # decodes and prompt chunks against the tables, binned by prompt tokens (single measurements
    # of a made-up mixed step jitter by several ms between neighbouring shapes on the H200
    # hosts, and serving's steps are what the model must match); else measured on a grid.
    served = [x for x in served if x[0] and x[2]]            # steps with decodes and chunks
    ex, source = [], "grid"
    if len(served) >= grid.get("served_min", 20):
        bins = [(0, 192), (192, 768), (768, 1 << 30)]
        for lo, hi in bins:
            pts = [x for x in served if lo <= sum(n for n, _ in x[2]) < hi]
            if len(pts) < 3:
                continue
            rep = statistics.median(sum(n for n, _ in x[2]) for x in pts)
            for b, kv, chunks, maxc, t, _ in pts:
                pred = pm.prefill_chunks_time(chunks, b, kv, maxc) - pm.host_s(b, chunks)
                ex.append((b, rep, t - pred))
        source = "serving run"
    mc = grid.get("mixed_context", 128)            # the decodes' contexts (serving's are ~1K)
    if not ex:
        for n in grid.get("mixed_tokens", (64,)):
            for b in grid.get("mixed_batch", ()):
                if timed_out() or b * -(-mc // runner.block_size) + n // runner.block_size + 4 > runner.num_blocks:
                    continue
                t = m.step([(1, mc - 1)] * b + [(n, 0)])
                pred = pm.prefill_chunks_time([(n, 0)], b, b * mc) - pm.host_s(b, [(n, 0)])
                ex.append((b, n, max(0.0, t - pred)))
    prof["mixed_decode"] = {"batch": [b for b, _, _ in ex], "prefill_tokens": [n for _, n, _ in ex], "context": mc,
                            "extra_s": [x for _, _, x in ex], "source": source}
    if ex:
        log("decodes in a mixed step, extra: " + ", ".join(f"B={b}+{n}: {x * 1e3:.2f}" for b, n, x in ex) + " ms")
    pm = ProfileModel({**prof, "gpu": _gpu_for_model(gpu_name)})
    val = []
    for b, c, n, pc in grid["mixed"]:
        if timed_out() or b * -(-c // runner.block_size) + -(-(n + pc) // runner.block_size) > runner.num_blocks:
            continue
        t = m.step([(1, c - 1)] * b + [(n, pc)])
        pred = pm.prefill_chunks_time([(n, pc)], b, b * c) - pm.host_s(b, [(n, pc)])
        val.append({"batch": b, "context": c, "prefill_tokens": n, "prefill_context": pc, "seconds": t,
                    "predicted_s": pred, "error": pred / t - 1})
        log(f"mixed B={b} c={c} + {n} after {pc}: {t * 1e3:.2f} ms, model {pred * 1e3:.2f} ms ({pred / t - 1:+.1%})")
    prof["validation"] = val
    prof["elapsed_s"] = time.perf_counter() - t_start
    return prof


def _fill_missing(row: list) -> list[float]:
    """A table row with gaps (points that did not fit): interpolated from its measured points."""
    from disagg.sim.profile_model import ProfileModel
    return ProfileModel._fill_row(list(range(len(row))), row)


def _gpu_for_model(name: str) -> str:
    from disagg.sim.gpus import gpu
    try:
        gpu(name)
        return name
    except ValueError:          # a CPU or an unlisted GPU: interpolate as if it were an H100
        return "h100"


def _default_out(gpu_name: str, model: str) -> str:
    from disagg.sim.cli import HERE
    from disagg.sim.gpus import gpu_key
    try:
        key = gpu_key(gpu_name)
    except ValueError:
        key = gpu_name.lower().replace(" ", "_")
    return os.path.join(HERE, "profiles", f"{key}_{model.replace('-', '_')}.json")


def step_of(runner, items: list[tuple[int, int]]):
    """A SchedulerOutput of requests [(new tokens, cached tokens)] on scattered blocks (as after
    churn), decodes (1, c) first; None if the KV cache is too small for them."""
    from decode.scheduler import ScheduledRequest, SchedulerOutput
    from disagg.request import Request, SamplingParams
    pool = _Blocks(runner.num_blocks)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    sched = []
    try:
        for i, (n, c) in enumerate(items):
            req = Request(f"q{i}", [1] * (n + c), params)
            req.num_computed_tokens = c
            sched.append(ScheduledRequest(req, n, pool.take(-(-(n + c) // runner.block_size))))
    except MemoryError:
        return None
    return SchedulerOutput(sorted(sched, key=lambda s: not s.is_decode))


class _Measure:
    def __init__(self, runner, dev, quick: bool):
        self.r, self.dev = runner, dev
        self.iters, self.warmup = (3, 1) if quick or dev.type != "cuda" else (10, 3)

    def _sync(self):
        if self.dev.type == "cuda":
            import torch
            torch.cuda.synchronize(self.dev)

    def _time(self, fn, iters=None, warmup=None) -> float:
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        ts = []
        for _ in range(self.iters if iters is None else iters):
            self._sync()
            t0 = time.perf_counter()
            fn()
            self._sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def step(self, items: list[tuple[int, int]]) -> float | None:
        """One runner.execute of requests [(new tokens, cached tokens)], decodes (1, c) first."""
        out = step_of(self.r, items)
        return None if out is None else self._time(lambda: self.r.execute(out))

    def codecs(self, token_counts) -> dict:
        import torch

        from kvtransfer.codec import get_codec
        r, mc = self.r, self.r.model_cfg
        kc, vc = r.kv_caches[0]
        res = {}
        for name in ("none", "fp8", "int8", "int4"):
            c = get_codec(name)
            ent = {"tokens": [], "encode_s": [], "decode_s": [], "ratio": None}
            for t in token_counts:
                if -(-t // r.block_size) > r.num_blocks:
                    continue
                slots = torch.arange(t, device=self.dev)
                kf, vf = kc.view(-1, mc.num_kv_heads, mc.head_dim), vc.view(-1, mc.num_kv_heads, mc.head_dim)
                shape = (2, t, mc.num_kv_heads, mc.head_dim)

                def enc():
                    return c.encode(torch.stack((kf[slots], vf[slots])))
                payload = enc()

                def dec():
                    kv, ok = c.decode(payload, shape, r.dtype)
                    r.kernels.write_kv(kv[0], kv[1], kc, vc, slots)
                    return ok
                # A prompt streams one message per layer, back to back: time all of a model's layers
                # with one synchronisation (a sync per layer would add its round trip to each).
                L = mc.num_layers
                ent["tokens"].append(t)
                ent["encode_s"].append(self._time(lambda: [enc() for _ in range(L)]) / L)
                ent["decode_s"].append(self._time(lambda: [dec() for _ in range(L)]) / L)
                ent["ratio"] = c.compression_ratio(shape, r.dtype)
            res[name] = ent
        return res

    def link(self, peer: str | None, gpu_name: str) -> dict:
        from disagg.sim.gpus import gpu, link
        if peer:
            import torch
            pdev = torch.device(peer)
            pts = []
            for mib in (1, 16, 256):
                src = torch.empty(mib * 2**20, dtype=torch.uint8, device=self.dev)
                dst = torch.empty_like(src, device=pdev)
                t = self._time(lambda: dst.copy_(src, non_blocking=True), iters=10, warmup=3)
                pts.append((mib * 2**20, t))
            (x0, t0), (x1, t1) = pts[0], pts[-1]
            bw = (x1 - x0) / max(t1 - t0, 1e-12)
            return {"kind": "nvlink", "bytes_per_s": bw, "latency_s": max(t0 - x0 / bw, 0.0),
                    "method": f"copy_ {self.dev} -> {peer}", "points": pts}
        try:
            spec = gpu(gpu_name)
        except ValueError:
            spec = gpu("h100")
        lk = link("nvlink", spec)
        return {"kind": lk.name, "bytes_per_s": lk.bytes_per_s, "latency_s": lk.latency_s,
                "method": "datasheet (disagg/sim/gpus.py; NCCL p2p fit on two H200s)"}
