"""disagg/deploy/hops.py: a stream's timestamps become per-phase samples (and observations)."""
from __future__ import annotations

import pytest

from disagg.deploy.hops import PHASES, HopTimes


def test_phases_from_timestamps_once_each():
    h, seen = HopTimes(), []
    h.observe = lambda phase, s: seen.append((phase, s))
    t = {"arrive": 1.0, "dispatched": 1.004, "sent": 1.006, "first": 1.036, "second": 1.048}
    h.finish(t)
    h.finish(t)                                   # a stream ends once
    assert [p for p, _ in seen] == list(PHASES)
    assert [s for _, s in seen] == pytest.approx([0.004, 0.002, 0.030, 0.012])
    assert h.summary()["prefill_first_token"] == {"count": 1, "p50_s": pytest.approx(0.030),
                                                  "p90_s": pytest.approx(0.030)}


def test_a_stream_that_ended_at_its_first_token_has_no_second_phase():
    h = HopTimes()
    h.finish({"arrive": 0.0, "dispatched": 0.001, "sent": 0.002, "first": 0.010})
    s = h.summary()
    assert set(s) == {"queue_reserve", "submit", "prefill_first_token"}


def test_mark_keeps_the_first_time():
    t: dict = {}
    HopTimes.mark(t, "first")
    first = t["first"]
    HopTimes.mark(t, "first")
    assert t["first"] == first
