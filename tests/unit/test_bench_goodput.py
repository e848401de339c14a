"""benchmarks/bench_goodput.py without servers: workloads per scenario, the per-point record, the
resumable JSON, the sweep plan, the report's checks (figures made up here, checked by hand), plots."""
from __future__ import annotations

import json
import os
import sys

import pytest

from disagg.bench.loadgen import RequestResult, RunOutcome

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_goodput as bg  # noqa: E402
import goodput_report as gr  # noqa: E402


@pytest.fixture
def args(tmp_path):
    return bg.parse_args(["--shape", "tiny", "--out", str(tmp_path / "g.json")])


def test_defaults_and_plan(args):
    assert args.rates == {"fixed": [2.0, 4.0], "conv": [2.0], "code": [2.0]} and args.fixed_lens == (48, 8)
    assert bg.plan("hf", args) == [("fixed", 1.0, 3)]
    assert bg.plan("colocated", args) == [("fixed", 2.0, 8), ("fixed", 4.0, 16), ("conv", 2.0, 8), ("code", 2.0, 8)]
    full = bg.parse_args(["--out", "x.json"])
    assert full.fixed_lens == (1020, 129) and full.rates["fixed"] == [16, 32, 48, 64] and full.vocab == 128256
    assert bg.server_cmd("disagg-auto", "/ck", 1234, full)[3:] == [
        "serve", "/ck", "--load-format", "dummy", "--port", "1234", "--max-model-len", "8192",
        "--prefill", "1", "--decode", "1", "--local-prefill", "auto"]
    with pytest.raises(SystemExit):
        bg.parse_args(["--modes", "colocated,vllm"])


def test_scenario_workloads(args):
    fixed = bg.build_requests("fixed", 2.0, 8, args)
    assert len(fixed) == 8 and {len(q.prompt) for q in fixed} == {48} and {q.output_len for q in fixed} == {8}
    if not os.path.isdir(args.traces_dir):
        pytest.skip("Azure traces not present")
    for sc in ("conv", "code"):
        reqs = bg.build_requests(sc, 2.0, 8, args)
        assert len(reqs) == 8 and all(len(q.prompt) + q.output_len <= args.max_model_len for q in reqs)
        assert all(0 <= t < args.vocab for q in reqs for t in q.prompt)
        assert reqs[-1].arrival_s == pytest.approx(3.5)       # 8 rows rescaled to 2 req/s: 7 gaps of 0.5 s


def _res(ttft, tpot, n=11, ok=True):
    e2e = ttft + tpot * (n - 1)
    return RequestResult(ok=ok, prompt_len=10, output_len=n if ok else 0, ttft=ttft if ok else None,
                         itl=[tpot] * (n - 1) if ok else [], e2e=e2e, sent_s=0.0, error=None if ok else "x")


def _point(mode, rate, ttft, tpot, fail=0, n=10, scenario="fixed", itl=None):
    res = [_res(ttft, tpot) for _ in range(n - fail)] + [_res(0, 0, ok=False) for _ in range(fail)]
    if itl is not None:
        for r in res:
            r.itl = [itl] * len(r.itl)
    rec = bg.point_record(mode, scenario, rate, [None] * n, RunOutcome(res, 5.0), 6.0)
    return rec


def test_point_record_slos_and_failed_requests_as_late():
    p = _point("colocated", 4.0, 0.1, 0.02)
    t, lo = p["slo"]["tight"], p["slo"]["loose"]
    assert t["p90_met"] and t["slo_attainment"] == 1.0 and t["goodput"] == pytest.approx(4.0)
    assert t["p90_ttft_ms"] == pytest.approx(100) and t["p90_tpot_ms"] == pytest.approx(20)
    assert p["ttft_ms"][0] == pytest.approx(100) and p["window_s"] == pytest.approx(2.5)
    slow = _point("disagg", 4.0, 0.5, 0.05)                # tight missed, loose met
    assert not slow["slo"]["tight"]["p90_met"] and slow["slo"]["loose"]["p90_met"]
    assert slow["slo"]["tight"]["goodput"] == 0.0 and slow["slo"]["loose"]["goodput"] == pytest.approx(4.0)
    failing = _point("disagg", 4.0, 0.1, 0.01, fail=2)      # 2 of 10 failed: P90 is a failure
    assert failing["slo"]["loose"]["p90_ttft_ms"] is None and not failing["slo"]["loose"]["p90_met"]
    assert failing["slo"]["loose"]["goodput"] == pytest.approx(0.8 * 4.0)
    assert failing["ttft_ms"][-1] is None and failing["summary"]["failed"] == 2


