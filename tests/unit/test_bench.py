"""disagg bench: metrics by hand, workloads, and the load generator against a scripted server.

The scripted server (aiohttp, same event loop) reads the first prompt token as an instruction:
    5: HTTP 500     6: an error object in the stream     7: first token, then never finishes
    8: never sends a token                                 else: max_tokens one-token chunks + usage
No test asserts a timing; every expectation is a count, a value computed by hand, or a label.
"""
from __future__ import annotations

import asyncio
import gzip
import io
import json
import math

import pytest

from disagg.bench import loadgen, summary, workload
from disagg.bench.loadgen import BenchRequest, RequestResult, Target
from disagg.traces import TraceRequest


# ---------------------------------------------------------------------- metrics by hand
def test_percentile_interpolates_linearly_like_numpy():
    xs = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5]
    assert summary.percentile(xs, 50) == pytest.approx(5.5)
    assert summary.percentile(xs, 90) == pytest.approx(9.1)      # rank 8.1 -> 9 + 0.1 * (10 - 9)
    assert summary.percentile(xs, 99) == pytest.approx(9.91)
    assert summary.percentile(xs, 0) == 1 and summary.percentile(xs, 100) == 10
    assert summary.percentile([], 90) is None and summary.percentile([4.0], 99) == 4.0
    assert summary.percentile([1.0, 2.0, math.inf], 50) == 2.0   # failures counted as infinitely late
    assert math.isinf(summary.percentile([1.0, 2.0, math.inf], 90))
    with pytest.raises(ValueError):
        summary.percentile(xs, 101)


def test_parse_slos():
    assert summary.parse_slos(["ttft:250", "TPOT:25", "e2el:1e4"]) == {"ttft": 250.0, "tpot": 25.0, "e2el": 1e4}
    assert summary.parse_slos(None) == {}
    for bad in (["ttft"], ["itl:5"], ["ttft:fast"], ["tpot:0"], ["tpot:-3"]):
        with pytest.raises(ValueError):
            summary.parse_slos(bad)


def _r(ttft, e2e, n, itl=None, ok=True, sent=0.0, plen=100, error=None):
    return RequestResult(ok=ok, prompt_len=plen, output_len=n, ttft=ttft, itl=list(itl or []), e2e=e2e,
                         sent_s=sent, error=error)


def fixed_results():
    # TTFT 0.1 / 0.2 / 0.3 / 0.4 s; TPOT (e2e - ttft) / (n - 1) = 0.01 / 0.02 / 0.03 / 0 (one token)
    return [_r(0.1, 0.1 + 10 * 0.01, 11, [0.01] * 10, sent=0.0),
            _r(0.2, 0.2 + 5 * 0.02, 6, [0.02] * 5, sent=0.5),
            _r(0.3, 0.3 + 2 * 0.03, 3, [0.03, 0.03], sent=1.0),
            _r(0.4, 0.4, 1, [], sent=1.0),
            _r(None, 0.05, 0, ok=False, sent=2.0, error="HTTP 500: boom")]


