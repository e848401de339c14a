"""Reading a bench_goodput.py JSON: the tables and the issue-8 checks, as text.

    python benchmarks/goodput_report.py results/goodput_llama3-8b_nvidia-h200.json

Definitions (per point = one mode, one scenario, one offered rate):
  attainment    fraction of the requests sent that finished within both SLOs (failed ones count against)
  goodput       attainment x offered rate (req/s): the part of the load served within the SLO
  P90 met       P90 TTFT and P90 TPOT within the SLO, failed requests counted as infinitely late
  capacity      the highest swept rate at which P90 is met (DistServe's goodput), '<' the lowest if none
Checks (issue 8): P99 ITL colocated / disaggregated >= 2 at equal load; disaggregated tight goodput
within 10% of colocated; conditional disaggregation (auto) >= 95% of the better of never and
colocated at every point; every cluster mode >= 10x the HF baseline's goodput; AIConfigurator's
prediction beside our best capacity on its own lengths and SLO.
"""
from __future__ import annotations

import json
import sys

CLUSTER = ("colocated", "disagg", "disagg-auto")
LABEL = {"colocated": "colocated x2", "disagg": "disagg 1P+1D never", "disagg-auto": "disagg 1P+1D auto",
         "hf": "HF generate()"}


def points(data: dict, scenario: str, mode: str) -> list[dict]:
    return sorted((p for p in data["points"] if p["scenario"] == scenario and p["mode"] == mode),
                  key=lambda p: p["rate"])


def capacity(pts: list[dict], slo: str) -> tuple[float | None, bool]:
    """(highest rate meeting P90 with every lower swept rate meeting it too, whether any failed above it)."""
    best = None
    for p in pts:
        if not p["slo"][slo]["p90_met"]:
            return best, True
        best = p["rate"]
    return best, False


def max_goodput(pts: list[dict], slo: str) -> float:
    return max((p["slo"][slo]["goodput"] for p in pts), default=0.0)


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _cap(pts, slo) -> str:
    c, bounded = capacity(pts, slo)
    if c is None:
        return f"< {pts[0]['rate']:g}" if pts else "-"
    return f"{c:g}" if bounded else f">= {c:g}"


def table(data: dict, scenario: str) -> list[str]:
    head = (f"{'mode':<20} {'rate':>6} {'sent':>5} {'fail':>5} {'req/s':>6} {'TTFT p90':>9} {'TPOT p90':>9} "
            f"{'ITL p99':>8} {'tight %':>8} {'good/s':>7} {'loose %':>8} {'good/s':>7} {'local':>6}")
    lines = [head, "-" * len(head)]
    for mode in ("hf",) + CLUSTER:
        for p in points(data, scenario, mode):
            s, t, lo = p["summary"], p["slo"]["tight"], p["slo"]["loose"]
            lines.append(
                f"{LABEL[mode]:<20} {p['rate']:>6g} {s['num_requests']:>5} {s['failed']:>5} "
                f"{s['request_throughput']:>6.1f} {_f(t['p90_ttft_ms'], '{:.0f}'):>9} "
                f"{_f(t['p90_tpot_ms'], '{:.1f}'):>9} {_f(s['p99_itl_ms'], '{:.1f}'):>8} "
                f"{100 * t['slo_attainment']:>7.0f}% {t['goodput']:>7.2f} {100 * lo['slo_attainment']:>7.0f}% "
                f"{lo['goodput']:>7.2f} {_f(p.get('local_prefills'), '{:.0f}'):>6}")
    return lines


