"""The front door under bad input, streaming edge cases, disconnects and fuzzing.

Real `Server` on a loopback port. Where the model matters (streaming text, stop strings,
logprobs, KV freed on disconnect) the engine is the real tiny one; where it does not
(validation, error shapes) it is router.fake_engine.FakeEngine.
"""
from __future__ import annotations

import asyncio
import io
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import make_engine, write_tiny_tokenizer
from serve_thread import MODEL, Serve, free_port

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "t5 t6 t7"}]


# ---------------------------------------------------------------------- harness
def real_serve(model_dir: str, **kw) -> Serve:
    from disagg.engine.async_engine import AsyncEngine
    eng = make_engine(model_dir, **kw)
    return Serve(lambda: AsyncEngine(eng), eng.tokenizer, eng.max_model_len, engine=eng)


def fake_serve(tok_dir: str, **kw) -> Serve:
    from disagg.model.tokenizer import Tokenizer
    from router.fake_engine import FakeEngine
    return Serve(lambda: FakeEngine(**kw), Tokenizer(tok_dir), 512)


def request(srv: Serve, path: str, body=None, method: str | None = None, timeout: float = 60, headers=None):
    """(status, headers, raw body bytes). `body`: bytes as they are, anything else as JSON."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(srv.url + path, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(srv: Serve, path: str, body, **kw):
    status, _, raw = request(srv, path, body, **kw)
    return status, json.loads(raw)


def assert_error(status: int, body, want_status: int, param="any", code="any"):
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if want_status != 429:     # 429's type names the limit
        assert err["type"] == ("invalid_request_error" if want_status < 500 else "server_error")
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    if param != "any":
        assert err["param"] == param, err
    if code != "any":
        assert err["code"] == code, err


def sse(raw: bytes) -> list:
    """Parse a whole SSE body strictly: every event is one `data: ` line followed by a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[6:]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream(srv: Serve, path: str, body: dict):
    status, headers, raw = request(srv, path, {**body, "stream": True})
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    events = sse(raw)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def chat_text(events: list, index: int = 0) -> str:
    return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"] if c["index"] == index)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(str(d))
    return str(d)


@pytest.fixture(scope="module")
def fake(tok_dir):
    with fake_serve(tok_dir) as s:
        yield s


@pytest.fixture(scope="module")
def real(tiny_ckpts):
    srv = real_serve(tiny_ckpts("llama_gqa"), num_blocks=256, block_size=4, budget=64)
    eng = srv.engine
    srv.aborted = []                      # the engine's abort outputs: (request id, finish reason, tokens)
    orig_abort = eng.abort

    def abort(rid):                       # runs on the engine thread
        out = orig_abort(rid)
        if out is not None:
            srv.aborted.append((rid, out.finish_reason.value, out.num_output_tokens))
        return out
    eng.abort = abort
    with srv as s:
        yield s


@pytest.fixture(params=["fake", "real"])
def any_server(request):
    return request.getfixturevalue(request.param)


