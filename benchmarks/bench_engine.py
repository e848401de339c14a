"""Engine benchmark: decode steps against the memory roofline, prefill against the matmul
rate, and end-to-end generation against Hugging Face transformers, all on one model shape.

    python benchmarks/bench_engine.py                      # Llama-3-8B shape, random bf16 weights
    python benchmarks/bench_engine.py --shape tiny --quick # CPU smoke run (2 layers, hidden 256)

It measures its own references in the same run (benchmarks/common.py):

    copy bandwidth  BW   a 2 GiB device-to-device copy, bytes read + written / median time
    matmul rate     R    an 8192^3 bf16 GEMM, 2*M*N*K / median time

and reports, on random weights made on the device (EngineConfig(load_format="dummy")) and a
random-filled KV cache whose blocks are scattered over the whole cache:

    decode   step time of runner.execute() (input prep + graph replay + sampling) and of the
             forward alone (graph replay), over the floor
                 (weight bytes read + batch * context * kv_bytes_per_token) / BW
             weight bytes read = every weight but the embedding table (decode gathers only
             `batch` rows of it; when tied it is the LM head and is counted).
             targets: batch 1 within 1.15x; batch 64 at 1K context within 1.4x.
    prefill  prompts of 2048 tokens, batch 1 and 4, as a fraction of R:
                 FLOPs = 2 * (linear params of the layers) * tokens
                       + 2 * (LM head params) * prompts          (logits of the last rows only)
                       + 4 * layers * (L^2 / 2) * q_size  per prompt   (causal attention)
             target: at least 0.55.
    generate batch 1, a 512-token prompt, 128 new tokens, greedy: tokens/s of HF
             `generate()` on the same shape and dtype, and of ours (real Scheduler +
             BlockManager + ModelRunner loop, as LLMEngine.step runs it, minus detokenizing).

ModelRunner is driven directly with hand-built SchedulerOutputs (no tokenizer needed).
Results: benchmarks/results/engine_<gpu>.json (engine_<shape>_<gpu>.json for other shapes),
copied to $OUT when set. The table printed last is the summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from decode.block_manager import BlockManager  # noqa: E402
from decode.scheduler import ScheduledRequest, Scheduler, SchedulerOutput  # noqa: E402
from disagg.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from disagg.engine.model_runner import ModelRunner  # noqa: E402
from disagg.model.llama import AttnMetadata, PrefillSeq  # noqa: E402
from disagg.request import Request, SamplingParams  # noqa: E402

GiB = 2**30
MAX_MODEL_LEN = 8192
MAX_NUM_SEQS = 256
BLOCK_SIZE = 16

# Hugging Face config.json contents (Llama architecture), one per --shape.
SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
                      bos_token_id=128000, eos_token_id=128001),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                    bos_token_id=0, eos_token_id=0),
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=500000.0,
                 rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2),
}

DECODE_FULL = [(1, 512), (1, 4096), (16, 512), (16, 4096), (64, 512), (64, 1024), (64, 4096),
               (256, 512), (256, 4096)]
DECODE_QUICK = [(1, 512), (1, 4096), (64, 1024)]
# (prompts, tokens computed, cached prefix): whole 2K prompts, and one 2K chunk over a 2K prefix
# (the second chunk of a 4K prompt under max_num_batched_tokens=2048; informational, no target)
PREFILL_FULL = [(1, 2048, 0), (4, 2048, 0), (1, 2048, 2048)]
PREFILL_QUICK = [(1, 2048, 0), (1, 2048, 2048)]
TARGETS = {(1, 512): 1.15, (1, 4096): 1.15, (64, 1024): 1.4}   # step / floor
PREFILL_TARGET = 0.55                                            # fraction of the matmul rate
GEN_PROMPT = 512


def log(msg: str) -> None:
    print(f"[bench_engine {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------- setup
def write_model_dir(shape: str, dtype: torch.dtype) -> str:
    d = tempfile.mkdtemp(prefix=f"bench_engine_{shape}_")
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama",
               torch_dtype=str(dtype).removeprefix("torch."), **SHAPES[shape])
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return d


class BlockPool:
    """Distinct block ids, in a fixed random order over the whole cache (as after churn)."""

    def __init__(self, num_blocks: int, seed: int = 0):
        self.ids = list(range(num_blocks))
        random.Random(seed).shuffle(self.ids)
        self.next = 0

    def take(self, n: int) -> list[int]:
        if self.next + n > len(self.ids):
            raise RuntimeError(f"block pool exhausted: need {n}, {len(self.ids) - self.next} left")
        out = self.ids[self.next:self.next + n]
        self.next += n
        return out


def random_tokens(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def greedy(max_tokens: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def weight_bytes(model) -> tuple[int, int]:
    """(bytes a decode step reads, bytes of all weights); shared tensors counted once."""
    seen: dict[int, int] = {}

    def add(t):
        if t is not None:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    for lw in model.layers:
        for f in dataclasses.fields(lw):
            add(getattr(lw, f.name))
    add(model.norm)
    add(model.lm_head)
    read = sum(seen.values())
    add(model.embed)
    return read, sum(seen.values())


def linear_params(model) -> tuple[int, int]:
    """(matmul weights of all layers, LM head weights)."""
    per = sum(lw.qkv.numel() + lw.o.numel() + lw.gate_up.numel() + lw.down.numel() for lw in model.layers)
    return per, model.lm_head.numel()


# ---------------------------------------------------------------------- scenarios
def decode_batch(runner: ModelRunner, pool: BlockPool, batch: int, ctx: int, gen: torch.Generator):
    """`batch` requests whose first ctx-1 tokens are cached: the step computes position ctx-1 and
    attends over ctx tokens. Returns (SchedulerOutput, eager forward inputs)."""
    bs, vocab = runner.block_size, runner.model_cfg.vocab_size
    nblk = -(-ctx // bs)
    scheduled = []
    for i in range(batch):
        req = Request(f"d{i}", random_tokens(ctx, vocab, gen), greedy())
        req.num_computed_tokens = ctx - 1
        scheduled.append(ScheduledRequest(req, 1, pool.take(nblk)))
    sched = SchedulerOutput(scheduled)
    assert sched.num_decode == batch and all(s.samples for s in scheduled)
    dev = runner.device
    p = ctx - 1
    ids = torch.tensor([s.request.all_token_ids[p] for s in scheduled], dtype=torch.long, device=dev)
    pos = torch.full((batch,), p, dtype=torch.long, device=dev)
    slots = torch.tensor([s.block_table[p // bs] * bs + p % bs for s in scheduled], dtype=torch.long, device=dev)
    bt = torch.tensor([s.block_table for s in scheduled], dtype=torch.int32, device=dev)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    meta = AttnMetadata(slot_mapping=slots, num_decode=batch, decode_block_tables=bt, decode_context_lens=lens)
    return sched, (ids, pos, meta, None)


def prefill_batch(runner: ModelRunner, pool: BlockPool, n: int, length: int, prefix: int,
                  gen: torch.Generator):
    """`n` prompts of prefix+length tokens whose first `prefix` are cached; the step computes the
    last `length` of each (prefix 0: the whole prompt in one step)."""
    bs, vocab, dev = runner.block_size, runner.model_cfg.vocab_size, runner.device
    scheduled, ids, slots, prefills = [], [], [], []
    for i in range(n):
        req = Request(f"p{i}", random_tokens(prefix + length, vocab, gen), greedy())
        req.num_computed_tokens = prefix
        table = pool.take(-(-(prefix + length) // bs))
        scheduled.append(ScheduledRequest(req, length, table))
        prefills.append(PrefillSeq(i * length, length, prefix + length,
                                   torch.tensor(table, dtype=torch.long, device=dev)))
        ids += req.prompt_token_ids[prefix:]
        slots += [table[p // bs] * bs + p % bs for p in range(prefix, prefix + length)]
    sched = SchedulerOutput(scheduled)
    assert sched.num_decode == 0 and all(s.samples for s in scheduled)
    meta = AttnMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev), prefills=prefills)
    pos = torch.arange(prefix, prefix + length, device=dev).repeat(n)
    rows = torch.tensor([(i + 1) * length - 1 for i in range(n)], device=dev)
    return sched, (torch.tensor(ids, dtype=torch.long, device=dev), pos, meta, rows)


def eager_forward(runner: ModelRunner, inputs):
    ids, pos, meta, rows = inputs
    model = runner.model

    @torch.inference_mode()
    def run():
        h = model.forward(ids, pos, meta, runner.kv_caches)
        return model.compute_logits(h if rows is None else h[rows])
    return run


def forward_fn(runner: ModelRunner, batch: int, inputs, decode: bool):
    """The forward alone: the captured graph's replay for decode batches it covers (its inputs
    were just filled by runner.execute), else the eager forward + logits."""
    if decode and runner.graphs and batch <= max(runner.graphs):
        g, _ = runner.graphs[min(k for k in runner.graphs if k >= batch)]
        return g.replay, "graph"
    return eager_forward(runner, inputs), "eager"


def check_step(runner: ModelRunner, sched: SchedulerOutput) -> None:
    res = runner.execute(sched)
    want = {s.request.request_id for s in sched.scheduled}
    if set(res.sampled) != want:
        raise RuntimeError(f"execute sampled {len(res.sampled)} requests, expected {len(want)}")
    bad = [t for t in res.sampled.values() if not 0 <= t < runner.model_cfg.vocab_size]
    if bad:
        raise RuntimeError(f"sampled token ids outside the vocabulary: {bad[:5]}")


def bench_decode(runner, batch, ctx, bw, rate, w_read, iters, warmup, gen) -> dict:
    kvb = runner.model_cfg.kv_bytes_per_token(runner.dtype)
    pool = BlockPool(runner.num_blocks, seed=batch * 100003 + ctx)
    sched, inputs = decode_batch(runner, pool, batch, ctx, gen)
    check_step(runner, sched)
    step = common.summarize(common.time_host(lambda: runner.execute(sched), runner.device, iters, warmup))
    runner.execute(sched)                     # graph inputs hold exactly this batch
    fwd, how = forward_fn(runner, batch, inputs, decode=True)
    fwd_t = common.summarize(common.time_device(fwd, runner.device, max(iters, 20), warmup))
    kv_read = batch * ctx * kvb
    floor = (w_read + kv_read) / bw
    cfg = runner.model_cfg
    lin, head = linear_params(runner.model)
    flops = 2 * (lin + head) * batch + 4 * cfg.num_layers * batch * ctx * cfg.q_size
    cfloor = flops / rate
    r = dict(batch=batch, context=ctx, kv_bytes_read=kv_read, weight_bytes_read=w_read, floor_s=floor,
             flops=flops, compute_floor_s=cfloor, bound="memory" if floor >= cfloor else "compute",
             step_over_max_floor=step["median_s"] / max(floor, cfloor),
             step=step, forward=fwd_t, forward_path=how,
             step_over_floor=step["median_s"] / floor, forward_over_floor=fwd_t["median_s"] / floor,
             step_bytes_per_s=(w_read + kv_read) / step["median_s"],
             host_overhead_s=step["median_s"] - fwd_t["median_s"],
             tokens_per_s=batch / step["median_s"])
    if (batch, ctx) in TARGETS:
        r["target_step_over_floor"] = TARGETS[(batch, ctx)]
        r["meets_target"] = r["step_over_floor"] <= TARGETS[(batch, ctx)]
    return r


def bench_prefill(runner, n, length, prefix, rate, iters, warmup, gen) -> dict:
    cfg = runner.model_cfg
    pool = BlockPool(runner.num_blocks, seed=n * 7 + length + prefix)
    sched, inputs = prefill_batch(runner, pool, n, length, prefix, gen)
    check_step(runner, sched)
    step = common.summarize(common.time_host(lambda: runner.execute(sched), runner.device, iters, warmup))
    fwd, how = forward_fn(runner, n, inputs, decode=False)
    fwd_t = common.summarize(common.time_device(fwd, runner.device, iters, warmup))
    lin, head = linear_params(runner.model)
    tokens = n * length
    attn = n * 4 * cfg.num_layers * (length * prefix + length**2 / 2) * cfg.q_size
    flops = 2 * lin * tokens + 2 * head * n + attn
    flops_2nt = 2 * cfg.num_params * tokens + attn      # the common "2 * params * tokens" count
    r = dict(prompts=n, prompt_len=length, prefix=prefix, tokens=tokens, flops=flops, attention_flops=attn,
             flops_2_params_tokens=flops_2nt, step=step, forward=fwd_t, forward_path=how,
             step_flop_per_s=flops / step["median_s"], step_fraction_of_matmul=flops / step["median_s"] / rate,
             forward_fraction_of_matmul=flops / fwd_t["median_s"] / rate,
             step_fraction_of_matmul_2nt=flops_2nt / step["median_s"] / rate,
             tokens_per_s=tokens / step["median_s"])
    if prefix == 0:
        r["target_fraction"] = PREFILL_TARGET
        r["meets_target"] = r["step_fraction_of_matmul"] >= PREFILL_TARGET
    return r


def ours_generate(runner: ModelRunner, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """One request through the real Scheduler + BlockManager + ModelRunner loop (LLMEngine.step
    minus the detokenizer): one prefill step, then decode steps. Returns (seconds, tokens)."""
    bm = BlockManager(runner.num_blocks, runner.block_size)
    sch = Scheduler(runner.cfg.scheduler, bm, runner.max_model_len)
    req = Request("gen", list(prompt), greedy(new_tokens))
    common.sync(runner.device)
    t0 = time.perf_counter()
    sch.add(req)
    while sch.has_unfinished():
        out = sch.schedule()
        res = runner.execute(out)
        sch.update(out, res.sampled)
    common.sync(runner.device)
    dt = time.perf_counter() - t0
    if req.num_output_tokens != new_tokens:
        raise RuntimeError(f"ours produced {req.num_output_tokens} tokens, expected {new_tokens}")
    return dt, list(req.output_token_ids)


def hf_generate(shape: str, device: torch.device, dtype: torch.dtype, prompt: list[int], new_tokens: int,
                reps: int) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape])
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:                       # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    pad = SHAPES[shape]["eos_token_id"]

    def gen(n):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=pad)
    out = gen(8)                                           # warm-up: handles, kernels, caches
    times = []
    for _ in range(reps):
        common.sync(device)
        t0 = time.perf_counter()
        out = gen(new_tokens)
        common.sync(device)
        times.append(time.perf_counter() - t0)
    if out.shape[1] != len(prompt) + new_tokens:
        raise RuntimeError(f"HF generated {out.shape[1] - len(prompt)} tokens, expected {new_tokens}")
    t = common.summarize(times)
    info = dict(seconds=t, tokens_per_s=new_tokens / t["median_s"], transformers=transformers.__version__,
                attn_implementation=getattr(model.config, "_attn_implementation", None))
    del model, out
    return info


# ---------------------------------------------------------------------- plan
def plan_memory(args, device, model_cfg: ModelConfig, dtype, decode_list, prefill_list, gen_total) -> dict:
    """Which decode scenarios fit, and how many KV blocks to allocate (one cache for all)."""
    elem = torch.empty((), dtype=dtype).element_size()
    kvb = model_cfg.kv_bytes_per_token(dtype)
    bytes_per_block = kvb * BLOCK_SIZE
    weights = model_cfg.num_params * elem
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        reserve = args.reserve_gib * GiB     # activations (4 x 2048-token prefill), graph pools, logits
        budget = free - weights - reserve
        cap = args.kv_gib * GiB if args.kv_gib else 100 * GiB
    else:
        free, total = None, None
        budget = (args.kv_gib or 2.0) * GiB
        cap = 0                                  # CPU: only what the scenarios need
    blocks = lambda b, c: b * -(-c // BLOCK_SIZE)   # noqa: E731
    fits, skipped = [], []
    for b, c in decode_list:
        need = blocks(b, c) * bytes_per_block
        if need <= budget:
            fits.append((b, c))
        else:
            skipped.append(dict(batch=b, context=c, kv_bytes=need, budget_bytes=budget,
                                reason=f"KV {need / GiB:.1f} GiB > budget {budget / GiB:.1f} GiB"))
    need_blocks = max([blocks(b, c) for b, c in fits] + [blocks(n, L) for n, L in prefill_list]
                      + [blocks(1, gen_total)])
    num_blocks = max(need_blocks, int(min(budget, cap) // bytes_per_block)) + 1
    return dict(kv_bytes_per_token=kvb, bytes_per_block=bytes_per_block, weight_bytes=weights,
                free_bytes_before=free, total_bytes=total, kv_budget_bytes=budget, num_blocks=num_blocks,
                kv_cache_bytes=num_blocks * bytes_per_block, fits=fits, skipped=skipped)


# ---------------------------------------------------------------------- main
def run_engine(args, device, model_dir, model_cfg, plan, refs, res) -> None:
    """Everything that uses our runner; the runner is freed when this returns."""
    quick = args.quick
    cfg = EngineConfig(model_dir=model_dir, load_format="dummy", device=device.type,
                       cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=plan["num_blocks"]),
                       scheduler=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=8192,
                                                 max_model_len=MAX_MODEL_LEN))
    t0 = time.perf_counter()
    runner = ModelRunner(cfg, model_cfg, MAX_MODEL_LEN)
    common.sync(device)
    res["engine"] = dict(init_s=time.perf_counter() - t0, kernels=runner.kernels.name,
                         dtype=str(runner.dtype).removeprefix("torch."), cuda_graphs=bool(runner.graphs),
                         graph_batch_sizes=sorted(runner.graphs), num_blocks=runner.num_blocks,
                         block_size=runner.block_size, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS)
    if device.type == "cuda":
        res["engine"]["memory_allocated_bytes"] = torch.cuda.memory_allocated(device)
    log(f"runner ready in {res['engine']['init_s']:.1f} s: kernels {runner.kernels.name}, "
        f"graphs {sorted(runner.graphs)}, {runner.num_blocks} blocks")
    for layer in runner.kv_cache:      # never time on zeros (one layer at a time: < 2^31 elements each)
        layer.normal_()
    w_read, w_all = weight_bytes(runner.model)
    res["engine"].update(weight_bytes_read_per_decode=w_read, weight_bytes_total=w_all)
    gen = torch.Generator().manual_seed(0)
    bw, rate = refs["copy"]["bytes_per_s"], refs["matmul"]["flop_per_s"]

    d_iters, d_warm = (5, 2) if quick else (30, 5)
    for b, c in plan["fits"]:
        try:
            r = bench_decode(runner, b, c, bw, rate, w_read, d_iters, d_warm, gen)
            res["decode"].append(r)
            log(f"decode b={b} ctx={c}: step {r['step']['median_s'] * 1e3:.3f} ms "
                f"({r['step_over_floor']:.2f}x floor), fwd {r['forward']['median_s'] * 1e3:.3f} ms "
                f"({r['forward_over_floor']:.2f}x, {r['forward_path']})")
        except Exception as e:   # record and go on: one scenario must not lose the others
            record_error(res, f"decode b={b} ctx={c}", e)

    p_iters, p_warm = (3, 1) if quick else (10, 2)
    for n, L, pre in (PREFILL_QUICK if quick else PREFILL_FULL):
        try:
            r = bench_prefill(runner, n, L, pre, rate, p_iters, p_warm, gen)
            res["prefill"].append(r)
            log(f"prefill {n}x{L} over prefix {pre}: step {r['step']['median_s'] * 1e3:.2f} ms, "
                f"{r['step_fraction_of_matmul']:.3f} of matmul rate (fwd {r['forward_fraction_of_matmul']:.3f})")
        except Exception as e:
            record_error(res, f"prefill {n}x{L} prefix {pre}", e)

    try:
        prompt = res["generate"]["prompt"]
        ours_generate(runner, prompt, 8)                     # warm-up (the 512-token prefill shape)
        times = [ours_generate(runner, prompt, args.new_tokens)[0] for _ in range(1 if quick else 3)]
        t = common.summarize(times)
        res["generate"]["ours"] = dict(seconds=t, tokens_per_s=args.new_tokens / t["median_s"])
        log(f"ours generate: {res['generate']['ours']['tokens_per_s']:.1f} tok/s")
    except Exception as e:
        record_error(res, "ours generate", e)
    del runner


def record_error(res: dict, section: str, e: BaseException) -> None:
    tb = traceback.format_exc()
    print(tb, file=sys.stderr, flush=True)
    res["errors"].append(dict(section=section, error=f"{type(e).__name__}: {e}", traceback=tb))


def free_device(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def print_table(res: dict) -> None:
    m, e, refs = res["machine"], res.get("engine", {}), res["references"]
    lines = ["", "=" * 92,
             f"engine benchmark | shape {res['shape']} ({e.get('dtype', '?')}) | "
             f"{m.get('gpu') or 'CPU'} | torch {m['torch']} triton {m['triton']}",
             f"kernels {e.get('kernels', '?')} | CUDA graphs {'yes' if e.get('cuda_graphs') else 'no'} | "
             f"KV cache {e.get('num_blocks', 0)} blocks ({res['memory']['kv_cache_bytes'] / GiB:.1f} GiB)"]
    if "copy" in refs:
        c, mm = refs["copy"], refs["matmul"]
        crude = " (crude, CPU)" if c["crude"] else ""
        lines.append(f"references{crude}: copy {c['bytes_per_s'] / 1e12:.3f} TB/s (read+write, "
                     f"{c['buffer_bytes'] / GiB:.2f} GiB buffer) | matmul {mm['flop_per_s'] / 1e12:.1f} TFLOP/s "
                     f"({mm['dtype']} {mm['n']}^3)")
    lines.append("")
    lines.append("decode: floor = (weights read + batch*ctx*KV/token) / copy BW; step = runner.execute() "
                 "end to end;\n        fwd = forward + logits alone (CUDA graph replay; eager where no graph)")
    lines.append("        cfl = compute floor: (linears x batch + attention) FLOPs / matmul rate")
    lines.append(f"{'batch':>6} {'ctx':>5} {'floor ms':>9} {'cfl ms':>7} {'step ms':>9} {'fwd ms':>9} "
                 f"{'step/fl':>8} {'fwd/fl':>7} {'host ms':>8} {'tok/s':>9}  target")
    for r in res["decode"]:
        tgt = ""
        if "target_step_over_floor" in r:
            tgt = f"<= {r['target_step_over_floor']:.2f}x {'ok' if r['meets_target'] else 'MISS'}"
        lines.append(f"{r['batch']:>6} {r['context']:>5} {r['floor_s'] * 1e3:>9.3f} "
                     f"{r['compute_floor_s'] * 1e3:>7.3f} {r['step']['median_s'] * 1e3:>9.3f} "
                     f"{r['forward']['median_s'] * 1e3:>9.3f} {r['step_over_floor']:>7.2f}x "
                     f"{r['forward_over_floor']:>6.2f}x {r['host_overhead_s'] * 1e3:>8.3f} "
                     f"{r['tokens_per_s']:>9.0f}  {tgt}")
    for s in res["memory"]["skipped"]:
        lines.append(f"{s['batch']:>6} {s['context']:>5}  skipped: {s['reason']}")
    if res["prefill"]:
        lines.append("")
        lines.append("prefill: fraction of the measured matmul rate (FLOPs: layer linears x tokens + LM head x "
                     "prompts + causal attention)")
        lines.append(f"{'prompts':>7} {'len':>5} {'prefix':>6} {'step ms':>9} {'fwd ms':>9} {'TFLOP/s':>8} "
                     f"{'frac':>6} {'fwd frac':>8} {'2NT frac':>8}  target")
        for r in res["prefill"]:
            tgt = "(info)"
            if "target_fraction" in r:
                tgt = f">= {r['target_fraction']:.2f} {'ok' if r['meets_target'] else 'MISS'}"
            lines.append(f"{r['prompts']:>7} {r['prompt_len']:>5} {r['prefix']:>6} {r['step']['median_s'] * 1e3:>9.2f} "
                         f"{r['forward']['median_s'] * 1e3:>9.2f} {r['step_flop_per_s'] / 1e12:>8.1f} "
                         f"{r['step_fraction_of_matmul']:>6.3f} {r['forward_fraction_of_matmul']:>8.3f} "
                         f"{r['step_fraction_of_matmul_2nt']:>8.3f}  {tgt}")
    g = res["generate"]
    if g:
        lines.append("")
        lines.append(f"generate: batch 1, {GEN_PROMPT}-token prompt, {res['new_tokens']} new tokens, greedy")
        ours, hf = g.get("ours"), g.get("hf")
        row = []
        if hf:
            row.append(f"HF transformers {hf['transformers']} ({hf['attn_implementation']}): "
                       f"{hf['tokens_per_s']:.1f} tok/s")
        if ours:
            row.append(f"ours: {ours['tokens_per_s']:.1f} tok/s")
        if hf and ours:
            row.append(f"ours/HF {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x")
        lines.append(" | ".join(row) if row else "(no result)")
    if res["errors"]:
        lines.append("")
        lines.append(f"ERRORS ({len(res['errors'])}): " + "; ".join(f"{x['section']}: {x['error']}"
                                                                  for x in res["errors"]))
    lines.append(f"json: {', '.join(res.get('json_paths', []))}")
    lines.append("=" * 92)
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--quick", action="store_true", help="fewer scenarios and iterations")
    ap.add_argument("--new-tokens", type=int, default=None, help="generate: new tokens (default 128, quick 32)")
    ap.add_argument("--kv-gib", type=float, default=None,
                    help="KV cache size cap (GPU default: 100 GiB or what fits; CPU default: 2 GiB budget)")
    ap.add_argument("--reserve-gib", type=float, default=8.0, help="GPU memory kept free beside weights + KV")
    ap.add_argument("--skip-hf", action="store_true", help="skip the Hugging Face generate() reference")
    ap.add_argument("--results-dir", default=common.RESULTS_DIR)
    args = ap.parse_args(argv)
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = EngineConfig(model_dir="", device=device.type).torch_dtype
    res: dict = dict(benchmark="engine", shape=args.shape, quick=args.quick, argv=sys.argv[1:],
                     new_tokens=args.new_tokens, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     machine=common.machine_info(device), model_config=SHAPES[args.shape], references={},
                     memory={}, decode=[], prefill=[], generate={}, errors=[])
    log(f"device {res['machine'].get('gpu') or 'cpu'}, shape {args.shape}, dtype {dtype}")

    # 1. references, before anything else holds memory
    try:
        res["references"]["copy"] = common.copy_bandwidth(device)
        res["references"]["matmul"] = common.matmul_rate(device)
        log(f"copy {res['references']['copy']['bytes_per_s'] / 1e12:.3f} TB/s, "
            f"matmul {res['references']['matmul']['flop_per_s'] / 1e12:.1f} TFLOP/s")
    except Exception as e:
        record_error(res, "references", e)
        return finish(args, device, res)

    model_dir = write_model_dir(args.shape, dtype)
    model_cfg = ModelConfig.from_dir(model_dir)
    res["model"] = dict(num_params=model_cfg.num_params, kv_bytes_per_token=model_cfg.kv_bytes_per_token(dtype),
                        model_dir=model_dir)
    plan = plan_memory(args, device, model_cfg, dtype, DECODE_QUICK if args.quick else DECODE_FULL,
                       [(n, L + pre) for n, L, pre in (PREFILL_QUICK if args.quick else PREFILL_FULL)],
                       GEN_PROMPT + args.new_tokens)
    res["memory"] = {k: v for k, v in plan.items() if k != "fits"}
    res["notes"] = dict(
        decode_floor="(weight bytes read + batch*context*kv_bytes_per_token) / copy bytes_per_s; weight bytes "
                     "read excludes the embedding table unless tied (decode gathers only batch rows of it)",
        decode_step="host-timed runner.execute(): input prep, graph replay (or eager forward), sampling; "
                    "device synchronized around each call; median",
        decode_forward="CUDA-event-timed replay of the captured graph for that batch (eager forward + logits "
                       "where no graph); median",
        prefill_flops="2*(layer linear params)*tokens + 2*(LM head params)*prompts + "
                      "4*layers*(L*prefix + L^2/2)*q_size per prompt; *_2nt uses 2*num_params*tokens + attention",
        decode_compute_floor="(2*(layer linear + LM head params)*batch + 4*layers*batch*context*q_size) / matmul "
                             "rate; step_over_max_floor divides by the larger of the two floors",
        generate="batch 1, greedy, tokens/s = new_tokens / wall time of the whole request (prefill included)",
        kv_cache="random normal values; each scenario's blocks are distinct and scattered over the whole cache")
    res["generate"]["prompt"] = random_tokens(GEN_PROMPT, model_cfg.vocab_size, torch.Generator().manual_seed(1))
    for s in plan["skipped"]:
        log(f"skip decode b={s['batch']} ctx={s['context']}: {s['reason']}")

    # 2-3 + ours of 4, one runner for all
    try:
        run_engine(args, device, model_dir, model_cfg, plan, res["references"], res)
    except Exception as e:
        record_error(res, "engine", e)
    free_device(device)

    # 4. HF transformers generate(), last: our runner's memory is free by now
    if not args.skip_hf and "prompt" in res["generate"]:
        try:
            res["generate"]["hf"] = hf_generate(args.shape, device, dtype, res["generate"]["prompt"],
                                                args.new_tokens, 1 if args.quick else 3)
            log(f"HF generate: {res['generate']['hf']['tokens_per_s']:.1f} tok/s")
        except Exception as e:
            record_error(res, "hf generate", e)
        free_device(device)
    res["generate"].pop("prompt", None)
    return finish(args, device, res)


def finish(args, device, res) -> int:
    res.setdefault("memory", {}).setdefault("kv_cache_bytes", 0)
    res["memory"].setdefault("skipped", [])
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    slug = common.device_slug(device)
    name = f"engine_{slug}.json" if args.shape == "llama3-8b" else f"engine_{args.shape}_{slug}.json"
    try:
        res["json_paths"] = common.write_json(res, name, args.results_dir)
    except Exception as e:
        record_error(res, "write json", e)
    print_table(res)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
