"""The engine serving a synthetic workload around a runner: what `disagg profile` cannot learn
from steps timed one shape at a time (disagg/sim/profile.py).

    host_overhead(runner)   LLMEngine.step's host work while serving, and the steps it ran
    write_model_dir(hf)     a weightless checkpoint directory (config + tokenizer) for dummy loads
"""
from __future__ import annotations

import json
import os
import tempfile
import time


def write_model_dir(hf: dict) -> str:
    """A checkpoint directory without weights: config.json and a word-level tokenizer over the
    vocabulary (LLMEngine wants one; these runs feed token ids). For load_format="dummy"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tempfile.mkdtemp(prefix="disagg_model_")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf, f)
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, hf["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return d


class _NoGPURunner:
    """A runner that computes nothing: each sampled request gets token 5 after `wait_s` of a
    busy wait (a GPU step's synchronisation, without which the engine loop would run far more
    steps per request than serving does)."""
    wait_s = 0.004

    def __init__(self, cfg, model_cfg, max_model_len, progress=False):
        self.num_blocks = cfg.cache.num_blocks
        self.block_size = cfg.cache.block_size

    def execute(self, out):
        from disagg.engine.model_runner import StepResult
        t = time.perf_counter()
        while time.perf_counter() - t < self.wait_s:
            pass
        return StepResult({s.request.request_id: 5 for s in out.scheduled
                           if s.is_decode or s.start + s.num_tokens >= s.request.num_prompt_tokens}, {})


TINY_HF = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=16384,
               tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def host_overhead(runner=None, duration_s: float = 12.0, rate: float = 16.0,
                  seed: int = 0) -> tuple[dict, list]:
    """The engine's host work per step, outside runner.execute, as it is while serving: a real
    LLMEngine (scheduler, block manager with prefix caching, updates, outputs) serving a
    synthetic open-loop workload (Poisson arrivals, conversation-like lengths: lognormal prompts
    around 1,000 tokens and answers around 250) for duration_s, driving `runner` (the runner
    being profiled), or on CPU a runner that computes nothing and waits 4 ms a step.

    A scripted loop of identical steps measures about half of what serving shows (7-10 against
    12-17 us per request on the H200 hosts, benchmarks/RESULTS.md): serving's block tables,
    prefix-cache evictions and outputs differ step to step. Fitted by least squares: decode-only
    steps give sched_s + sched_seq_s B; steps with prompt chunks, what they cost on top,
    chunk_s per chunk + chunk_token_s per prompt token.

    Returns (the host row of a profile, the steps run on `runner`: (B, KV tokens, chunks, longest
    decode context, execute s, host s) each; [] with no runner)."""
    from dataclasses import replace

    import numpy as np

    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.llm_engine import LLMEngine
    from disagg.request import SamplingParams
    from disagg.sim.workers import step_shape
    from disagg.traces import cap_lengths, synthetic
    if runner is None:
        cfg = EngineConfig(write_model_dir(TINY_HF), dtype="float32", device="cpu", load_format="dummy",
                           cache=CacheConfig(block_size=16, num_blocks=60000),
                           scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=2048,
                                                     max_model_len=8192))
        max_len, make = 8192, _NoGPURunner
    else:
        cfg = replace(runner.cfg, scheduler=replace(runner.cfg.scheduler, max_num_batched_tokens=2048))
        max_len = runner.max_model_len

        def make(*a, **k):
            return runner
    fit_len = max(16, min(1000, max_len // 4))
    trace = cap_lengths(synthetic(int(rate * duration_s) + 1, rate, prompt=("lognormal", fit_len, 0.8),
                                  output=("lognormal", max(2, fit_len // 4), 0.8), seed=seed), max_len)
    # arrivals ramp up (rate 0 to 2 x rate over duration_s), so batches span small to large
    trace = [replace(q, arrival_s=duration_s * (q.arrival_s / duration_s) ** 0.5) for q in trace]
    eng = LLMEngine(cfg, detokenize=False, make_runner=make)
    execute, inside = eng.runner.execute, [0.0]

    def timed_execute(out):
        t0 = time.perf_counter()
        r = execute(out)
        inside[0] = time.perf_counter() - t0
        return r
    schedule, seen = eng.scheduler.schedule, []

    def recording_schedule():
        seen.append(schedule())
        return seen[-1]
    eng.runner.execute = timed_execute
    eng.scheduler.schedule = recording_schedule
    rng = np.random.default_rng(seed)
    vocab = min(500, runner.model_cfg.vocab_size if runner is not None else TINY_HF["vocab_size"])
    steps = []
    try:
        t0, i = time.perf_counter(), 0
        while time.perf_counter() - t0 < duration_s and (i < len(trace) or eng.has_unfinished()):
            now = time.perf_counter() - t0
            while i < len(trace) and trace[i].arrival_s <= now:
                q = trace[i]
                eng.add_request(rng.integers(3, vocab, q.prompt_tokens).tolist(),
                                SamplingParams(max_tokens=q.output_tokens, temperature=0.0, ignore_eos=True))
                i += 1
            if not eng.has_unfinished():
                time.sleep(0.001)
                continue
            seen.clear()
            ts = time.perf_counter()
            eng.step()
            host = time.perf_counter() - ts - inside[0]
            if seen and seen[0]:
                steps.append((*step_shape(seen[0]), inside[0], host))
    finally:
        eng.scheduler.schedule = schedule
        if runner is not None:
            del runner.execute                   # the instance attribute: back to the method
        else:
            eng.runner.execute = execute
    dec = [(b, host) for b, _, chunks, _, _, host in steps if not chunks]
    mixed = [(b, len(chunks), sum(n for n, _ in chunks), host) for b, _, chunks, _, _, host in steps if chunks]
    if len(dec) < 2:
        raise RuntimeError("host_overhead: too few decode steps to fit (raise duration_s)")
    x = np.array([d[0] for d in dec], dtype=float)
    y = np.array([d[1] for d in dec])
    k, a = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(np.median(y)))
    a, k = max(float(a), 0.0), max(float(k), 0.0)
    c0 = ct = 0.0
    if len(mixed) >= 2:
        m = np.array(mixed, dtype=float)
        resid = m[:, 3] - (a + k * (m[:, 0] + m[:, 1]))
        (c0, ct), *_ = np.linalg.lstsq(m[:, 1:3], resid, rcond=None)
        c0, ct = max(float(c0), 0.0), max(float(ct), 0.0)
    host = {"sched_s": a, "sched_seq_s": k, "chunk_s": c0, "chunk_token_s": ct,
            "method": f"LLMEngine.step minus runner.execute, {duration_s:g} s of a synthetic workload at {rate:g} "
                      f"req/s" + (" (no GPU work)" if runner is None else ""),
            "decode_steps": len(dec), "mixed_steps": len(mixed), "mean_batch": float(x.mean())}
    return host, (steps if runner is not None else [])