def assert_alive(srv: Serve):
    status, body = post_json(srv, "/health", None)
    assert (status, body) == (200, {"status": "ok"})
    status, body = post_json(srv, CHAT, {"model": MODEL, "messages": MSG, "max_tokens": 3, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------------- bad input
def _chat(**kw):
    return {"model": MODEL, "messages": MSG, "max_tokens": 4, **kw}


def _comp(**kw):
    return {"model": MODEL, "prompt": "t5 t6", "max_tokens": 4, **kw}


BAD = [
    # (id, route, body, status, param)
    ("malformed-json", CHAT, b"{not json", 400, None),
    ("truncated-json", CHAT, b'{"messages": [', 400, None),
    ("empty-body", CHAT, b"", 400, None),
    ("invalid-utf8", CHAT, b'{"messages": "\xff\xfe"}', 400, None),
    ("json-array", CHAT, b"[1, 2]", 400, None),
    ("json-string", CHAT, b'"hello"', 400, None),
    ("json-null", CHAT, b"null", 400, None),
    ("json-number", COMP, b"5", 400, None),
    ("max_tokens-str", CHAT, _chat(max_tokens="5"), 400, "max_tokens"),
    ("max_tokens-0", CHAT, _chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens-neg", COMP, _comp(max_tokens=-3), 400, "max_tokens"),
    ("max_tokens-float", CHAT, _chat(max_tokens=5.5), 400, "max_tokens"),
    ("max_tokens-bool", CHAT, _chat(max_tokens=True), 400, "max_tokens"),
    ("max_tokens-huge", CHAT, _chat(max_tokens=10**40), 400, "max_tokens"),
    ("max_completion_tokens-str", CHAT, _chat(max_completion_tokens="5"), 400, "max_completion_tokens"),
    ("temperature-hot", CHAT, _chat(temperature="hot"), 400, "temperature"),
    ("temperature-7", CHAT, _chat(temperature=7), 400, "temperature"),
    ("temperature-neg", COMP, _comp(temperature=-0.5), 400, "temperature"),
    ("temperature-list", CHAT, _chat(temperature=[1]), 400, "temperature"),
    ("n-0", CHAT, _chat(n=0), 400, "n"),
    ("n-100", CHAT, _chat(n=100), 400, "n"),
    ("n-str", COMP, _comp(n="2"), 400, "n"),
    ("n-float", CHAT, _chat(n=1.5), 400, "n"),
    ("top_p-0", CHAT, _chat(top_p=0), 400, "top_p"),
    ("top_p-1.5", CHAT, _chat(top_p=1.5), 400, "top_p"),
    ("top_p-str", COMP, _comp(top_p="x"), 400, "top_p"),
    ("top_k-str", CHAT, _chat(top_k="x"), 400, "top_k"),
    ("top_k-neg", CHAT, _chat(top_k=-5), 400, "top_k"),
    ("seed-float", CHAT, _chat(seed=1.5), 400, "seed"),
    ("seed-huge", CHAT, _chat(seed=2**70), 400, "seed"),
    ("stop-5", CHAT, _chat(stop=5), 400, "stop"),
    ("stop-list-int", COMP, _comp(stop=["a", 5]), 400, "stop"),
    ("stop-empty", CHAT, _chat(stop=""), 400, "stop"),
    ("stop-too-many", CHAT, _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop-object", CHAT, _chat(stop={"a": 1}), 400, "stop"),
    ("messages-missing", CHAT, {"model": MODEL}, 400, "messages"),
    ("messages-empty", CHAT, _chat(messages=[]), 400, "messages"),
    ("messages-str", CHAT, _chat(messages="hi"), 400, "messages"),
    ("messages-item-int", CHAT, _chat(messages=[5]), 400, "messages"),
    ("messages-no-role", CHAT, _chat(messages=[{"content": "hi"}]), 400, "messages"),
    ("role-robot", CHAT, _chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages"),
    ("role-int", CHAT, _chat(messages=[{"role": 1, "content": "hi"}]), 400, "messages"),
    ("content-5", CHAT, _chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    ("content-image", CHAT, _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400, "messages"),
    ("content-part-bad", CHAT, _chat(messages=[{"role": "user", "content": [5]}]), 400, "messages"),
    ("logprobs-yes", CHAT, _chat(logprobs="yes"), 400, "logprobs"),
    ("top_logprobs-50", CHAT, _chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("top_logprobs-neg", CHAT, _chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs"),
    ("top_logprobs-no-logprobs", CHAT, _chat(top_logprobs=2), 400, "top_logprobs"),
    ("completion-logprobs-6", COMP, _comp(logprobs=6), 400, "logprobs"),
    ("completion-logprobs-bool", COMP, _comp(logprobs=True), 400, "logprobs"),
    ("stream-yes", CHAT, _chat(stream="yes"), 400, "stream"),
    ("stream-1", COMP, _comp(stream=1), 400, "stream"),
    ("stream_options-5", CHAT, _chat(stream=True, stream_options=5), 400, "stream_options"),
    ("ignore_eos-str", CHAT, _chat(ignore_eos="yes"), 400, "ignore_eos"),
    ("model-int", CHAT, _chat(model=5), 400, "model"),
    ("prompt-missing", COMP, {"model": MODEL}, 400, "prompt"),
    ("prompt-int", COMP, _comp(prompt=5), 400, "prompt"),
    ("prompt-empty-list", COMP, _comp(prompt=[]), 400, "prompt"),
    ("prompt-empty-str", COMP, _comp(prompt=""), 400, "prompt"),
    ("prompt-batch", COMP, _comp(prompt=["t5", "t6"]), 400, "prompt"),
    ("prompt-id-neg", COMP, _comp(prompt=[5, -1]), 400, "prompt"),
    ("prompt-id-oov", COMP, _comp(prompt=[5, 10**9]), 400, "prompt"),
    ("prompt-id-float", COMP, _comp(prompt=[5, 6.0]), 400, "prompt"),
    ("prompt+max_tokens-too-long", COMP, _comp(prompt="t5 " * 300, max_tokens=300), 400, "prompt"),
    ("messages-too-long", CHAT, _chat(messages=[{"role": "user", "content": "t5 " * 600}]), 400, "messages"),
]


def test_bad_requests_get_openai_errors(any_server):
    for name, route, body, want, param in BAD:
        status, _, raw = request(any_server, route, body)
        try:
            parsed = json.loads(raw)
        except ValueError:
            pytest.fail(f"{name}: not JSON: {raw[:200]!r}")
        try:
            assert_error(status, parsed, want, param)
        except AssertionError as e:
            raise AssertionError(f"case {name}: {e}") from None
    assert_alive(any_server)
    status, _, raw = request(any_server, "/metrics")
    assert status == 200 and f'disagg:request_errors_total{{model_name="{MODEL}",status="400"}}' in raw.decode()


def test_context_length_error_shape(fake):
    status, body = post_json(fake, COMP, _comp(prompt="t5 " * 600))
    assert_error(status, body, 400, "prompt", "context_length_exceeded")
    assert body["error"]["message"].startswith("This model's maximum context length is 512 tokens")


def test_unknown_model_is_404(any_server):
    for route, body in ((CHAT, _chat(model="gpt-17")), (COMP, _comp(model="gpt-17"))):
        status, body = post_json(any_server, route, body)
        assert_error(status, body, 404, "model", "model_not_found")


def test_unknown_routes_and_methods(fake):
    status, _, raw = request(fake, "/v1/nothing-here")
    assert_error(status, json.loads(raw), 404)
    status, _, raw = request(fake, CHAT, method="GET")
    assert_error(status, json.loads(raw), 405)
    status, _, raw = request(fake, "/v1/models", b"{}", method="POST")
    assert_error(status, json.loads(raw), 405)


def test_unknown_fields_are_ignored(any_server):
    extra = dict(user="u1", frequency_penalty=0.5, presence_penalty=0.1, logit_bias={"5": 1}, tools=[],
                 response_format={"type": "text"}, parallel_tool_calls=False, metadata={"a": "b"},
                 store=False, service_level="x", frobnicate={"deep": [1, {"x": None}]})
    status, body = post_json(any_server, CHAT, _chat(**extra))
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    status, body = post_json(any_server, COMP, _comp(suffix=None, echo=False, best_of=1, user="u"))
    assert status == 200, body
    # message extras (name, tool_call_id) and content parts
    msgs = [{"role": "system", "content": [{"type": "text", "text": "t9"}], "name": "sys"},
            {"role": "developer", "content": None},
            {"role": "user", "content": "t5", "name": "bob", "weird": 1}]
    status, body = post_json(any_server, CHAT, _chat(messages=msgs))
    assert status == 200, body


def test_body_over_limit_is_413(fake):
    from router.server import MAX_BODY_BYTES
    body = b'{"messages": "' + b"x" * MAX_BODY_BYTES + b'"}'
    t0 = time.monotonic()
    status, _, raw = request(fake, CHAT, body, timeout=120)
    assert_error(status, json.loads(raw), 413)
    assert time.monotonic() - t0 < 60
    assert_alive(fake)


def test_huge_prompt_is_rejected_quickly(any_server):
    """3 million characters, a million tokens, against a 512-token context: a 4xx, not a hang."""
    big = "t5 " * 1_000_000
    t0 = time.monotonic()
    status, body = post_json(any_server, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": big}]},
                             timeout=120)
    assert_error(status, body, 400, "messages", "context_length_exceeded")
    assert time.monotonic() - t0 < 20
    assert_alive(any_server)


def _loop_stalls_during(srv: Serve, fn) -> tuple[float, float]:
    """Run fn() while a probe task on the server's loop ticks every 5 ms: (longest gap, fn's duration)."""
    gaps: list[float] = []
    stop = threading.Event()

    async def probe():
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    fut = asyncio.run_coroutine_threadsafe(probe(), srv.loop)
    time.sleep(0.05)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    stop.set()
    fut.result(10)
    return max(gaps), dt


def test_huge_prompt_does_not_freeze_the_event_loop(fake):
    big = "t5 " * 1_000_000

    def send():
        status, body = post_json(fake, COMP, {"model": MODEL, "prompt": big, "max_tokens": 4}, timeout=120)
        assert_error(status, body, 400, "prompt", "context_length_exceeded")
    gap, dt = _loop_stalls_during(fake, send)
    # the loop may pause for the JSON parse and the id list (tens of ms), not for the tokenization
    assert gap < 0.25 * dt, f"event loop stalled {gap:.2f}s of a {dt:.2f}s request"


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_nan_is_a_400(fake, field):
    status, body = post_json(fake, CHAT, b'{"messages": [{"role": "user", "content": "t5"}], "%s": NaN}'
                             % field.encode())
    assert_error(status, body, 400)                   # as invalid JSON (param None) or as a bad field
    assert body["error"]["param"] in (None, field)


def test_deeply_nested_json_is_a_400(fake):
    status, body = post_json(fake, CHAT, b"[" * 100_000)
    assert_error(status, body, 400)


def test_prompt_larger_than_kv_cache_is_a_400(tiny_ckpts):
    with real_serve(tiny_ckpts("llama_gqa"), num_blocks=8, block_size=4) as srv:   # 32 tokens of KV
        status, body = post_json(srv, COMP, _comp(prompt="t5 " * 40))
        assert_error(status, body, 400)
        assert "KV cache" in body["error"]["message"]


def test_dead_engine_is_503_and_health_says_so(tok_dir):
    with fake_serve(tok_dir) as srv:
        assert_alive(srv)
        srv.aeng.fail("engine failed: simulated")
        status, headers, raw = request(srv, "/health")
        assert status == 503 and json.loads(raw)["status"] == "unhealthy"
        status, headers, raw = request(srv, CHAT, _chat())
        assert_error(status, json.loads(raw), 503)
        assert headers.get("Retry-After") == "5"


# ---------------------------------------------------------------------- streaming
def test_stream_chat_framing(real):
    body = {"model": MODEL, "messages": MSG, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    events = stream(real, CHAT, body)
    first = events[0]["choices"][0]
    assert first["delta"]["role"] == "assistant" and first["index"] == 0
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert all("usage" not in e for e in events)
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"
    assert sum(c["finish_reason"] is not None for e in events for c in e["choices"]) == 1
    _, full = post_json(real, CHAT, body)
    assert chat_text(events) == full["choices"][0]["message"]["content"]
    # include_usage: one more chunk, choices [], the usage
    events = stream(real, CHAT, {**body, "stream_options": {"include_usage": True}})
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]
    assert all("usage" not in e for e in events[:-1])


def test_stream_completion_framing(real):
    body = {"model": MODEL, "prompt": "t10 t11", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    events = stream(real, COMP, {**body, "stream_options": {"include_usage": True}})
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    _, full = post_json(real, COMP, body)
    assert "".join(c["text"] for e in events for c in e["choices"]) == full["choices"][0]["text"]


def test_stream_n2_has_both_indices(real):
    body = {"model": MODEL, "messages": MSG, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "n": 2,
            "stream_options": {"include_usage": True}}
    events = stream(real, CHAT, body)
    roles = [c["index"] for e in events for c in e["choices"] if c["delta"].get("role") == "assistant"]
    assert sorted(roles) == [0, 1]
    for i in (0, 1):   # each index: role first, then content, one finish
        mine = [c for e in events for c in e["choices"] if c["index"] == i]
        assert mine[0]["delta"].get("role") == "assistant"
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]
    assert chat_text(events, 0) == chat_text(events, 1) != ""
    assert events[-1]["usage"]["completion_tokens"] == 10


def _greedy_text(srv, n_tokens=14):
    _, full = post_json(srv, CHAT, {"model": MODEL, "messages": MSG, "max_tokens": n_tokens, "temperature": 0,
                                    "ignore_eos": True})
    return full["choices"][0]["message"]["content"]


def test_stop_strings_never_leak_into_the_stream(real):
    text = _greedy_text(real)
    words = text.split()
    assert len(words) >= 8, text
    # a stop string that spans a token boundary and ends mid-token, and one that never matches
    stop = f"{words[4]} {words[5][:2]}"
    want = text[:text.find(stop)]
    body = {"model": MODEL, "messages": MSG, "max_tokens": 14, "temperature": 0, "ignore_eos": True,
            "stop": [stop, "zzz-never"]}
    events = stream(real, CHAT, body)
    pieces = [c["delta"].get("content") or "" for e in events for c in e["choices"]]
    assert "".join(pieces) == want
    seen = ""
    for p in pieces:        # at no point does the streamed text contain any part of the stop beyond `want`
        seen += p
        assert want.startswith(seen)
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["stop"]
    _, full = post_json(real, CHAT, body)
    assert full["choices"][0]["message"]["content"] == want and full["choices"][0]["finish_reason"] == "stop"
    # the same through /v1/completions with the single-word stop
    _, comp = post_json(real, COMP, {"model": MODEL, "prompt": "t5 t6 t7", "max_tokens": 10, "temperature": 0,
                                     "ignore_eos": True})
    ctext = comp["choices"][0]["text"]
    cstop = ctext.split()[3]
    events = stream(real, COMP, {"model": MODEL, "prompt": "t5 t6 t7", "max_tokens": 10, "temperature": 0,
                                 "ignore_eos": True, "stop": cstop})
    streamed = "".join(c["text"] for e in events for c in e["choices"])
    assert streamed == ctext[:ctext.find(cstop)] and cstop not in streamed


# ---------------------------------------------------------------------- client goes away
def _open_stream_and_drop(srv: Serve, body: dict, chunks: int = 2) -> None:
    """Raw socket: POST a streaming request, read `chunks` SSE events, close the connection."""
    payload = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    s.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    buf = b""
    while buf.count(b"data: ") < chunks:
        got = s.recv(65536)
        assert got, buf
        buf += got
    assert buf.startswith(b"HTTP/1.1 200")
    s.close()


def _wait_idle(eng, timeout=10.0):
    bm, sch = eng.block_manager, eng.scheduler
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bm.num_free_blocks == bm.num_blocks and sch.num_running == 0 and sch.num_waiting == 0:
            break
        time.sleep(0.02)
    assert (bm.num_free_blocks, sch.num_running, sch.num_waiting) == (bm.num_blocks, 0, 0)
    bm.check_integrity()


def test_disconnect_mid_stream_aborts_and_frees_kv(real):
    eng = real.engine
    real.aborted.clear()
    body = {"model": MODEL, "messages": MSG, "max_tokens": 480, "ignore_eos": True, "stream": True}
    _open_stream_and_drop(real, body)
    _wait_idle(eng)
    assert len(real.aborted) == 1, real.aborted
    _, reason, n_out = real.aborted[0]
    assert reason == "abort" and n_out < 480
    # n=2: both choices aborted
    real.aborted.clear()
    _open_stream_and_drop(real, {**body, "n": 2}, chunks=3)
    _wait_idle(eng)
    assert len(real.aborted) == 2 and all(r == "abort" for _, r, _ in real.aborted), real.aborted
    assert_alive(real)


def test_disconnect_non_streaming_aborts(real):
    eng = real.engine
    real.aborted.clear()
    payload = json.dumps({"model": MODEL, "messages": MSG, "max_tokens": 480, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", real.port), timeout=30)
    s.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    deadline = time.monotonic() + 10          # wait until the engine holds it, then hang up
    while eng.scheduler.num_running == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    s.close()
    _wait_idle(eng)
    assert len(real.aborted) == 1 and real.aborted[0][1] == "abort", real.aborted
    assert_alive(real)


def test_disconnect_with_fake_engine(tok_dir):
    with fake_serve(tok_dir, tokens_per_request=10_000, token_delay_s=0.002) as srv:
        _open_stream_and_drop(srv, {"model": MODEL, "messages": MSG, "stream": True, "n": 3}, chunks=6)
        deadline = time.monotonic() + 10
        while srv.aeng.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not srv.aeng.running and srv.aeng.num_aborted == 3 and srv.aeng.num_finished == 0


# ---------------------------------------------------------------------- logprobs
def test_chat_logprobs(real):
    body = {"model": MODEL, "messages": MSG, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
    status, r = post_json(real, CHAT, body)
    assert status == 200, r
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for e in content:
        assert isinstance(e["token"], str) and e["bytes"] == list(e["token"].encode())
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 2
        top = e["top_logprobs"]
        assert top[0]["logprob"] >= top[1]["logprob"]
        assert top[0]["token"] == e["token"] and math.isclose(top[0]["logprob"], e["logprob"], abs_tol=1e-5)
    assert " ".join(e["token"] for e in content) == r["choices"][0]["message"]["content"].strip()
    # streamed: the same entries, spread over the chunks
    events = stream(real, CHAT, body)
    streamed = [x for e in events for c in e["choices"] if c.get("logprobs") for x in c["logprobs"]["content"]]
    assert [x["token"] for x in streamed] == [x["token"] for x in content]
    # logprobs without top_logprobs: chosen token only
    status, r = post_json(real, CHAT, {**body, "top_logprobs": 0})
    assert all(e["top_logprobs"] == [] for e in r["choices"][0]["logprobs"]["content"])
    # completions: logprobs=2
    status, r = post_json(real, COMP, {"model": MODEL, "prompt": "t5 t6", "max_tokens": 3, "temperature": 0,
                                       "ignore_eos": True, "logprobs": 2})
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(len(t) == 2 for t in lp["top_logprobs"])


# ---------------------------------------------------------------------- fuzz
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "seed",
          "stop", "logprobs", "top_logprobs", "stream", "stream_options", "ignore_eos", "user", "tools"]


@pytest.fixture(scope="module")
def fuzz_server(tiny_ckpts):
    """The real tiny engine with a 48-token context, so that even unbounded requests end quickly."""
    from disagg.config import CacheConfig, EngineConfig, SchedulerConfig
    from disagg.engine.async_engine import AsyncEngine
    from disagg.engine.llm_engine import LLMEngine
    eng = LLMEngine(EngineConfig(tiny_ckpts("llama_gqa"), dtype="float32",
                                 cache=CacheConfig(block_size=4, num_blocks=256),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=32,
                                                           max_model_len=48)))
    with Serve(lambda: AsyncEngine(eng), eng.tokenizer, eng.max_model_len, engine=eng) as s:
        yield s


def _check_fuzz_response(status, headers, raw):
    assert status < 500, raw[:500]
    if status == 200 and headers.get("Content-Type", "").startswith("text/event-stream"):
        events = sse(raw)
        assert events[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in events), raw[:500]
    else:
        body = json.loads(raw)
        if status != 200:
            assert_error(status, body, status)


def test_fuzz_chat(fuzz_server):
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-3, 40) | st.integers() |
               st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12) |
               st.sampled_from(["t5 t6", "user", "assistant", MODEL, "robot", ""]))
    json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) |
                               st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
    wild_message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot"]) | json_values},
        optional={"content": json_values, "name": json_values})
    good_message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer"]),
         "content": st.sampled_from(["t5 t6 t7", "", "hello", "t9 " * 20, None]) | st.text(max_size=20) |
         st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2)})
    plausible = {
        "model": st.just(MODEL), "messages": st.lists(good_message, min_size=1, max_size=3),
        "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8),
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 500),
        "n": st.integers(1, 3), "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
        "logprobs": st.just(True), "top_logprobs": st.integers(0, 20), "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "ignore_eos": st.booleans(), "user": st.text(max_size=5), "tools": st.just([]),
    }
    wild = {k: json_values | (st.lists(wild_message, min_size=1, max_size=3) if k == "messages" else json_values)
            for k in FIELDS}
    good_field = st.sampled_from(FIELDS).flatmap(lambda k: st.tuples(st.just(k), plausible[k]))
    wild_field = st.sampled_from(FIELDS).flatmap(lambda k: st.tuples(st.just(k), wild[k]))
    base = {"model": MODEL, "messages": [{"role": "user", "content": "t5 t6"}]}
    mostly_valid = st.tuples(st.lists(good_field, max_size=6), st.lists(wild_field, max_size=1)).map(
        lambda t: {**base, **dict(t[0]), **dict(t[1])})
    bodies = st.one_of(mostly_valid, st.lists(good_field | wild_field, max_size=10).map(dict), json_values)

    statuses: dict[int, int] = {}

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def run(body):
        status, headers, raw = request(fuzz_server, CHAT, json.dumps(body).encode())
        statuses[status] = statuses.get(status, 0) + 1
        _check_fuzz_response(status, headers, raw)

    run()
    print("fuzz statuses:", statuses)
    assert statuses.get(200, 0) >= 5, statuses     # the fuzz also reaches the engine, not only the validator
    assert request(fuzz_server, "/health")[0] == 200
    _wait_idle(fuzz_server.engine)
    assert_alive(fuzz_server)