def test_store_resumes_and_copies_to_out(tmp_path, monkeypatch, args):
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    st = bg.Store(args.out, fresh=True, header={"shape": "tiny"})
    st.add("points", _point("colocated", 2.0, 0.1, 0.02))
    st.add("skipped", {"mode": "disagg", "scenario": "fixed", "rate": 4.0, "why": "time budget"})
    assert json.loads((out / "g.json").read_text())["points"][0]["mode"] == "colocated"
    again = bg.Store(args.out, fresh=False, header={"shape": "tiny"})
    assert again.has("colocated", "fixed", 2.0) and not again.has("colocated", "fixed", 4.0)
    assert again.data["skipped"] == []                      # re-decided by the new run
    assert bg.Store(args.out, fresh=True, header={}).data["points"] == []
    sat = bg.Store(str(tmp_path / "s.json"), fresh=True, header={})
    sat.add("points", _point("disagg", 2.0, 0.1, 0.01, fail=6))
    assert bg.saturated(sat, "disagg", "fixed", 4.0) and not bg.saturated(sat, "disagg", "fixed", 2.0)
    assert not bg.saturated(sat, "colocated", "fixed", 4.0) and not bg.saturated(sat, "disagg", "conv", 4.0)


def made_up_run() -> dict:
    pts = [_point("hf", 0.3, 0.2, 0.02, n=4), _point("hf", 0.6, 3.0, 0.02, n=4)]
    # colocated: P99 ITL 30 ms; disagg 10 ms (3x lower); auto tracks the better one
    pts += [_point("colocated", 16, 0.1, 0.02, itl=0.03), _point("colocated", 32, 0.2, 0.024, itl=0.03),
            _point("colocated", 48, 0.4, 0.03, itl=0.05)]
    pts += [_point("disagg", 16, 0.05, 0.008, itl=0.01), _point("disagg", 32, 0.3, 0.009, itl=0.01)]
    pts += [_point("disagg-auto", 16, 0.06, 0.009, itl=0.012), _point("disagg-auto", 32, 0.2, 0.02, itl=0.02)]
    aic = {"version": "0.12.0", "backend": "vllm", "model": "meta-llama/Meta-Llama-3.1-8B", "total_gpus": 2,
           "system": "h200_sxm", "isl": 1020, "osl": 129, "slo_ms": {"ttft": 250, "tpot": 25},
           "modes": {"agg": {"request_rate_total": 63.65, "tokens_per_s_per_gpu": 4073.9, "top": [{"version": "0.24.0"}]},
                     "disagg": {"request_rate_total": 38.76, "tokens_per_s_per_gpu": 2500.1}}}
    return {"points": pts, "skipped": [{"mode": "disagg", "scenario": "fixed", "rate": 48.0, "why": "time budget"}],
            "errors": [], "shape": "llama3-8b", "gpus": ["NVIDIA H200"] * 2, "slos_ms": bg.SLOS,
            "scenarios": {"fixed": {"description": "1020 / 129"}, "conv": {}, "code": {}}, "aiconfigurator": aic}


def test_report_checks_by_hand():
    data = made_up_run()
    assert gr.capacity(gr.points(data, "fixed", "colocated"), "tight") == (32, True)
    assert gr.capacity(gr.points(data, "fixed", "disagg"), "tight") == (16, True)
    assert gr.capacity(gr.points(data, "fixed", "disagg-auto"), "tight") == (32, False)
    text = gr.report(data)
    assert "capacity at the tight SLO (req/s, P90 met): colocated x2 32, disagg 1P+1D never 16, " \
           "disagg 1P+1D auto >= 32" in text
    assert "P99 ITL colocated / disagg at equal load: 16/s 3.00x, 32/s 3.00x  (target >= 2x: met)" in text
    # tight goodput: colocated max 32 (all within at 32/s), disagg 16 -> 0.50
    assert "tight goodput disagg / colocated: 0.50 (target >= 0.90: missed)" in text
    # auto vs the better of the two: every point equal -> 1.00
    assert "auto / better of (never, colocated), worst point: 1.00" in text and "(target >= 0.95: met)" in text
    # HF: 0.3 req/s served within both SLOs; colocated 32 -> 107x; disagg 16 -> 53x
    assert "vs HF baseline at the tight SLO (max goodput ratio, target >= 10x): colocated x2 107x, " \
           "disagg 1P+1D never 53x" in text
    assert "predicted colocated replicas: 63.65 req/s" in text and "predicted disaggregated: 38.76 req/s" in text
    assert "our best: colocated x2 = disagg 1P+1D auto 32 req/s (target >= 64: missed)" in text
    assert "skipped: disagg/fixed@48 (time budget)" in text
    assert "== conv" not in text                             # no points, no section


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    import plot_goodput
    paths = plot_goodput.plot_all(made_up_run(), str(tmp_path), "g")
    assert [os.path.basename(p) for p in paths] == ["g_goodput.png", "g_cdf_fixed.png"]
    assert all(os.path.getsize(p) > 10_000 for p in paths)


def test_every_point_has_its_own_prompts(args):
    a, b = bg.build_requests("fixed", 2.0, 4, args), bg.build_requests("fixed", 4.0, 4, args)
    assert a[0].prompt != b[0].prompt and a == bg.build_requests("fixed", 2.0, 4, args)
    assert len({bg.point_seed(sc, r, 0) for sc in ("fixed", "conv", "code") for r in (0.3, 2, 4, 16, 64)}) == 15
