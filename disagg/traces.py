"""Request traces: when each request arrives, how long its prompt is, how long its answer.

One type, `TraceRequest`, shared by the load generator (`disagg bench`), the simulator
(`disagg simulate` / `disagg plan`) and the benchmarks, so they replay the same workload.

Sources:
  - the Azure LLM inference traces (CSV `TIMESTAMP,ContextTokens,GeneratedTokens`, e.g.
    ../shared/data/traces/azure2023/AzureLLMInferenceTrace_conv.csv): token counts only, so a
    replay uses synthetic prompts of the given length and `ignore_eos` with the given output;
  - synthetic traces: Poisson or gamma arrivals (burstiness = 1 / CV^2 as vllm bench serve
    defines it: 1 is Poisson, below 1 burstier), with fixed, uniform or lognormal lengths.

All times are seconds from the trace's first arrival. `rescale` changes the mean rate
without changing the shape of the arrival process (inter-arrival gaps scale together).
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass, replace
from datetime import datetime


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self):
        if not self.arrival_s >= 0 or self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"bad trace entry {self}: arrival >= 0 and lengths >= 1 required")


def load_csv(path: str, start: int = 0, limit: int | None = None) -> list[TraceRequest]:
    """An Azure-format CSV trace (rows start .. start+limit), arrivals relative to its first row.
    Zero-length prompts or outputs are clamped to 1 (a request always has both)."""
    out: list[TraceRequest] = []
    t0 = None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an Azure LLM trace (missing columns {sorted(missing)})")
        for i, row in enumerate(reader):
            if i < start:
                continue
            if limit is not None and len(out) >= limit:
                break
            t = _parse_time(row["TIMESTAMP"])
            t0 = t if t0 is None else t0
            out.append(TraceRequest(max(0.0, t - t0), max(1, int(row["ContextTokens"])),
                                    max(1, int(row["GeneratedTokens"]))))
    if not out:
        raise ValueError(f"{path}: no requests in rows {start}..{'' if limit is None else start + limit}")
    return out


def _parse_time(s: str) -> float:
    s = s.strip()
    try:
        return float(s)                     # already seconds
    except ValueError:
        pass
    # "2023-11-16 18:15:46.6805900": Python takes at most 6 fractional digits
    head, _, frac = s.partition(".")
    dt = datetime.fromisoformat(head + ("." + frac[:6] if frac else ""))
    return dt.timestamp()


def synthetic(n: int, rate: float, *, prompt: tuple = ("fixed", 1024), output: tuple = ("fixed", 128),
              burstiness: float = 1.0, seed: int = 0) -> list[TraceRequest]:
    """n requests at `rate` per second (gamma inter-arrivals with shape `burstiness`; 1: Poisson;
    math.inf: evenly spaced). Lengths: ("fixed", L), ("uniform", lo, hi) or ("lognormal", median, sigma)."""
    if n < 1 or not rate > 0 or not burstiness > 0:
        raise ValueError("n >= 1, rate > 0 and burstiness > 0 required")
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += 1.0 / rate if math.isinf(burstiness) else rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(TraceRequest(t, _length(prompt, rng), _length(output, rng)))
    return out


def _length(spec: tuple, rng: random.Random) -> int:
    kind, *a = spec
    if kind == "fixed":
        return max(1, int(a[0]))
    if kind == "uniform":
        return rng.randint(int(a[0]), int(a[1]))
    if kind == "lognormal":
        return max(1, round(rng.lognormvariate(math.log(a[0]), a[1])))
    raise ValueError(f"unknown length distribution {kind!r} (fixed, uniform, lognormal)")


def mean_rate(reqs: list[TraceRequest]) -> float:
    """Requests per second over the trace's span ((n - 1) gaps)."""
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    return (len(reqs) - 1) / span if span > 0 else math.inf


def rescale(reqs: list[TraceRequest], rate: float) -> list[TraceRequest]:
    """The same trace at mean `rate` requests/s: every gap scaled by mean_rate / rate."""
    if not rate > 0:
        raise ValueError("rate must be > 0")
    r = mean_rate(reqs)
    if math.isinf(r):
        return list(reqs)
    k = r / rate
    t0 = reqs[0].arrival_s
    return [replace(q, arrival_s=(q.arrival_s - t0) * k) for q in reqs]


def window(reqs: list[TraceRequest], duration_s: float) -> list[TraceRequest]:
    """The requests that arrive in the first `duration_s` seconds."""
    return [q for q in reqs if q.arrival_s - reqs[0].arrival_s < duration_s]


def cap_lengths(reqs: list[TraceRequest], max_model_len: int) -> list[TraceRequest]:
    """Clamp prompt + output to a model's context (prompt first, at least one output token)."""
    out = []
    for q in reqs:
        p = min(q.prompt_tokens, max_model_len - 1)
        out.append(replace(q, prompt_tokens=p, output_tokens=max(1, min(q.output_tokens, max_model_len - p))))
    return out
