"""Simulator fidelity: the real colocated engine against `disagg simulate` on the same trace slice.

    python benchmarks/sim_fidelity.py --rates 0,12             # GPU: Llama-3-8B shape, 200 Azure conv requests,
                                                               # as recorded and at 12 req/s
    python benchmarks/sim_fidelity.py --device cpu --model-config tiny --requests 16 --max-prompt 96 \
        --max-output 24 --quick-profile                        # CPU smoke run (minutes, numbers meaningless)

1. The performance model: `disagg profile`'s measurements (disagg/sim/profile.py) on the very
   runner that then serves (or --profile FILE); measuring first also warms every kernel shape.
2. The real engine: LLMEngine (scheduler, block manager, model runner, CUDA graphs) in this
   process, random weights of the model's shapes (--load-format dummy), bf16 on GPU. An open-loop
   driver thread releases each request at its trace arrival time (rescaled to each of --rates); the
   engine loop adds what arrived, steps, and timestamps every token. Prompts are random token ids of
   the trace's length; each answer is forced to the trace's length (ignore_eos, max_tokens).
3. The simulator on the same requests and engine settings (KV blocks, max_num_seqs, token budget),
   with the measured profile and, for reference, the analytic roofline model.

Reports predicted against measured P50 / P90 TTFT and TPOT (and mean, E2E), writes
benchmarks/results/sim_fidelity_<device>.json (also under $OUT when set).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import random
import shutil
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TRACE = ".devdata/traces/azure2023/AzureLLMInferenceTrace_conv.csv"
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=1)


def default_trace() -> str:
    for p in (os.path.join(ROOT, TRACE), os.path.join(os.path.dirname(ROOT), "shared/data/traces/azure2023",
                                                      os.path.basename(TRACE))):
        if os.path.exists(p):
            return p
    return os.path.join(ROOT, TRACE)


def replay(eng, trace, prompts) -> dict:
    """Open-loop replay in real time; per request: intended arrival, first token, done (perf_counter)."""
    from disagg.request import SamplingParams
    n = len(trace)
    q: queue.Queue = queue.Queue()
    t0 = time.perf_counter() + 0.5

    def driver():
        for i, r in enumerate(trace):
            dt = t0 + r.arrival_s - time.perf_counter()
            if dt > 0:
                time.sleep(dt)
            q.put(i)
    th = threading.Thread(target=driver, daemon=True)
    th.start()
    first, done, nout, added = [None] * n, [None] * n, [0] * n, [None] * n
    finished = 0
    steps = 0
    shapes, secs = [], []                 # per step: (decodes, KV tokens, prefill chunks), seconds
    starts, maxc = [], []                 # per step: start (perf_counter), longest decode context
    schedule = eng.scheduler.schedule
    execute = eng.runner.execute
    exec_s = []                           # per step: seconds inside runner.execute (the rest is host work)

    def timed_execute(*a, **kw):
        t = time.perf_counter()
        r = execute(*a, **kw)
        exec_s.append(time.perf_counter() - t)
        return r
    eng.runner.execute = timed_execute

    def recording_schedule():
        out = schedule()
        if out:
            shapes.append(step_shape(out))
            maxc.append(max((x.start + 1 for x in out.scheduled if x.is_decode), default=0))
        return out
    eng.scheduler.schedule = recording_schedule
    gc_pauses: list[tuple[int, float]] = []           # (generation, seconds) of every collection
    gc_t0 = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            gc_pauses.append((info["generation"], time.perf_counter() - gc_t0[0]))
    gc.callbacks.append(on_gc)
    while finished < n:
        try:
            i = q.get(timeout=0.05) if not eng.has_unfinished() else q.get_nowait()
            while True:
                added[i] = time.perf_counter()
                eng.add_request(prompts[i], SamplingParams(max_tokens=trace[i].output_tokens, temperature=0.0,
                                                           ignore_eos=True), request_id=str(i))
                i = q.get_nowait()
        except queue.Empty:
            pass
        if not eng.has_unfinished():
            continue
        ts = time.perf_counter()
        outs = eng.step()
        steps += 1
        t = time.perf_counter()
        if len(secs) < len(shapes):
            secs.append(t - ts)
            starts.append(ts)
        for o in outs:
            i = int(o.request_id)
            if o.new_token_ids and first[i] is None:
                first[i] = t
            nout[i] += len(o.new_token_ids)
            if o.finished:
                done[i] = t
                finished += 1
    gc.callbacks.remove(on_gc)
    eng.scheduler.schedule = schedule
    eng.runner.execute = execute
    arrival = [t0 + r.arrival_s for r in trace]
    gcs = {g: [x for k, x in gc_pauses if k == g] for g in (0, 1, 2)}
    return {"arrival": arrival, "first": first, "done": done, "num_out": nout, "steps": steps,
            "max_add_lag_s": max(a - b for a, b in zip(added, arrival)), "shapes": shapes, "step_s": secs,
            "exec_s": exec_s[:len(secs)], "start_s": [x - t0 for x in starts], "max_context": maxc[:len(secs)],
            "gc": {f"gen{g}": {"count": len(v), "total_s": sum(v), "max_s": max(v, default=0.0)}
                   for g, v in gcs.items()}}


def warm_up(eng, max_len: int, budget: int) -> float:
    """Eager steps at every prompt-length class before anything is timed: Triton specialises its
    kernels on sizes (and compiles each variant on first use, ~1 s), so a first replay would otherwise
    pay for compilation inside its TTFTs. Prompts of 2^k - 1, 2^k and 2^k + 8 tokens (k = 4..), each
    joining a batch of running decodes (mixed steps) and alone (prefill steps)."""
    from disagg.request import SamplingParams
    t = time.perf_counter()
    top = min(max_len, 2 * budget)
    lengths = sorted({n for k in range(4, 14) for n in (2 ** k - 1, 2 ** k, 2 ** k + 8) if n < top})
    long = SamplingParams(max_tokens=10 ** 6, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    eng.generate([[7] * n for n in lengths], short)                      # alone / batched prefills
    for i in range(8):                                                   # decodes to mix with
        eng.add_request([5 + i] * 64, long, request_id=f"warm-decode-{i}")
    for i, n in enumerate(lengths):
        eng.add_request([9] * n, short, request_id=f"warm-{i}")
        for _ in range(3):
            eng.step()
    for i in range(8):
        eng.abort(f"warm-decode-{i}")
    while eng.has_unfinished():
        eng.step()
    return time.perf_counter() - t


def step_errors(real: dict, pm) -> dict:
    """The step-time model against every step the engine ran: median and P90 of predicted / measured,
    for decode-only (CUDA graph) and mixed (eager, with prefill chunks) steps."""
    import numpy as np
    out = {}
    for kind, pick in (("decode", lambda c: not c), ("mixed", lambda c: bool(c))):
        r = [pm.step_time(b, k, c, m) / s for (b, k, c), s, m in zip(real["shapes"], real["step_s"],
                                                                     real["max_context"]) if pick(c)]
        if r:
            out[kind] = {"steps": len(r), "median_ratio": float(np.median(r)), "p10_ratio": float(np.percentile(r, 10)),
                         "p90_ratio": float(np.percentile(r, 90)),
                         "measured_s": float(np.sum([s for (b, k, c), s in zip(real["shapes"], real["step_s"])
                                                     if pick(c)]))}
    return out


def step_shape(out):
    from disagg.sim.workers import step_shape as shape
    return shape(out)[:3]


def per_request(real: dict) -> dict:
    a, f, d, n = real["arrival"], real["first"], real["done"], real["num_out"]
    return {"ttft_s": [y - x for x, y in zip(a, f)],
            "tpot_s": [(z - y) / (k - 1) if k > 1 else None for y, z, k in zip(f, d, n)]}


def stats(arrival, first, done, nout) -> dict:
    import numpy as np
    ttft = np.array([f - a for a, f in zip(arrival, first)])
    tpot = np.array([(d - f) / (n - 1) for f, d, n in zip(first, done, nout) if n > 1])
    e2e = np.array([d - a for a, d in zip(arrival, done)])
    out = {}
    for name, x in (("ttft_s", ttft), ("tpot_s", tpot), ("e2e_s", e2e)):
        out[name] = {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=default_trace())
    ap.add_argument("--start", type=int, default=0, help="first trace row")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rates", default="0", help="comma-separated rates to replay the slice at (0: as recorded)")
    ap.add_argument("--model-config", default="llama3-8b", help="llama3-8b | smollm2 | tiny | a config.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-prompt", type=int, default=None, help="cap prompt lengths (CPU runs)")
    ap.add_argument("--max-output", type=int, default=None, help="cap output lengths (CPU runs)")
    ap.add_argument("--num-gpu-blocks", type=int, default=None)
    ap.add_argument("--profile", default=None, help="use this profile instead of measuring one")
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--profile-out", default=None, help="also save the measured profile here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from dataclasses import replace

    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.llm_engine import LLMEngine
    from disagg.sim import profile as sim_profile
    from disagg.sim.serving_probe import write_model_dir
    from disagg.sim.cli import model_config
    from disagg.sim.perf_model import RooflineModel
    from disagg.sim.profile_model import ProfileModel, load_profile
    from disagg.sim.report import summarize
    from disagg.sim.simulator import SimConfig, Simulator
    from disagg.traces import cap_lengths, load_csv, rescale

    if args.model_config == "tiny":
        hf, name = dict(TINY), "tiny"
    else:
        mc0 = model_config(args.model_config)
        shipped = {"llama3-8b": "llama3_8b.json", "smollm2": "smollm2_135m.json"}
        path = args.model_config if os.path.exists(args.model_config) else os.path.join(
            ROOT, "disagg/sim/configs", shipped[args.model_config])
        hf, name = json.load(open(path)), mc0.name
    dev = torch.device(args.device if args.device == "cpu" or torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        torch.set_num_threads(1)         # a shared small CPU: one thread times far more steadily
    max_len = min(args.max_model_len, hf["max_position_embeddings"])
    trace = load_csv(args.trace, start=args.start, limit=args.requests)
    trace = [replace(q, prompt_tokens=min(q.prompt_tokens, args.max_prompt or q.prompt_tokens),
                     output_tokens=min(q.output_tokens, args.max_output or q.output_tokens)) for q in trace]
    trace = cap_lengths(trace, max_len)

    def prompts_for(k: int) -> list[list[int]]:
        """Random prompts, different for every replay: a replay must not find the previous one's
        prompts in the prefix cache (the simulator has no token ids, so no cross-request hits)."""
        rng = random.Random(args.seed * 1000 + k)
        return [[rng.randrange(3, hf["vocab_size"]) for _ in range(q.prompt_tokens)] for q in trace]

    mdir = write_model_dir(hf)
    cfg = EngineConfig(mdir, dtype="bfloat16" if dev.type == "cuda" else "float32", device=str(dev),
                       load_format="dummy", seed=args.seed,
                       cache=CacheConfig(num_blocks=args.num_gpu_blocks, cpu_kv_gib=0.25),
                       scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_model_len=max_len,
                                                 max_num_batched_tokens=args.max_num_batched_tokens))
    t = time.perf_counter()
    eng = LLMEngine(cfg, detokenize=False)
    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"engine up in {time.perf_counter() - t:.0f}s on {gpu_name}: {eng.runner.num_blocks} KV blocks; "
          f"{len(trace)} requests over {trace[-1].arrival_s:.0f}s as recorded", flush=True)
    from disagg.request import SamplingParams    # warm-up: a few prompts of assorted lengths, untimed
    eng.generate([[5] * n for n in (16, 200, 1000) if n < max_len],
                 SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))

    # The profile first: it runs every kernel at every shape it measures, so the replays below
    # meet no first-call compilation (Triton specialises on shapes).
    if args.profile:
        prof = load_profile(args.profile)
    else:
        t = time.perf_counter()
        prof = sim_profile.measure(eng.runner, hf, name, gpu_name,
                                   sim_profile.QUICK if args.quick_profile else sim_profile.FULL,
                                   quick=args.quick_profile)
        print(f"profiled in {time.perf_counter() - t:.0f}s", flush=True)
        if args.profile_out:
            with open(args.profile_out, "w") as f:
                json.dump(prof, f, indent=1)
    print(f"warm-up (every prompt-length class, alone and mixed): "
          f"{warm_up(eng, max_len, args.max_num_batched_tokens):.0f}s", flush=True)
    rates = [float(r) for r in args.rates.split(",")]
    traces, reals = {}, {}
    for k, rate in enumerate(rates):
        traces[rate] = rescale(trace, rate) if rate else trace
        t = time.perf_counter()
        reals[rate] = replay(eng, traces[rate], prompts_for(k))
        print(f"rate {rate or 'as recorded'}: replayed in {time.perf_counter() - t:.0f}s, {reals[rate]['steps']} "
              f"steps, largest add lag {reals[rate]['max_add_lag_s'] * 1e3:.1f} ms", flush=True)

    model_gpu = sim_profile._gpu_for_model(gpu_name)
    from disagg.config import ModelConfig
    mc = ModelConfig.from_hf_dict(hf, name=name)
    scfg = SimConfig(num_prefill=0, num_decode=1, max_num_seqs=args.max_num_seqs, frontdoor_s=0.0,
                     max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
                     block_size=eng.runner.block_size, num_blocks=eng.runner.num_blocks)
    points = []
    models = {"profile": ProfileModel({**prof, "gpu": model_gpu}), "roofline": RooflineModel(mc, model_gpu)}
    for rate in rates:
        real = reals[rate]
        measured = stats(real["arrival"], real["first"], real["done"], real["num_out"])
        sims, rows = {}, []
        for label, pm in models.items():
            t = time.perf_counter()
            sim = Simulator(traces[rate], scfg, pm)
            sim.step_log = []
            s = summarize(sim.run())
            sims[label] = {k: s[k] for k in ("ttft_s", "tpot_s", "e2e_s")}
            sims[label]["sim_wall_s"] = time.perf_counter() - t
            sims[label]["steps"] = sum(w.steps for w in sim.workers)
            sims[label]["mixed_steps"] = sum(1 for _, _, sch in sim.step_log if any(n > 1 for _, n in sch))
            sims[label]["busy_s"] = sum(w.busy_s for w in sim.workers)
            sims[label]["per_request"] = {k: s["per_request"][k] for k in ("ttft_s", "tpot_s")}
        print(f"\nrate {rate or 'as recorded'} ({len(trace)} requests over {traces[rate][-1].arrival_s:.0f}s)")
        print(f"{'':<10}{'measured':>10}{'profile':>10}{'error':>8}{'roofline':>10}{'error':>8}")
        for key in ("ttft_s", "tpot_s", "e2e_s"):
            for p in ("p50", "p90", "mean"):
                m, a, b = measured[key][p], sims["profile"][key][p], sims["roofline"][key][p]
                rows.append({"metric": f"{key[:-2]} {p}", "measured_s": m, "profile_s": a, "roofline_s": b,
                             "profile_error": a / m - 1, "roofline_error": b / m - 1})
                print(f"{key[:-2] + ' ' + p:<10}{m * 1e3:>9.1f}m{a * 1e3:>9.1f}m{a / m - 1:>+8.1%}"
                      f"{b * 1e3:>9.1f}m{b / m - 1:>+8.1%}")
        errs = step_errors(real, models["profile"])
        print("step model (profile) / measured: " + ", ".join(
            f"{k} steps x{v['median_ratio']:.3f} median (P10 x{v['p10_ratio']:.2f}, P90 x{v['p90_ratio']:.2f}, "
            f"{v['steps']} steps)" for k, v in errs.items()))
        mixed = sum(1 for _, _, c in real["shapes"] if c)
        import numpy as np
        for kind, pick in (("decode", lambda c: not c), ("mixed", bool)):
            ex = [(x, e) for (_, _, c), x, e in zip(real["shapes"], real["step_s"], real["exec_s"]) if pick(c)]
            if ex:
                print(f"{kind} steps: median {np.median([x for x, _ in ex]) * 1e3:.1f} ms, of which runner.execute "
                      f"{np.median([e for _, e in ex]) * 1e3:.1f} ms (median)")
        print("garbage collections during the replay: " + ", ".join(
            f"{g} {v['count']} ({v['total_s'] * 1e3:.1f} ms, longest {v['max_s'] * 1e3:.1f} ms)"
            for g, v in real["gc"].items()))
        print(f"engine: {real['steps']} steps ({mixed} with prefill chunks), {sum(real['step_s']):.1f}s busy; "
              f"simulated (profile): {sims['profile']['steps']} steps ({sims['profile']['mixed_steps']} with prefill "
              f"chunks), {sims['profile']['busy_s']:.1f}s busy")
        points.append({"rate": rate or None, "span_s": traces[rate][-1].arrival_s, "measured": measured,
                       "simulated": sims, "rows": rows, "engine_steps": real["steps"], "engine_mixed_steps": mixed,
                       "engine_busy_s": sum(real["step_s"]), "max_add_lag_s": real["max_add_lag_s"],
                       "step_model_vs_measured": errs, "per_request": per_request(real),
                       "gc": real["gc"],
                       # per step: decodes, KV tokens, chunks, seconds, of which runner.execute, start
                       # (from the replay's origin), longest decode context
                       "steps": [[b, k, c, round(x, 6), round(e, 6), round(t, 6), m] for (b, k, c), x, e, t, m
                                 in zip(real["shapes"], real["step_s"], real["exec_s"], real["start_s"],
                                        real["max_context"])]})
    slug = "cpu" if dev.type == "cpu" else gpu_name.lower().replace(" ", "-")
    out = {"benchmark": "sim_fidelity", "device": gpu_name, "model": name, "trace": os.path.basename(args.trace),
           "start": args.start, "requests": len(trace), "num_blocks": eng.runner.num_blocks,
           "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
           "points": points, "argv": sys.argv[1:],
           "profile_validation": prof.get("validation"), "profile_elapsed_s": prof.get("elapsed_s")}
    path = args.out or os.path.join(ROOT, "benchmarks/results", f"sim_fidelity_{slug}_{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    if os.environ.get("OUT") and os.path.dirname(os.path.abspath(path)) != os.path.abspath(os.environ["OUT"]):
        shutil.copy(path, os.environ["OUT"])
        if not args.profile:
            with open(os.path.join(os.environ["OUT"], f"profile_{slug}_{name}.json"), "w") as f:
                json.dump(prof, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
