"""Trace loading, synthetic arrivals and rate rescaling (disagg/traces.py)."""
from __future__ import annotations

import math
import os

import pytest

from disagg.traces import TraceRequest, cap_lengths, load_csv, mean_rate, rescale, synthetic, window

AZURE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "traces", "azure2023",
                     "AzureLLMInferenceTrace_conv.csv")


def _write(tmp_path, rows):
    p = tmp_path / "t.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return str(p)


def test_load_csv_parses_azure_timestamps_relative_to_the_first(tmp_path):
    p = _write(tmp_path, ["2023-11-16 18:15:46.6805900,374,44", "2023-11-16 18:15:50.9951690,396,109",
                          "2023-11-16 18:15:51.0000000,0,0"])
    t = load_csv(p)
    assert [q.prompt_tokens for q in t] == [374, 396, 1] and [q.output_tokens for q in t] == [44, 109, 1]
    assert t[0].arrival_s == 0 and t[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert load_csv(p, start=1, limit=1)[0] == TraceRequest(0.0, 396, 109)


def test_load_csv_rejects_other_files(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_csv(str(p))


@pytest.mark.skipif(not os.path.exists(AZURE), reason="shared data not present")
def test_the_real_conversation_trace():
    t = load_csv(AZURE)
    assert len(t) == 19366 and 5 < mean_rate(t) < 6


def test_synthetic_rates_and_lengths_are_seeded():
    a = synthetic(4000, 10.0, prompt=("uniform", 10, 20), output=("lognormal", 100, 0.5), seed=3)
    assert a == synthetic(4000, 10.0, prompt=("uniform", 10, 20), output=("lognormal", 100, 0.5), seed=3)
    assert mean_rate(a) == pytest.approx(10.0, rel=0.05)
    assert all(10 <= q.prompt_tokens <= 20 for q in a)
    even = synthetic(5, 2.0, burstiness=math.inf)
    assert [q.arrival_s for q in even] == [0, 0.5, 1.0, 1.5, 2.0]
    gaps = lambda t: [b.arrival_s - a.arrival_s for a, b in zip(t, t[1:])]          # noqa: E731
    bursty = synthetic(4000, 10.0, burstiness=0.25, seed=1)
    cv2 = lambda g: (sum(x * x for x in g) / len(g) - (sum(g) / len(g)) ** 2) / (sum(g) / len(g)) ** 2  # noqa: E731
    assert cv2(gaps(bursty)) == pytest.approx(4.0, rel=0.25) and cv2(gaps(a)) == pytest.approx(1.0, rel=0.15)


def test_rescale_window_and_cap():
    t = synthetic(101, 5.0, seed=0)
    r = rescale(t, 20.0)
    assert mean_rate(r) == pytest.approx(20.0) and [q.prompt_tokens for q in r] == [q.prompt_tokens for q in t]
    assert len(window(r, 1.0)) < len(window(t, 100.0)) == 101
    c = cap_lengths([TraceRequest(0, 5000, 900), TraceRequest(1, 100, 5000)], 2048)
    assert c == [TraceRequest(0, 2047, 1), TraceRequest(1, 100, 1948)]
