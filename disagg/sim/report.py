"""What a simulation reports, in the shape of `vllm bench serve`'s summary; JSON; plots.

    summarize(result, slo) -> dict          every figure (seconds in the dict, ms when printed)
    format_report(summary) -> str           the text table
    plot_cdfs(summaries, path)              TTFT / TPOT / E2E latency CDFs (matplotlib, lazily)
    plot_goodput(points, path)              goodput against request rate

Definitions follow vllm bench serve: TTFT = first token - arrival; TPOT = (e2e - TTFT) /
(output tokens - 1), requests of one token left out; ITL = every gap between two tokens of a
request; percentiles by linear interpolation (numpy's default). Goodput: requests per second
(over the run's duration) that met every SLO given (TTFT and TPOT); SLO attainment: their
fraction of all requests (failed ones count as missing it).
"""
from __future__ import annotations

import math

import numpy as np

PERCENTILES = (50, 90, 99)


def _weighted_percentiles(values, weights, ps) -> list[float]:
    """np.percentile of the array with each value repeated `weight` times (linear interpolation)."""
    v = np.frombuffer(values, dtype=np.float64) if not isinstance(values, np.ndarray) else values
    w = np.frombuffer(weights, dtype=np.int64) if not isinstance(weights, np.ndarray) else weights
    if v.size == 0:
        return [math.nan] * len(ps)
    order = np.argsort(v, kind="stable")
    v, cw = v[order], np.cumsum(w[order])
    n = int(cw[-1])
    out = []
    for p in ps:
        r = p / 100 * (n - 1)
        lo, hi = int(math.floor(r)), int(math.ceil(r))
        a = v[np.searchsorted(cw, lo, side="right")]
        b = v[np.searchsorted(cw, hi, side="right")]
        out.append(float(a + (b - a) * (r - lo)))
    return out


