"""The simulator's predictions for the 4-GPU measurements (issue 9) against what was measured.

    python benchmarks/sim_4gpu.py          # CPU, ~1 min: reads the two result files below

For every load point of
  results/goodput_llama3-8b_4xh200_conv.json  (4 colocated replicas and 2 prefill + 2 decode,
                                               Azure conversation trace from row 0, rate x 8 s)
  results/goodput_llama3-8b_4xh200_conv_disagg_fix.json   (2P+2D again, after the dispatcher fix)
  results/tp_serve_h200x4.json               (1P+1D with prefill / decode TP 1 or 2, 1,020 / 129
                                               tokens, Poisson, rate x 4 s)
it runs `disagg simulate` on the same requests and configuration with the shipped H200 profile
(disagg/sim/profiles/h200_llama3_8b.json; TP > 1 scales it with the TP model of
disagg/sim/perf_model.py) and prints predicted against measured P50 / P90 TTFT and TPOT and,
for the goodput points, attainment at the tight and loose SLOs. Writes
results/sim_4gpu_h200.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = os.path.join(ROOT, "benchmarks", "results")
TRACE = os.path.join(ROOT, ".devdata", "traces", "azure2023", "AzureLLMInferenceTrace_conv.csv")
if not os.path.exists(TRACE):
    TRACE = os.path.join(ROOT, "..", "shared", "data", "traces", "azure2023", "AzureLLMInferenceTrace_conv.csv")
SLOS = {"tight": "ttft=250,tpot=25", "loose": "ttft=1000,tpot=100"}


def simulate(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "disagg.cli", "simulate", "--model", "llama3-8b", "--gpu", "h200",
           "--json", "--no-progress", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["summary"]


def row(name, measured: dict, sim: dict) -> dict:
    r = {"setup": name, "measured": measured, "simulated": sim}
    cells = []
    for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"):
        m, s = measured.get(k), sim.get(k)
        cells.append(f"{'-' if m is None else f'{m:.0f}':>6} {'-' if s is None else f'{s:.0f}':>6}"
                     + (f" {s / m - 1:+6.0%}" if m and s else "       "))
    print(f"{name:28s} " + " | ".join(cells), flush=True)
    return r


def main() -> None:
    out = {"profile": "disagg/sim/profiles/h200_llama3_8b.json", "rows": []}
    print(f"{'':28s} {'TTFT p50 meas  sim  err':>21} | {'TTFT p90':>21} | {'TPOT p50':>21} | {'TPOT p90':>21}  (ms)")
    points = json.load(open(os.path.join(RES, "goodput_llama3-8b_4xh200_conv.json")))["points"]
    fixed = os.path.join(RES, "goodput_llama3-8b_4xh200_conv_disagg_fix.json")   # 2P+2D re-run after the
    if os.path.exists(fixed):                                                     # dispatcher's wake-up fix
        points += [dict(p, mode="disagg-fix") for p in json.load(open(fixed))["points"]]
    for p in points:
        mode, rate, window = p["mode"], p["rate"], p["window_s"]
        shape = ["--prefill", "0", "--decode", "4"] if mode == "colocated" else \
            ["--prefill", "2", "--decode", "2", "--local-prefill", "never"]
        base = ["--trace", TRACE, "--rate", str(rate), "--duration", str(window), "--max-model-len", "8192", *shape]
        sims = {k: simulate(base + ["--slo", v]) for k, v in SLOS.items()}
        s, m = sims["tight"], p["summary"]
        measured = {"ttft_p50": m["median_ttft_ms"], "ttft_p90": m["p90_ttft_ms"], "tpot_p50": m["median_tpot_ms"],
                    "tpot_p90": m["p90_tpot_ms"], "attain_tight": p["slo"]["tight"]["slo_attainment"],
                    "attain_loose": p["slo"]["loose"]["slo_attainment"]}
        simd = {"ttft_p50": s["ttft_s"]["p50"] * 1e3, "ttft_p90": s["ttft_s"]["p90"] * 1e3,
                "tpot_p50": s["tpot_s"]["p50"] * 1e3, "tpot_p90": s["tpot_s"]["p90"] * 1e3,
                "attain_tight": sims["tight"]["slo_attainment"], "attain_loose": sims["loose"]["slo_attainment"]}
        name = {"colocated": "4 colocated", "disagg": "2P+2D (before fix)", "disagg-fix": "2P+2D"}[mode]
        name = f"{name} conv {rate:g}/s"
        r = row(name, measured, simd)
        print(f"{'':28s} attainment tight {measured['attain_tight']:.0%} (sim {simd['attain_tight']:.0%}), "
              f"loose {measured['attain_loose']:.0%} (sim {simd['attain_loose']:.0%})")
        out["rows"].append(r)
    ts = json.load(open(os.path.join(RES, "tp_serve_h200x4.json")))
    inp, outp = ts["input_len"], ts["output_len"]
    for st in ts["setups"]:
        for p in st.get("points", []):
            rate, n = p["rate"], p["num_requests"]
            args = ["--trace", "synthetic", "--input-len", str(inp), "--output-len", str(outp), "--rate", str(rate),
                    "--num-requests", str(n), "--prefill", "1", "--decode", "1", "--prefill-tp", str(st["prefill_tp"]),
                    "--decode-tp", str(st["decode_tp"]), "--local-prefill", "never", "--max-model-len", "2048",
                    "--slo", SLOS["tight"]]
            s = simulate(args)
            m = p["summary"]
            measured = {"ttft_p50": m["median_ttft_ms"], "ttft_p90": m["p90_ttft_ms"], "tpot_p50": m["median_tpot_ms"],
                        "tpot_p90": m["p90_tpot_ms"]}
            simd = {"ttft_p50": s["ttft_s"]["p50"] * 1e3, "ttft_p90": s["ttft_s"]["p90"] * 1e3,
                    "tpot_p50": s["tpot_s"]["p50"] * 1e3, "tpot_p90": s["tpot_s"]["p90"] * 1e3}
            out["rows"].append(row(f"{st['setup']} (TP) fixed {rate:g}/s", measured, simd))
    path = os.path.join(RES, "sim_4gpu_h200.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