# ---------------------------------------------------------------------- disagg chat
def test_chat_client_prompt_matches_non_streamed(real, capsys):
    from disagg import chat
    status, full = post_json(real, CHAT, {"model": MODEL, "messages": [{"role": "system", "content": "t20"},
                                                                        {"role": "user", "content": "t5 t6"}],
                                          "max_tokens": 12, "temperature": 0})
    assert status == 200
    rc = chat.main(["--url", real.url + "/v1", "--system", "t20", "--prompt", "t5 t6", "--temperature", "0",
                    "--max-tokens", "12"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out == full["choices"][0]["message"]["content"] + "\n"


def test_chat_client_errors_and_history(real, capsys, monkeypatch):
    from disagg import chat
    rc = chat.main(["--url", real.url + "/v1", "--model", "nope", "--prompt", "t5"])
    out = capsys.readouterr()
    assert rc == 1 and out.out == "" and "does not exist" in out.err and "(HTTP 404)" in out.err
    rc = chat.main(["--url", f"http://127.0.0.1:{free_port()}/v1", "--prompt", "t5"])
    assert rc == 1 and "cannot reach" in capsys.readouterr().err
    # interactive (stdin not a tty): two turns, a reset, one more turn, then EOF
    args = ["--url", real.url + "/v1", "--temperature", "0", "--max-tokens", "5"]
    monkeypatch.setattr("sys.stdin", io.StringIO("t5\nt6\n/reset\nt7\n"))
    assert chat.main(args) == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 3

    def ask(msgs):
        return post_json(real, CHAT, {"model": MODEL, "messages": msgs, "max_tokens": 5,
                                      "temperature": 0})[1]["choices"][0]["message"]["content"]
    r1 = ask([{"role": "user", "content": "t5"}])
    r2 = ask([{"role": "user", "content": "t5"}, {"role": "assistant", "content": r1},
              {"role": "user", "content": "t6"}])
    r3 = ask([{"role": "user", "content": "t7"}])
    assert replies == [r1, r2, r3]