def test_summarize_by_hand():
    d = summary.summarize(fixed_results(), duration_s=4.0, slos={"ttft": 250, "tpot": 25})
    assert (d["completed"], d["failed"], d["num_requests"]) == (4, 1, 5)
    assert d["total_output_tokens"] == 11 + 6 + 3 + 1 and d["total_input_tokens"] == 400
    assert d["request_throughput"] == pytest.approx(1.0) and d["output_throughput"] == pytest.approx(21 / 4)
    assert d["mean_ttft_ms"] == pytest.approx(250) and d["median_ttft_ms"] == pytest.approx(250)
    assert d["p90_ttft_ms"] == pytest.approx(370) and d["p99_ttft_ms"] == pytest.approx(397)
    # TPOT over requests with more than one token: 10, 20, 30 ms
    assert d["mean_tpot_ms"] == pytest.approx(20) and d["p90_tpot_ms"] == pytest.approx(28)
    # ITL pooled: ten of 10 ms, five of 20 ms, two of 30 ms
    assert d["mean_itl_ms"] == pytest.approx((100 + 100 + 60) / 17) and d["median_itl_ms"] == pytest.approx(10)
    assert d["p99_itl_ms"] == pytest.approx(30)
    assert d["mean_e2el_ms"] == pytest.approx((200 + 300 + 360 + 400) / 4)
    # goodput: TTFT <= 250 and TPOT <= 25 -> requests 1 and 2 (request 4's TPOT is 0 but TTFT 400 ms)
    assert d["request_goodput"] == pytest.approx(2 / 4.0) and d["slo_attainment"] == pytest.approx(2 / 5)
    assert d["error_counts"] == {"HTTP 500: boom": 1}
    assert d["ttfts"][4] is None and d["tpots"][3] == 0.0 and len(d["itls"][0]) == 10


def test_goodput_with_every_slo_key():
    res = fixed_results()
    assert summary.slo_stats(res, {"e2el": 301}, 2.0)["good_requests"] == 2     # 200 and 300 ms
    assert summary.slo_stats(res, {"ttft": 1000}, 2.0)["request_goodput"] == pytest.approx(2.0)
    assert summary.slo_stats([], {"ttft": 1}, 1.0)["slo_attainment"] == 0.0


def test_max_concurrent_from_send_and_end_times():
    res = [_r(0.1, 1.0, 2, sent=0.0), _r(0.1, 1.0, 2, sent=0.5), _r(0.1, 1.0, 2, sent=1.0),
           _r(0.1, 0.2, 2, sent=3.0)]
    assert summary.max_concurrent(res) == 2          # the first ends exactly when the third starts


def test_format_summary_has_vllm_sections():
    d = summary.summarize(fixed_results(), 4.0, {"ttft": 250})
    d["request_rate"], d["max_concurrency"] = 2.0, 8
    text = summary.format_summary(d)
    for line in ("Serving Benchmark Result", "Successful requests:                     4",
                 "Failed requests:                         1", "Request goodput (req/s):                 0.50",
                 "Time to First Token", "P90 TTFT (ms):                           370.00", "Inter-token Latency",
                 "Median TPOT (ms):", "P99 E2EL (ms):", "Maximum request concurrency:             8",
                 "HTTP 500: boom"):
        assert line in text, line
    empty = summary.summarize([], 1.0)
    assert "Mean TTFT (ms):                          n/a" in summary.format_summary(empty)


# ---------------------------------------------------------------------- workloads
def test_fixed_workload_exact_lengths_and_ids_in_range():
    reqs = workload.fixed_workload(50, 10.0, 17, 9, vocab_size=40, seed=3)
    assert [len(q.prompt) for q in reqs] == [17] * 50 and {q.output_len for q in reqs} == {9}
    assert all(3 <= t < 40 for q in reqs for t in q.prompt) and all(q.prompt_len == 17 for q in reqs)
    times = [q.arrival_s for q in reqs]
    assert times == sorted(times) and times[0] == 0.0
    assert workload.fixed_workload(50, 10.0, 17, 9, vocab_size=40, seed=3) == reqs          # reproducible
    assert [q.arrival_s for q in workload.fixed_workload(4, math.inf, 2, 2)] == [0.0] * 4
    even = workload.fixed_workload(5, 2.0, 2, 2, burstiness=math.inf)
    assert [q.arrival_s for q in even] == pytest.approx([0, 0.5, 1.0, 1.5, 2.0])