def checks(data: dict, scenario: str) -> list[str]:
    out = []
    modes = {m: points(data, scenario, m) for m in ("hf",) + CLUSTER}
    for slo in ("tight", "loose"):
        caps = ", ".join(f"{LABEL[m]} {_cap(modes[m], slo)}" for m in CLUSTER if modes[m])
        gps = {m: max_goodput(modes[m], slo) for m in modes if modes[m]}
        if caps:
            out.append(f"capacity at the {slo} SLO (req/s, P90 met): {caps}")
        if gps:
            top = max((g for m, g in gps.items() if m != "hf"), default=None)
            wins = [LABEL[m] for m, g in gps.items() if m != "hf" and top is not None and g >= top - 1e-9]
            out.append(f"max goodput at the {slo} SLO (req/s): "
                       + ", ".join(f"{LABEL[m]} {g:.2f}" for m, g in gps.items())
                       + (f"  -> best: {' = '.join(wins)}" if wins else ""))
    # P99 ITL at equal load
    colo = {p["rate"]: p for p in modes["colocated"]}
    ratios = []
    for p in modes["disagg"]:
        c = colo.get(p["rate"])
        if c and p["summary"]["p99_itl_ms"] and c["summary"]["p99_itl_ms"]:
            ratios.append((p["rate"], c["summary"]["p99_itl_ms"] / p["summary"]["p99_itl_ms"]))
    if ratios:
        ok = all(r >= 2 for _, r in ratios)
        out.append("P99 ITL colocated / disagg at equal load: "
                   + ", ".join(f"{r:g}/s {x:.2f}x" for r, x in ratios)
                   + f"  (target >= 2x: {'met' if ok else 'missed'})")
    if modes["disagg"] and modes["colocated"]:
        d, c = max_goodput(modes["disagg"], "tight"), max_goodput(modes["colocated"], "tight")
        if c > 0:
            out.append(f"tight goodput disagg / colocated: {d / c:.2f} "
                       f"(target >= 0.90: {'met' if d >= 0.9 * c else 'missed'})")
    # conditional disaggregation against the better of the two, point by point
    worst = None
    never = {p["rate"]: p for p in modes["disagg"]}
    for p in modes["disagg-auto"]:
        for slo in ("tight", "loose"):
            others = [q["slo"][slo]["goodput"] for q in (never.get(p["rate"]), colo.get(p["rate"])) if q]
            best = max(others, default=0.0)
            if best > 0:
                r = p["slo"][slo]["goodput"] / best
                if worst is None or r < worst[0]:
                    worst = (r, p["rate"], slo)
    if worst:
        out.append(f"auto / better of (never, colocated), worst point: {worst[0]:.2f} at {worst[1]:g}/s, "
                   f"{worst[2]} SLO (target >= 0.95: {'met' if worst[0] >= 0.95 else 'missed'})")
    if modes["hf"]:
        for slo in ("tight", "loose"):
            h = max_goodput(modes["hf"], slo)
            parts = [f"{LABEL[m]} {max_goodput(modes[m], slo) / h:.0f}x" if h > 0 else f"{LABEL[m]} (HF 0)"
                     for m in CLUSTER if modes[m]]
            if parts:
                out.append(f"vs HF baseline at the {slo} SLO (max goodput ratio, target >= 10x): " + ", ".join(parts))
        cap = [p.get("hf_service_bound") for p in modes["hf"] if p.get("hf_service_bound")]
        if cap:
            out.append(f"HF one-at-a-time throughput bound (requests / seconds in generate()): {max(cap):.2f} req/s")
    return out


def aic_lines(data: dict) -> list[str]:
    aic = data.get("aiconfigurator")
    if not aic or not aic.get("modes"):
        return ["AIConfigurator prediction: not found (run benchmarks/aic_predict.py)"]
    m = aic["modes"]
    lines = [f"AIConfigurator {aic.get('version')} ({aic['backend']} {m.get('agg', {}).get('top', [{}])[0].get('version', '')}, "
             f"{aic['model']}, {aic['total_gpus']}x {aic['system']}, {aic['isl']} in / {aic['osl']} out, "
             f"TTFT <= {aic['slo_ms']['ttft']:g} ms, TPOT <= {aic['slo_ms']['tpot']:g} ms):"]
    for k, name in (("agg", "colocated replicas"), ("disagg", "disaggregated")):
        if k in m:
            lines.append(f"  predicted {name}: {m[k]['request_rate_total']:.2f} req/s "
                         f"({m[k]['tokens_per_s_per_gpu']:,.0f} output tok/s/GPU)")
    fixed = {mode: points(data, "fixed", mode) for mode in CLUSTER}
    ours = [(capacity(p, "tight")[0] or 0.0, max_goodput(p, "tight"), mode) for mode, p in fixed.items() if p]
    if ours:
        for cap, gp, mode in ours:
            lines.append(f"  ours {LABEL[mode]}: capacity {_cap(fixed[mode], 'tight')} req/s, "
                         f"max goodput {gp:.2f} req/s")
        best = max(c for c, _, _ in ours)
        who = " = ".join(LABEL[m] for c, _, m in ours if c == best)
        lines.append(f"  our best: {who} {best:g} req/s (target >= 64: {'met' if best >= 64 else 'missed'})")
    return lines


def report(data: dict) -> str:
    lines = []
    for sc, meta in data.get("scenarios", {}).items():
        if not any(p["scenario"] == sc for p in data["points"]):
            continue
        lines += ["", f"== {sc}: {meta.get('description', '')}"] + table(data, sc) + checks(data, sc)
    lines += [""] + aic_lines(data)
    if data.get("errors"):
        lines += ["", "errors:"] + [f"  {e}" for e in data["errors"]]
    if data.get("skipped"):
        lines += ["", "skipped: " + ", ".join(
            (f"{s['mode']} (whole setup)" if s["scenario"] == "*" else f"{s['mode']}/{s['scenario']}@{s['rate']:g}")
            + f" ({s['why']})" for s in data["skipped"])]
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(report(json.load(f)))
