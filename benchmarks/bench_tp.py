"""Tensor parallelism: a decode step at TP=2 against TP=1; Llama-3-8B shape, random bf16 weights.

    python3 benchmarks/bench_tp.py                 # 2 GPUs (NCCL): batch 1 and 64 at 1K context; ~2-3 min
    python3 benchmarks/bench_tp.py --tiny          # CPU smoke run: gloo, 2 processes, tiny shape

The parent spawns one process per GPU (no torchrun; rendezvous on 127.0.0.1). TP=1 runs the engine's
ModelRunner on GPU 0 alone; TP=2 runs disagg.model.tensor_parallel.TPModelRunner on both GPUs (each
holds half the heads and half the MLP, two all-reduces per layer). Both execute the same hand-built
decode batches (benchmarks/bench_engine.decode_batch: `batch` requests with `context` tokens cached,
blocks scattered over the cache). Reported per (TP, batch, context):

    step     ModelRunner.execute() end to end (inputs, forward, sampling); all ranks start together,
             the slowest counts
    forward  the forward alone (CUDA-graph replay when captured, else the eager forward), device time
    floor    (weight bytes read + KV bytes read) on one rank / that rank's copy bandwidth
             (benchmarks/common.copy_bandwidth, measured in the same run)
    allreduce  one all-reduce of [batch, hidden] bf16, median; a step issues 2 * layers of them

CUDA graphs are tried for both TP sizes (NCCL all-reduce captured into the graph); if capture
fails the error is recorded and the eager figures stand. --eager skips graphs.
Results: benchmarks/results/tp_<gpu>.json (rewritten after each phase, copied to $OUT).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_engine import BlockPool, decode_batch, forward_fn, weight_bytes, write_model_dir  # noqa: E402
from benchmarks.bench_ring import timed  # noqa: E402
from disagg.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from disagg.engine.model_runner import ModelRunner  # noqa: E402
from disagg.model.tensor_parallel import TensorParallel, TPModelRunner  # noqa: E402


def log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[bench_tp {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def allreduce_time(batch: int, hidden: int, dev, dtype, iters: int = 50) -> dict:
    x = torch.randn(batch, hidden, device=dev, dtype=dtype)
    return common.summarize(common.time_device(lambda: dist.all_reduce(x), dev, iters, warmup=5))


def bench_runner(runner, rank: int, world: int, batches, contexts, iters: int, warmup: int, bw: float,
                 together: bool) -> list[dict]:
    rows = []
    w_read, _ = weight_bytes(runner.model)
    kvb = runner.model_cfg.kv_bytes_per_token(runner.dtype)      # this rank's KV heads only
    for ctx in contexts:
        for b in batches:
            gen = torch.Generator().manual_seed(b * 1000 + ctx)       # same batch on every rank
            pool = BlockPool(runner.num_blocks, seed=b * 100003 + ctx)
            sched, inputs = decode_batch(runner, pool, b, ctx, gen)
            step = common.summarize(timed(lambda: runner.execute(sched), runner.device, iters, warmup, together))
            runner.execute(sched)                                     # graph inputs hold exactly this batch
            fwd, how = forward_fn(runner, b, inputs, decode=True)
            f = common.time_device(fwd, runner.device, max(iters, 20), warmup)
            if together:                                              # the slowest rank's median
                t = torch.tensor([common.summarize(f)["median_s"]], dtype=torch.float64,
                                 device=runner.device if runner.device.type == "cuda" else "cpu")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                fwd_t = dict(common.summarize(f), median_s=t.item())
            else:
                fwd_t = common.summarize(f)
            floor = (w_read + b * ctx * kvb) / bw
            row = dict(tp=world if together else 1, batch=b, context=ctx, step=step, forward=fwd_t, forward_path=how,
                       floor_s=floor, weight_bytes_read_per_rank=w_read, step_over_floor=step["median_s"] / floor,
                       tokens_per_s=b / step["median_s"])
            if together:
                ar = allreduce_time(b, runner.model_cfg.hidden_size, runner.device, runner.dtype)
                row["allreduce"] = ar
                row["allreduce_per_step_s"] = 2 * runner.model_cfg.num_layers * ar["median_s"]
            log(rank, f"TP={row['tp']} batch {b} ctx {ctx}: step {step['median_s'] * 1e3:.2f} ms, forward "
                      f"({how}) {fwd_t['median_s'] * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms")
            rows.append(row)
    return rows


def _bench(rank: int, world: int, dev, a: dict) -> None:
    shape = "tiny" if a["tiny"] else "llama3-8b"
    dtype = torch.float32 if a["tiny"] else torch.bfloat16
    model_dir = write_model_dir(shape, dtype)
    mc = ModelConfig.from_dir(model_dir)
    blocks = len(a["batches"]) * max(a["batches"]) * -(-max(a["contexts"]) // 16) + 64
    cfg = EngineConfig(model_dir, dtype=str(dtype).removeprefix("torch."), device=str(dev), load_format="dummy",
                       use_cuda_graphs=False, cache=CacheConfig(block_size=16, num_blocks=blocks),
                       scheduler=SchedulerConfig(max_num_seqs=max(a["batches"]), max_model_len=max(a["contexts"]) + 16))
    bw = common.copy_bandwidth(dev)["bytes_per_s"]
    res = dict(bench="tensor_parallel_decode", machine=common.machine_info(dev), gpus=world, shape=shape,
               copy_bandwidth_rank0=bw, command=" ".join(sys.argv), results=[], errors=[])
    slug = "cpu-tiny" if a["tiny"] else common.device_slug(dev)
    save = (lambda: res.update(json_paths=common.write_json(res, f"tp_{slug}.json"))) if rank == 0 else (lambda: None)
    graphs = dev.type == "cuda" and not a["eager"]
    max_model_len = cfg.scheduler.max_model_len

    def phase(runner, together: bool) -> None:
        res["results"].extend(bench_runner(runner, rank, world, a["batches"], a["contexts"], a["iters"], a["warmup"],
                                           bw, together))
        save()
        if graphs:
            try:
                runner._capture_graphs(max(a["batches"]))
                res["results"].extend(bench_runner(runner, rank, world, a["batches"], a["contexts"], a["iters"],
                                                   a["warmup"], bw, together))
            except Exception as e:  # noqa: BLE001 - recorded; the eager figures stand
                res["errors"].append(f"TP={world if together else 1} CUDA graphs: {type(e).__name__}: {e}")
                traceback.print_exc()
            save()

    if rank == 0:                      # TP=1: GPU 0 alone, the engine's own runner
        log(rank, "TP=1 on GPU 0")
        phase(ModelRunner(cfg, mc, max_model_len), together=False)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    log(rank, f"TP={world} on {world} GPUs")
    tp = TensorParallel.of(dist.group.WORLD)
    phase(TPModelRunner(replace(cfg, seed=0), mc, max_model_len, tp), together=True)
    if rank == 0:
        print_table(res)


def print_table(res: dict) -> None:
    print(f"\nTP decode step, {res['shape']} ({res['machine'].get('gpu') or 'cpu'})")
    print(f"{'TP':>3} {'batch':>5} {'ctx':>5} {'path':>6} {'step ms':>8} {'fwd ms':>8} {'floor ms':>8} "
          f"{'step/floor':>10} {'allreduce/step ms':>17}")
    for r in res["results"]:
        ar = r.get("allreduce_per_step_s")
        print(f"{r['tp']:>3} {r['batch']:>5} {r['context']:>5} {r['forward_path']:>6} {r['step']['median_s'] * 1e3:>8.2f} "
              f"{r['forward']['median_s'] * 1e3:>8.2f} {r['floor_s'] * 1e3:>8.2f} {r['step_over_floor']:>10.2f} "
              f"{'' if ar is None else f'{ar * 1e3:.2f}':>17}")
    for e in res["errors"]:
        print("error:", e)
    print("JSON:", ", ".join(res.get("json_paths", [])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: gloo, tiny shape")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="cached tokens per request (default 1024)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    a = ap.parse_args()
    if a.contexts is None:
        a.contexts = [64] if a.tiny else [1024]
    if a.tiny:
        a.iters, a.warmup = min(a.iters, 3), min(a.warmup, 1)
    elif torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs (use --tiny on CPU)")
    common.spawn_ranks(_bench, 2, vars(a))


if __name__ == "__main__":
    main()