def _stats(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    return {"mean": float(x.mean()), **{f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES}}


def summarize(res, slo: tuple[float, float] | None = None) -> dict:
    """slo = (ttft_s, tpot_s) or None."""
    n = len(res.trace)
    arrival, first, done = (np.asarray(a, dtype=np.float64) for a in (res.arrival, res.first, res.done))
    nout = np.asarray(res.num_out, dtype=np.int64)
    ok = ~np.isnan(done)
    ttft = first[ok] - arrival[ok]
    e2e = done[ok] - arrival[ok]
    multi = ok & (nout > 1)
    tpot_all = np.full(n, np.nan)
    tpot_all[multi] = (done[multi] - first[multi]) / (nout[multi] - 1)
    start = float(arrival.min()) if n else 0.0
    end = float(done[ok].max()) if ok.any() else start
    dur = max(end - start, 1e-9)
    prompt = np.array([q.prompt_tokens for q in res.trace])
    out = {
        "config": _config(res.cfg), "requests": n, "successful": int(ok.sum()), "failed": len(res.failed),
        "failed_reasons": _reasons(res.failed), "stopped_early": res.stopped_early,
        "duration_s": dur, "total_input_tokens": int(prompt[ok].sum()), "total_output_tokens": int(nout[ok].sum()),
        "request_throughput": ok.sum() / dur, "output_throughput": nout[ok].sum() / dur,
        "total_token_throughput": (prompt[ok].sum() + nout[ok].sum()) / dur,
        "ttft_s": _stats(ttft), "tpot_s": _stats(tpot_all[multi]), "e2e_s": _stats(e2e),
        "itl_s": {"mean": float(np.average(np.frombuffer(res.itl_values, dtype=np.float64),
                                           weights=np.frombuffer(res.itl_weights, dtype=np.int64)))
                  if len(res.itl_values) else math.nan,
                  **dict(zip((f"p{p}" for p in PERCENTILES),
                             _weighted_percentiles(res.itl_values, res.itl_weights, PERCENTILES)))},
        "pools": _pools(res, end),
        "gpus": _gpus(res),
    }
    if slo is not None:
        good = ok & (first - arrival <= slo[0]) & ((nout <= 1) | (np.nan_to_num(tpot_all, nan=0.0) <= slo[1]))
        out["slo"] = {"ttft_s": slo[0], "tpot_s": slo[1]}
        out["goodput"] = float(good.sum() / dur)
        out["slo_attainment"] = float(good.sum() / max(n, 1))
        out["goodput_per_gpu"] = out["goodput"] / out["gpus"]
    out["per_request"] = {"ttft_s": ttft.tolist(), "tpot_s": tpot_all[multi].tolist(), "e2e_s": e2e.tolist()}
    return out


def _reasons(failed: dict) -> dict:
    r: dict[str, int] = {}
    for why in failed.values():
        r[why] = r.get(why, 0) + 1
    return r


def _config(cfg) -> dict:
    from dataclasses import asdict
    return asdict(cfg)


def _gpus(res) -> int:
    return sum(w.perf.tp for w in res.workers)


def _pools(res, end: float) -> dict:
    pools = {}
    for role in ("prefill", "decode", "colocated"):
        ws = [w for w in res.workers if w.role == role]
        if not ws:
            continue
        span = max(end, 1e-9)
        busy = sum(w.busy_s for w in ws)
        pools[role] = {
            "workers": len(ws), "tp": ws[0].perf.tp, "kv_blocks_per_worker": ws[0].bm.num_blocks,
            "busy_fraction": busy / (span * len(ws)),
            "mean_batch": sum(w.batch_s for w in ws) / max(busy, 1e-12),
            "mean_kv_usage": sum(w.kv_block_s for w in ws) / max(sum(w.bm.num_blocks for w in ws) * span, 1e-12),
            "peak_kv_usage": max(w.peak_blocks / w.bm.num_blocks for w in ws),
            "steps": sum(w.steps for w in ws), "coalesced_windows": sum(w.windows for w in ws),
            "preemptions": sum(w.preemptions for w in ws), "local_prefills": sum(w.local_prefills for w in ws),
        }
    return pools


def format_report(s: dict, title: str = "Simulated Serving Benchmark Result") -> str:
    w = 50
    lines = [f"{' ' + title + ' ':=^{w}}"]

    def row(k, v, fmt="{:.2f}"):
        lines.append(f"{k:<40}{fmt.format(v) if isinstance(v, float) else v}")
    row("Successful requests:", s["successful"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", float(s["request_throughput"]))
    row("Output token throughput (tok/s):", float(s["output_throughput"]))
    row("Total Token throughput (tok/s):", float(s["total_token_throughput"]))
    if "goodput" in s:
        slo = s["slo"]
        row(f"Request goodput (req/s):", s["goodput"])
        row(f"SLO attainment (TTFT<={slo['ttft_s'] * 1e3:g}ms, TPOT<={slo['tpot_s'] * 1e3:g}ms):",
            f"{100 * s['slo_attainment']:.1f}%")
        row("Goodput per GPU (req/s):", s["goodput_per_gpu"])
    for key, name, head in (("ttft_s", "TTFT", "Time to First Token"),
                            ("tpot_s", "TPOT", "Time per Output Token (excl. 1st token)"),
                            ("itl_s", "ITL", "Inter-token Latency"), ("e2e_s", "E2EL", "End-to-end Latency")):
        lines.append(f"{head:-^{w}}")
        st = s[key]
        row(f"Mean {name} (ms):", st["mean"] * 1e3)
        for p in PERCENTILES:
            row(f"{'Median' if p == 50 else f'P{p}'} {name} (ms):", st[f"p{p}"] * 1e3)
    lines.append(f"{'Pools (' + str(s['gpus']) + ' GPUs)':-^{w}}")
    for role, p in s["pools"].items():
        lines.append(f"{role} x{p['workers']} (TP{p['tp']}, {p['kv_blocks_per_worker']} KV blocks each): "
                     f"busy {100 * p['busy_fraction']:.0f}%, batch {p['mean_batch']:.1f}, KV mean "
                     f"{100 * p['mean_kv_usage']:.0f}% peak {100 * p['peak_kv_usage']:.0f}%, "
                     f"{p['preemptions']} preemptions" + (f", {p['local_prefills']} local prefills"
                                                         if role == "decode" and p["local_prefills"] else ""))
    if s["failed"]:
        lines.append("failed: " + ", ".join(f"{v} {k}" for k, v in s["failed_reasons"].items()))
    lines.append("=" * w)
    return "\n".join(lines)


def strip(s: dict) -> dict:
    """The summary without per-request arrays (for --json)."""
    return {k: v for k, v in s.items() if k != "per_request"}


def plot_cdfs(summaries: dict[str, dict], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, name in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "end-to-end")):
        for label, s in summaries.items():
            x = np.sort(np.asarray(s["per_request"][key])) * 1e3
            if x.size:
                ax.plot(x, np.arange(1, x.size + 1) / x.size, label=label)
        if any("slo" in s for s in summaries.values()) and key != "e2e_s":
            slo = next(s["slo"] for s in summaries.values() if "slo" in s)
            ax.axvline(slo[key] * 1e3, color="k", ls="--", lw=0.8)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_goodput(points: dict[str, list[tuple[float, float]]], path: str, ylabel: str = "goodput (req/s)") -> str:
    """points: label -> [(rate, goodput)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in points.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    lim = max((p[0] for pts in points.values() for p in pts), default=1)
    ax.plot([0, lim], [0, lim], color="k", ls=":", lw=0.8, label="offered")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
