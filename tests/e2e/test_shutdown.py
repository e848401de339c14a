"""`disagg serve` shuts down gracefully: SIGTERM stops accepting (503 for new requests, /health
503 "draining"), lets the stream in flight finish, then exits 0."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url: str, body: dict, stream: bool = False):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        r = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    return r.status, r if stream else json.loads(r.read())


def test_sigterm_drains_in_flight_requests_then_exits_zero(smollm2_dir):
    """SmolLM2 on CPU (a few tens of tokens/s) keeps the stream in flight long enough to observe."""
    port = _port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "disagg.cli", "serve", smollm2_dir, "--colocated",
                             "--port", str(port), "--dtype", "float32", "--device", "cpu", "--shutdown-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        t_end = time.monotonic() + 180
        while time.monotonic() < t_end:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        body = {"model": os.path.basename(smollm2_dir), "prompt": "Count from 1 to 100:", "max_tokens": 150,
                "ignore_eos": True, "temperature": 0, "stream": True}
        status, stream = _post(base + "/v1/completions", body, stream=True)
        assert status == 200
        first = stream.readline()                      # the stream has started
        stream.readline()
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        code, err = _post(base + "/v1/completions", {**body, "stream": False, "max_tokens": 2})
        assert code == 503 and "shutting down" in err["error"]["message"]
        assert _get(base + "/health") == (503, {"status": "draining"})
        rest = stream.read().decode().strip().split("\n\n")
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "length"   # ran to its end, not cut off
        assert proc.wait(timeout=60) == 0
        assert "Draining: 1 request(s) in flight" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
