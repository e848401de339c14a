"""PNGs from a bench_goodput.py JSON: goodput against rate, and TTFT / TPOT CDFs per setup.

    python benchmarks/plot_goodput.py results/goodput_llama3-8b_nvidia-h200.json
    (or: python benchmarks/bench_goodput.py --plot JSON)

Writes next to the JSON:
    <stem>_goodput.png      one row per SLO pair, one column per scenario: goodput (attainment x rate)
                            against the offered rate, one line per setup, the y = x line for reference
    <stem>_cdf_<scen>.png   TTFT and TPOT CDFs of the cluster setups at each rate all of them ran (equal
                            load), and of the HF baseline at its lowest rate; failed requests count as
                            never arriving (the curve stops below 1); SLO bounds dashed / dotted
matplotlib is imported here only (the GPU machine has none: plot off it).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from goodput_report import CLUSTER, LABEL, points  # noqa: E402

COLOR = {"colocated": "tab:blue", "disagg": "tab:red", "disagg-auto": "tab:orange", "hf": "tab:gray"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_goodput(data: dict, path: str) -> str:
    plt = _plt()
    scen = [s for s in data["scenarios"] if any(p["scenario"] == s for p in data["points"])]
    slos = list(data["slos_ms"])
    fig, axes = plt.subplots(len(slos), len(scen), figsize=(max(6.0, 4.6 * len(scen)), 3.6 * len(slos)),
                             squeeze=False)
    for j, sc in enumerate(scen):
        top = 0.0
        for i, slo in enumerate(slos):
            ax = axes[i][j]
            for mode in ("hf",) + CLUSTER:
                pts = points(data, sc, mode)
                if not pts:
                    continue
                xs = [p["rate"] for p in pts]
                top = max(top, max(xs))
                ax.plot(xs, [p["slo"][slo]["goodput"] for p in pts], "o-", color=COLOR[mode], label=LABEL[mode])
                met = [p for p in pts if p["slo"][slo]["p90_met"]]
                ax.plot([p["rate"] for p in met], [p["slo"][slo]["goodput"] for p in met], "o", ms=10,
                        mfc="none", color=COLOR[mode])
            ax.plot([0, top], [0, top], ":", color="black", lw=0.8)
            b = data["slos_ms"][slo]
            ax.set_title(f"{sc}, {slo} SLO (TTFT {b['ttft']:g} ms, TPOT {b['tpot']:g} ms)", fontsize=9)
            ax.set_xlabel("offered rate (req/s)")
            ax.set_ylabel("goodput (req/s within SLO)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="ringed: P90 within SLO", title_fontsize=7)
    fig.suptitle(f"Goodput against rate ({data.get('shape')}, {_machine(data)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _machine(data: dict) -> str:
    g = data.get("gpus") or []
    return f"{len(g)}x {g[0]}" if g else "CPU"


def _cdf(ax, values, color, label):
    n = len(values)
    xs = sorted(v for v in values if v is not None)
    if not n or not xs:
        return
    ax.step(xs, [(i + 1) / n for i in range(len(xs))], where="post", color=color, label=label)


def plot_cdfs(data: dict, scenario: str, path: str) -> str | None:
    plt = _plt()
    by_mode = {m: {p["rate"]: p for p in points(data, scenario, m)} for m in ("hf",) + CLUSTER}
    ran = [set(by_mode[m]) for m in CLUSTER if by_mode[m]]
    # columns: each rate every cluster setup ran (equal load), then the HF baseline at its lowest rate
    cols = [(r, CLUSTER) for r in sorted(set.intersection(*ran))] if ran else []
    if by_mode["hf"]:
        cols.append((min(by_mode["hf"]), ("hf",)))
    if not cols:
        return None
    fig, axes = plt.subplots(2, len(cols), figsize=(4.2 * len(cols), 6.4), squeeze=False)
    for j, (rate, modes) in enumerate(cols):
        for i, (key, metric) in enumerate((("ttft_ms", "ttft"), ("tpot_ms", "tpot"))):
            ax = axes[i][j]
            for mode in modes:
                p = by_mode[mode].get(rate)
                if p:
                    _cdf(ax, p[key], COLOR[mode], LABEL[mode])
            if modes == ("hf",):
                ax.legend(fontsize=8)
            for slo, style in (("tight", "--"), ("loose", ":")):
                ax.axvline(data["slos_ms"][slo][metric], color="black", ls=style, lw=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{scenario} @ {rate:g} req/s: {metric.upper()}", fontsize=9)
            ax.set_xlabel(f"{metric.upper()} (ms)")
            ax.set_ylabel("fraction of requests")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"TTFT and TPOT CDFs, {scenario} (dashed: tight SLO, dotted: loose)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(data: dict, out_dir: str, stem: str | None = None) -> list[str]:
    stem = stem or f"goodput_{data.get('shape', 'run')}"
    out = [plot_goodput(data, os.path.join(out_dir, f"{stem}_goodput.png"))]
    for sc in data["scenarios"]:
        p = plot_cdfs(data, sc, os.path.join(out_dir, f"{stem}_cdf_{sc}.png"))
        if p:
            out.append(p)
    return out


if __name__ == "__main__":
    src = sys.argv[1]
    with open(src) as f:
        d = json.load(f)
    stem = os.path.splitext(os.path.basename(src))[0]
    for p in plot_all(d, os.path.dirname(os.path.abspath(src)), stem):
        print(p)
