"""Faults and overload, measured: requests lost, hung and corrupted, and time to recover.

    python benchmarks/bench_faults.py            # CPU, Ray CPU actors, a tiny random Llama (~4 min)
    python benchmarks/bench_faults.py --only restart-decode,restart-prefill

Each scenario runs N concurrent greedy requests (ignore_eos, known lengths) through the real
cluster (disagg/deploy/cluster.py) on Ray CPU actors, with the colocated engine's outputs as the
reference, and injects one fault:

    kill-decode    1 prefill + 2 decode workers; one decode worker killed mid-run
    kill-prefill   2 prefill + 1 decode workers; one prefill worker killed mid-run
    restart-decode / restart-prefill   1P + 2D (1P + 1D): a decode (the prefill) worker killed mid-run
                   and restarted by Ray; then a second workload: time from the kill until the pool
                   re-admits it and until it serves again (its first transfer plan)
    flip-bytes     1 prefill + 1 decode; 30% of KV messages get one byte flipped
    overload       2 colocated replicas behind the router; arrivals at 2x the measured sustainable
                   rate with bounded queues (--max-queued-requests): 429s allowed, nothing accepted lost

Per scenario: completed, clean errors (or 429s), lost (accepted, then never ended: must be 0),
hung (no end within the deadline: 0), corrupted (completed but different from the reference: 0),
and for kills the recovery time: from the kill until every request it interrupted produced its
next token on a live worker (max over those requests). Overload also reports goodput
(completed requests per second) against the sustainable rate. Writes results/faults_cpu.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from cluster_util import tiny_cluster, workload  # noqa: E402


DEVICE = "cpu"      # --device cuda: one GPU per worker, NCCL between them


def cluster(model_dir, num_prefill, num_decode, **kw):
    return tiny_cluster(model_dir, num_prefill, num_decode, device=DEVICE, num_blocks=1024, **kw)


async def drive(eng, prompts, params, arrivals=None, kill=None, deadline_s=60.0, server=None, restart=False):
    """Run the requests (at `arrivals` offsets, else all at once); kill=(delay_s, rank) kills a worker
    (for good, or with restart=True so that Ray restarts it). Returns per-request records and the kill time."""
    eng.start()
    try:
        return await requests(eng, prompts, params, arrivals, kill, deadline_s, server, restart)
    finally:
        for t in eng._tasks:
            t.cancel()


async def requests(eng, prompts, params, arrivals=None, kill=None, deadline_s=60.0, server=None, restart=False):
    import ray
    t0 = time.monotonic()
    recs = [dict(status="pending", tokens=[], stamps=[]) for _ in prompts]
    state = {"kill_t": None}

    async def one(i):
        if arrivals:
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.monotonic()))
        r = recs[i]
        if server is not None and not server(len(prompts[i])):
            r["status"] = "rejected"
            return
        try:
            async for out in eng.generate(prompts[i], params[i], uuid.uuid4().hex):
                r["tokens"] += out.new_token_ids
                r["stamps"] += [time.monotonic()] * len(out.new_token_ids)
                if out.finished:
                    r["status"] = "ok"
                    return
            r["status"] = "lost"
        except Exception as e:  # noqa: BLE001
            r["status"], r["error"] = "error", f"{type(e).__name__}: {e}"
        finally:
            if server is not None:
                server(-len(prompts[i]))

    async def chaos():
        if kill:
            await asyncio.sleep(kill[0])
            state["kill_t"] = time.monotonic()
            ray.kill(eng.actors[kill[1]], no_restart=not restart)
    tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
    await chaos()
    done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for i, t in enumerate(tasks):
        if t in pending:
            recs[i]["status"] = "hung"
            t.cancel()
    return recs, state["kill_t"], time.monotonic() - t0


async def drive_restart(eng, rank, first, then, kill_s):
    """Kill `rank` (Ray restarts it) during the `first` workload; wait until the pool re-admits it;
    run `then` while watching for the restarted worker's first work (a transfer plan it received,
    or sent). Returns the two runs' records, the kill time and both recovery times."""
    role = "prefill" if rank in eng.prefill_ranks else "decode"
    served = {}

    async def watch():    # from the re-admission on, the new process's counters: its first work
        while "t" not in served:
            if eng.recovery.restarts[role]:
                st = await eng.actors[rank].transfer_stats.remote()
                if st["plans"] or st["bytes_wire"]:
                    served["t"] = time.monotonic()
            await asyncio.sleep(0.02)
    eng.start()
    try:
        w = asyncio.ensure_future(watch())
        recs1, kill_t, _ = await requests(eng, *first, kill=(kill_s, rank), restart=True)
        while eng.recovery.restarts[role] < 1:
            if time.monotonic() - kill_t > 300:
                raise RuntimeError(f"{role} worker {rank} was not re-admitted in 300 s")
            await asyncio.sleep(0.05)
        readmitted_s = eng.recovery.readmitted_at[rank] - kill_t
        recs2, _, _ = await requests(eng, *then)
        await asyncio.wait([w], timeout=5)
        w.cancel()
        serving_s = served["t"] - kill_t if "t" in served else None
        return recs1, recs2, kill_t, readmitted_s, serving_s
    finally:
        for t in eng._tasks:
            t.cancel()


