"""The HTTP front door, driven by the openai SDK and raw HTTP, over a real engine."""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")

from conftest import make_engine
from serve_thread import MODEL, Serve


def ServerThread(eng, api_key=None, name=MODEL) -> Serve:
    """The real server over `eng` (an LLMEngine) in a thread, on a loopback port."""
    from disagg.engine.async_engine import AsyncEngine
    return Serve(lambda: AsyncEngine(eng), eng.tokenizer, eng.max_model_len, engine=eng, name=name, api_key=api_key)


@pytest.fixture(scope="module")
def server(tiny_ckpts):
    eng = make_engine(tiny_ckpts("llama_gqa"), num_blocks=256, block_size=4, budget=64)
    with ServerThread(eng) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _raw(server, method, path, body=None, headers=None):
    import urllib.error
    import urllib.request
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert _raw(server, "GET", "/health") == (200, {"status": "ok"})


def test_chat_completion(client, server):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t5 t6 t7"}],
                                       max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    # same request through the engine directly gives the same text
    eng = server.engine
    ids = eng.tokenizer.encode_chat([{"role": "user", "content": "t5 t6 t7"}])
    from disagg.request import SamplingParams
    # the engine is owned by the server thread; compare with a fresh engine on the same checkpoint
    fresh = make_engine(eng.cfg.model_dir)
    ref = fresh.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert r.choices[0].message.content == ref.output_text


def test_completion_and_n(client):
    r = client.completions.create(model=MODEL, prompt="t10 t11 t12", max_tokens=5, temperature=0, n=2,
                                  extra_body={"ignore_eos": True})
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text
    assert r.usage.completion_tokens == 10


def test_stream_chat(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "t9"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"


def test_errors(server, client):
    import openai
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "t3"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t3"}], temperature=7)
    code, body = _raw(server, "POST", "/v1/chat/completions", b"{not json")
    assert code == 400 and body["error"]["type"] == "invalid_request_error"
    code, body = _raw(server, "POST", "/v1/chat/completions", {"model": MODEL, "messages": "hi"})
    assert code == 400 and body["error"]["param"] == "messages"
    code, body = _raw(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "t3 " * 600, "max_tokens": 4})
    assert code == 400 and body["error"]["message"].startswith("This model's maximum context length is 512 tokens")
    code, body = _raw(server, "GET", "/v1/nothing-here")
    assert code == 404 and "error" in body
    assert _raw(server, "GET", "/health")[0] == 200   # still serving


def test_api_key(tiny_ckpts):
    import openai
    eng = make_engine(tiny_ckpts("llama_gqa"))
    with ServerThread(eng, api_key="sekret") as s:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        assert _raw(s, "GET", "/health")[0] == 200   # health is not behind the key
