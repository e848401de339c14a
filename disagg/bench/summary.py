"""What a run means: the metrics `vllm bench serve` reports, with the same definitions.

Per successful request (times from the moment the request was sent):
    TTFT  first chunk with content - send
    ITL   the gaps between successive content chunks (one list per request, pooled)
    TPOT  (E2EL - TTFT) / (output tokens - 1), 0 for a one-token answer (vLLM's convention)
    E2EL  last byte - send
Run-level:
    request throughput   successful requests / duration (first send .. last request ended)
    goodput              requests meeting every SLO (`ttft:MS`, `tpot:MS`, `e2el:MS`) / duration
    SLO attainment       requests meeting every SLO / requests sent (failed ones count against it)
Percentiles interpolate linearly between ranks (numpy's default), as vLLM's do.
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Sequence

from disagg.bench.loadgen import RequestResult

SLO_KEYS = ("ttft", "tpot", "e2el")
PERCENTILES = (90, 99)          # with the mean and the median


def percentile(xs: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) of xs by linear interpolation between closest ranks; None if empty."""
    if not xs:
        return None
    if not 0 <= p <= 100:
        raise ValueError("percentile must lie in [0, 100]")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    if k == lo or s[hi] == s[lo]:
        return s[lo]
    if math.isinf(s[hi]):               # failed requests counted as infinitely late
        return s[hi]
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def parse_slos(items: Iterable[str] | None) -> dict[str, float]:
    """["ttft:250", "tpot:25"] -> {"ttft": 250.0, "tpot": 25.0} (milliseconds)."""
    out: dict[str, float] = {}
    for item in items or ():
        key, sep, val = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO {item!r}: expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            ms = float(val)
        except ValueError:
            raise ValueError(f"bad SLO {item!r}: {val!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"bad SLO {item!r}: the bound must be positive")
        out[key] = ms
    return out


def tpot_s(r: RequestResult) -> float:
    return (r.e2e - r.ttft) / (r.output_len - 1) if r.output_len > 1 else 0.0


def meets(r: RequestResult, slos: dict[str, float]) -> bool:
    """A successful request within every bound (ms)."""
    if not r.ok or r.ttft is None:
        return False
    got = {"ttft": r.ttft, "tpot": tpot_s(r), "e2el": r.e2e}
    return all(got[k] * 1e3 <= v for k, v in slos.items())


def slo_stats(results: Sequence[RequestResult], slos: dict[str, float], duration_s: float) -> dict:
    good = sum(meets(r, slos) for r in results)
    return {"slos_ms": dict(slos), "good_requests": good,
            "request_goodput": good / duration_s if duration_s > 0 else 0.0,
            "slo_attainment": good / len(results) if results else 0.0}


def _stats(name: str, xs_s: Sequence[float]) -> dict:
    ms = [x * 1e3 for x in xs_s]
    out = {f"mean_{name}_ms": statistics.fmean(ms) if ms else None,
           f"median_{name}_ms": statistics.median(ms) if ms else None,
           f"std_{name}_ms": statistics.pstdev(ms) if ms else None}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = percentile(ms, p)
    return out


def summarize(results: Sequence[RequestResult], duration_s: float, slos: dict[str, float] | None = None,
              per_request: bool = True) -> dict:
    """vLLM's result dict (same key names) for one run; per-request lists when `per_request`."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len or 0 for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = (r.error or "unknown error")[:200]
            errors[key] = errors.get(key, 0) + 1
    d = {"duration": duration_s, "num_requests": len(results), "completed": len(ok),
         "failed": len(results) - len(ok), "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
         "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
         "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
         "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else 0.0,
         "max_concurrent_requests": max_concurrent(results), "error_counts": errors}
    if slos:
        g = slo_stats(results, slos, duration_s)
        d.update(goodput_slos_ms=g["slos_ms"], request_goodput=g["request_goodput"],
                 slo_attainment=g["slo_attainment"])
    d.update(_stats("ttft", [r.ttft for r in ok if r.ttft is not None]))
    d.update(_stats("tpot", [tpot_s(r) for r in ok if r.output_len > 1]))
    d.update(_stats("itl", [x for r in ok for x in r.itl]))
    d.update(_stats("e2el", [r.e2e for r in ok]))
    if per_request:
        d.update(input_lens=[r.prompt_len for r in results], output_lens=[r.output_len for r in results],
                 ttfts=[r.ttft for r in results], tpots=[tpot_s(r) if r.ok else None for r in results],
                 e2els=[r.e2e if r.ok else None for r in results], itls=[r.itl for r in results],
                 errors=[r.error for r in results])
    return d


def max_concurrent(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at once (from their send and end times)."""
    events = sorted([(r.sent_s, 1) for r in results if r.sent_s is not None]
                    + [(r.sent_s + r.e2e, -1) for r in results if r.sent_s is not None])
    peak = cur = 0
    for _, d in events:                  # at equal times an end (-1) sorts before a start (+1)
        cur += d
        peak = max(peak, cur)
    return peak


def format_summary(d: dict, title: str = "Serving Benchmark Result") -> str:
    """The block `vllm bench serve` prints, with P90 beside P99."""
    lines = [f"{' ' + title + ' ':=^50}"]

    def row(label, value, fmt="{:.2f}"):
        lines.append("{:<40} {:<10}".format(label, "n/a" if value is None else fmt.format(value)))

    row("Successful requests:", d["completed"], "{}")
    row("Failed requests:", d["failed"], "{}")
    if d.get("max_concurrency") is not None:
        row("Maximum request concurrency:", d["max_concurrency"], "{}")
    if d.get("request_rate") is not None:
        row("Request rate configured (RPS):", d["request_rate"])
    row("Benchmark duration (s):", d["duration"])
    row("Total input tokens:", d["total_input_tokens"], "{}")
    row("Total generated tokens:", d["total_output_tokens"], "{}")
    row("Request throughput (req/s):", d["request_throughput"])
    if "request_goodput" in d:
        row("Request goodput (req/s):", d["request_goodput"])
        row("SLO attainment (%):", 100 * d["slo_attainment"])
        row("Goodput SLOs (ms):", " ".join(f"{k}:{v:g}" for k, v in d["goodput_slos_ms"].items()), "{}")
    row("Output token throughput (tok/s):", d["output_throughput"])
    row("Total token throughput (tok/s):", d["total_token_throughput"])
    row("Peak concurrent requests:", d["max_concurrent_requests"], "{}")
    for name, head in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{head:-^50}")
        up = name.upper() if name != "e2el" else "E2EL"
        row(f"Mean {up} (ms):", d[f"mean_{name}_ms"])
        row(f"Median {up} (ms):", d[f"median_{name}_ms"])
        for p in PERCENTILES:
            row(f"P{p} {up} (ms):", d[f"p{p}_{name}_ms"])
    if d["error_counts"]:
        lines.append(f"{'Errors':-^50}")
        for msg, n in sorted(d["error_counts"].items(), key=lambda kv: -kv[1])[:5]:
            lines.append(f"{n:>6} x {msg}")
    lines.append("=" * 50)
    return "\n".join(lines)