def score(recs, ref, kill_t=None):
    out = dict(requests=len(recs), completed=0, errors=0, rejected=0, lost=0, hung=0, corrupted=0)
    recover = []
    for r, want in zip(recs, ref):
        st = r["status"]
        if st == "ok":
            out["completed"] += 1
            out["corrupted"] += r["tokens"] != want
        elif st == "error":
            out["errors"] += 1
        elif st == "rejected":
            out["rejected"] += 1
        elif st == "hung":
            out["hung"] += 1
        else:
            out["lost"] += 1
        if kill_t is not None and r["stamps"] and r["stamps"][0] < kill_t < r["stamps"][-1]:
            after = [s for s in r["stamps"] if s > kill_t]
            recover.append(after[0] - kill_t)       # the request was mid-stream at the kill
    if kill_t is not None:
        out["interrupted_mid_stream"] = len(recover)
        out["recovery_s_max"] = round(max(recover), 3) if recover else None
        out["recovery_s_median"] = round(sorted(recover)[len(recover) // 2], 3) if recover else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "faults_cpu.json"))
    ap.add_argument("--only", default=None, help="comma-separated scenarios (default: all)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: workers on GPUs (NCCL), one per worker (restart-decode needs 3)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    import torch

    from conftest import build_tiny_checkpoint, make_engine
    torch.set_num_threads(1)
    d = build_tiny_checkpoint(tempfile.mkdtemp(), "llama_gqa", torch.float32)
    results = {}

    def run(name, P, D, kill=None, max_out=40, **kw):
        prompts, params = workload(args.requests, args.seed, max_out=max_out)
        ref = [r.output_token_ids for r in make_engine(d, num_blocks=4096).generate(prompts, params)]
        eng = cluster(d, P, D, **kw)
        try:
            recs, kill_t, wall = asyncio.run(drive(eng, prompts, params, kill=kill))
            eng.check_integrity()
            s = score(recs, ref, kill_t)
            s.update(wall_s=round(wall, 2), retries=eng.retries, integrity="ok")
            if kw.get("kv_fault_rate"):
                import ray
                st = [ray.get(a.transfer_stats.remote()) for a in eng.actors.values()]
                s.update(flipped=sum(x["flipped"] for x in st), checksum_failures=sum(x["failures"] for x in st),
                         recomputed=sum(x["fallbacks"] for x in st))
        finally:
            eng.stop()
        results[name] = s
        print(f"{name:14s} " + " ".join(f"{k}={v}" for k, v in s.items()), flush=True)

    # long answers (up to 300 tokens) so that the kill lands while requests are mid-stream
    only = set(args.only.split(",")) if args.only else None
    want = lambda name: only is None or name in only    # noqa: E731
    if want("kill-decode"):
        run("kill-decode", 1, 2, kill=(0.5, 2), max_out=300)
    if want("kill-prefill"):
        run("kill-prefill", 2, 1, kill=(0.3, 0), max_out=300)
    if want("flip-bytes"):
        run("flip-bytes", 1, 1, kv_fault_rate=0.3)

    # restart: the killed worker comes back (Ray restarts it; the pool re-forms its KV groups)
    for name, P, D, rank in (("restart-decode", 1, 2, 2), ("restart-prefill", 1, 1, 0)):
        if not want(name):
            continue
        first = workload(args.requests, args.seed, max_out=300)
        then = workload(args.requests, args.seed + 1)
        refs = [[r.output_token_ids for r in make_engine(d, num_blocks=4096).generate(*w)] for w in (first, then)]
        eng = cluster(d, P, D)
        try:
            recs1, recs2, kill_t, readmitted_s, serving_s = asyncio.run(drive_restart(eng, rank, first, then, 0.5))
            eng.check_integrity()
            s = score(recs1 + recs2, refs[0] + refs[1])
            s.update(readmitted_s=round(readmitted_s, 2), serving_again_s=serving_s and round(serving_s, 2),
                     retries=eng.retries, restarts=eng.transfer.get("worker_restarts"), integrity="ok")
        finally:
            eng.stop()
        results[name] = s
        print(f"{name:14s} " + " ".join(f"{k}={v}" for k, v in s.items()), flush=True)

    # overload: measure the sustainable rate (closed loop, all at once), then offer 2x with bounded queues
    if want("overload-2x"):
        overload(d, args, results)
    if only is not None and os.path.exists(args.out):      # keep the other scenarios' last figures
        with open(args.out) as f:
            results = {**json.load(f)["results"], **results}
    with open(args.out, "w") as f:
        machine = ("CPU (2 cores), Ray CPU actors, tiny random Llama" if DEVICE == "cpu" else
                   f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, one GPU per worker, NCCL, "
                   "tiny random Llama (fp32)")
        json.dump({"machine": machine, "requests": args.requests,
                   "results": results}, f, indent=1)
    print("JSON:", args.out)


def overload(d, args, results):
    from conftest import make_engine
    eng = cluster(d, 0, 2)
    prompts, params = workload(args.requests, args.seed)
    try:
        recs, _, wall = asyncio.run(drive(eng, prompts, params))
        sustainable = len(prompts) / wall
        n = 4 * len(prompts)
        p2, s2 = workload(n, args.seed + 1)
        ref2 = [r.output_token_ids for r in make_engine(d, num_blocks=4096).generate(p2, s2)]
        rate = 2 * sustainable
        rnd = random.Random(args.seed)
        arrivals, t = [], 0.0
        for _ in range(n):
            arrivals.append(t)
            t += rnd.expovariate(rate)
        queue = {"n": 0}
        limit = 16                                   # --max-queued-requests analogue at the router

        def admit(delta):
            if delta > 0:
                if queue["n"] >= limit:
                    return False
                queue["n"] += 1
                return True
            queue["n"] -= 1
            return True
        recs, _, wall = asyncio.run(drive(eng, p2, s2, arrivals=arrivals, server=admit, deadline_s=120))
        s = score(recs, ref2)
        s.update(sustainable_req_s=round(sustainable, 2), offered_req_s=round(rate, 2),
                 goodput_req_s=round(s["completed"] / wall, 2), wall_s=round(wall, 2))
        eng.check_integrity()
    finally:
        eng.stop()
    results["overload-2x"] = s
    print("overload-2x    " + " ".join(f"{k}={v}" for k, v in s.items()), flush=True)


if __name__ == "__main__":
    main()