def test_trace_workload_keeps_lengths_and_rescales():
    tr = [TraceRequest(10.0 + 2 * i, 5 + i, 3 + i) for i in range(5)]        # 0.5 req/s
    reqs = workload.trace_workload(tr, rate=2.0, vocab_size=100)
    assert [len(q.prompt) for q in reqs] == [5, 6, 7, 8, 9] and [q.output_len for q in reqs] == [3, 4, 5, 6, 7]
    assert [q.arrival_s for q in reqs] == pytest.approx([0, 0.5, 1.0, 1.5, 2.0])
    own = workload.trace_workload(tr, vocab_size=100)
    assert [q.arrival_s for q in own] == pytest.approx([0, 2, 4, 6, 8])
    capped = workload.trace_workload(tr, max_model_len=8, vocab_size=100)
    assert all(len(q.prompt) + q.output_len <= 8 for q in capped)
    redrawn = workload.trace_workload(tr, rate=math.inf, burstiness=1.0, vocab_size=100)
    assert [q.arrival_s for q in redrawn] == [0.0] * 5


def test_load_prompts_reads_the_usual_layouts(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p1"}\n"p2"\n{"turns": ["p3", "x"]}\n'
                                      '{"messages": [{"role": "system", "content": "s"}, {"role": "user", '
                                      '"content": "p4"}]}\n{"conversations": [{"from": "human", "value": "p5"}]}\n'
                                      '{"other": 1}\n\n')
    assert workload.load_prompts(str(tmp_path / "a.jsonl")) == ["p1", "p2", "p3", "p4", "p5"]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: hello there\n\nAssistant: hi"}) + "\n")
    assert workload.load_prompts(str(tmp_path / "b.jsonl.gz")) == ["hello there"]
    (tmp_path / "c.csv").write_text("id,prompt\n1,alpha\n2,beta\n")
    assert workload.load_prompts(str(tmp_path / "c.csv")) == ["alpha", "beta"]
    (tmp_path / "d.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(ValueError):
        workload.load_prompts(str(tmp_path / "d.jsonl"))
    reqs = workload.dataset_workload(["a", "b"], 5, output_len=7, rate=math.inf)
    assert sorted(q.prompt for q in reqs).count("a") in (2, 3) and {q.output_len for q in reqs} == {7}


# ---------------------------------------------------------------------- the load generator
class Scripted:
    """A scripted OpenAI-ish server in the test's own event loop (see the module docstring)."""

    def __init__(self):
        self.in_flight = self.peak = self.served = 0
        self.bodies: list[dict] = []

    async def completions(self, request):
        from aiohttp import web
        body = await request.json()
        self.bodies.append(body)
        cmd = body["prompt"][0] if isinstance(body["prompt"], list) else 0
        if cmd == 5:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(obj):
                await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            if cmd == 8:
                await asyncio.sleep(3600)
            if cmd == 6:
                await send({"error": {"message": "worker died"}})
                return resp
            n = body["max_tokens"]
            for i in range(n):
                await asyncio.sleep(0.002)
                await send({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]})
                if cmd == 7:
                    await asyncio.sleep(3600)
            await send({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
            await send({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}})
            await resp.write(b"data: [DONE]\n\n")
            self.served += 1
            return resp
        finally:
            self.in_flight -= 1

    async def serve(self, fn):
        """Run fn(url) with the server up on a free port."""
        from aiohttp import web
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)

        async def models(request):
            return web.json_response({"data": [{"id": "scripted"}]})
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await fn(f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()


def _reqs(cmds, out=4, gap=0.0):
    return [BenchRequest([c, 11, 12], out, i * gap, 3) for i, c in enumerate(cmds)]


def test_counts_usage_and_chunk_timings():
    srv = Scripted()

    async def go(url):
        assert await loadgen.fetch_model(url) == "scripted"
        return await loadgen.run(_reqs([100] * 6, out=4), Target(url, "scripted"))
    out = asyncio.run(srv.serve(go))
    assert len(out.results) == 6 and out.not_sent == 0 and not out.interrupted and not out.hit_deadline
    for r in out.results:
        assert r.ok and r.output_len == 4 and r.prompt_len == 3 and len(r.itl) == 3 and r.ttft <= r.e2e
    b = srv.bodies[0]
    assert b["stream"] and b["ignore_eos"] and b["max_tokens"] == 4 and b["prompt"] == [100, 11, 12]
    assert b["stream_options"] == {"include_usage": True} and b["model"] == "scripted"


def test_errors_are_counted_never_raised():
    srv = Scripted()

    async def go(url):
        return await loadgen.run(_reqs([5, 6, 100, 5]), Target(url))
    out = asyncio.run(srv.serve(go))
    assert [r.ok for r in out.results] == [False, False, True, False]
    assert out.results[0].error == "HTTP 500: boom" and out.results[1].error == "in-stream error: worker died"
    d = summary.summarize(out.results, out.duration_s)
    assert (d["completed"], d["failed"]) == (1, 3)
    # nothing listening: a connection error per request, still no exception
    refused = asyncio.run(loadgen.run(_reqs([100, 100]), Target("http://127.0.0.1:9")))
    assert [r.ok for r in refused.results] == [False, False] and all(r.error for r in refused.results)


def test_max_concurrency_is_honoured():
    srv = Scripted()

    async def go(url):
        return await loadgen.run(_reqs([100] * 10, out=5), Target(url), max_concurrency=2)
    out = asyncio.run(srv.serve(go))
    assert all(r.ok for r in out.results) and srv.served == 10
    assert 1 <= srv.peak <= 2 and summary.max_concurrent(out.results) <= 2


def test_deadline_and_ttft_timeout_fail_what_is_unfinished():
    srv = Scripted()

    async def go(url):
        hung = await loadgen.run(_reqs([100, 7]), Target(url), deadline_s=2.0)
        silent = await loadgen.run(_reqs([100, 8]), Target(url), ttft_timeout_s=1.5)
        return hung, silent
    hung, silent = asyncio.run(srv.serve(go))
    assert hung.hit_deadline and [r.ok for r in hung.results] == [True, False]
    assert hung.results[1].error == "unfinished at the deadline" and hung.results[1].ttft is not None
    assert not silent.hit_deadline and [r.ok for r in silent.results] == [True, False]
    assert silent.results[1].error == "no first token within 1.5s (abandoned)"


def test_stop_leaves_unsent_requests_out():
    srv = Scripted()

    async def go(url):
        stop = asyncio.Event()

        async def press_ctrl_c():
            while srv.served < 1:
                await asyncio.sleep(0.01)
            stop.set()
        asyncio.get_running_loop().create_task(press_ctrl_c())
        return await loadgen.run(_reqs([100, 100, 100], gap=3600.0), Target(url), stop=stop)
    out = asyncio.run(srv.serve(go))
    assert out.interrupted and out.not_sent == 2 and len(out.results) == 1 and out.results[0].ok


def test_progress_lines_without_a_terminal():
    srv = Scripted()
    buf = io.StringIO()

    async def go(url):
        return await loadgen.run(_reqs([100] * 20 + [5]), Target(url), progress=loadgen.Progress(21, buf, "t"))
    asyncio.run(srv.serve(go))
    lines = buf.getvalue().splitlines()
    assert lines[-1].startswith("t [########################] 21/21 done, 1 failed, 0 in flight")
    assert 2 <= len(lines) <= 12 and all(not line.startswith("\r") for line in lines)


def test_chat_target_body_and_url():
    t = Target("http://h:1/v1/", "m", endpoint="chat", api_key="k", ignore_eos=False)
    assert t.url == "http://h:1/v1/chat/completions" and t.headers() == {"Authorization": "Bearer k"}
    b = t.body(BenchRequest("hi", 7))
    assert b["messages"] == [{"role": "user", "content": "hi"}] and b["max_completion_tokens"] == 7
    assert "ignore_eos" not in b
    with pytest.raises(ValueError):
        t.body(BenchRequest([1, 2], 7))
    assert Target("http://h:1").url == "http://h:1/v1/completions"
