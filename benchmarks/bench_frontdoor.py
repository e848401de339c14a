"""The HTTP front door's own overhead: the real aiohttp Server over FakeEngine (no model).

    python benchmarks/bench_frontdoor.py                  # ~1 minute; writes results/frontdoor_cpu.json
    python benchmarks/bench_frontdoor.py --quick          # a few seconds, smoke run

The server runs in a process of its own (router.server.Server + router.fake_engine.FakeEngine,
8 tokens a request, no delay; the word-level test tokenizer written to a temp dir; the same
AppRunner settings as `disagg serve`). Each request is a chat completion of a 4-word
message, max_tokens 8. Measured, non-streaming and streaming:

  latency     one request at a time over one keep-alive connection, from a minimal blocking
              socket client (pre-built request bytes; it parses only the framing), against
                engine    the same FakeEngine drained by a direct in-process call (its own time)
                bare      an aiohttp route in the same server that returns a constant JSON body
                          (what aiohttp + loopback + this client cost with none of our code)
              added at the median = p50(HTTP request) - p50(engine). The server also times
              each handler (a middleware outside the app's own): handler p50 is the part spent
              in our code (parse, validate, tokenize, engine, JSON), the rest is aiohttp's
              HTTP parsing/writing, the loopback and the client.
  throughput  requests/s with C requests in flight for --duration seconds, from a separate client
              process (or --client-procs of them): `aiohttp` = aiohttp.ClientSession (a
              TCPConnector of C connections), `raw` = asyncio streams over C keep-alive
              connections with pre-built requests (a far cheaper client). The CPU seconds of
              the server and client processes over the window say which side was the
              bottleneck (the server has one core's worth of event loop); the machine's busy
              cores over the same window, less ours, estimate the other load.

Targets printed beside: >= 2,000 req/s, <= 1 ms added at the median.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

MODEL = "fake"
TARGET_RPS = 2000.0
TARGET_ADDED_MS = 1.0
CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "t5 t6 t7 t8"}], "max_tokens": 8}


# ---------------------------------------------------------------------- small helpers
def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summary_ms(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": pct(xs, 0.5) * 1e3, "p90_ms": pct(xs, 0.9) * 1e3, "p99_ms": pct(xs, 0.99) * 1e3,
            "mean_ms": statistics.fmean(xs) * 1e3 if xs else float("nan")}


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def http_request(path: str, body: dict | None, port: int) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    method = b"POST" if body is not None else b"GET"
    return (method + b" " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


# ---------------------------------------------------------------------- server process
def serve(port: int, tok_dir: str, tokens: int) -> None:
    from aiohttp import web

    from disagg.model.tokenizer import Tokenizer
    from router.fake_engine import FakeEngine
    from router.server import Server

    handler_s: list[float] = []

    @web.middleware
    async def timing(request, handler):
        t0 = time.perf_counter()
        try:
            return await handler(request)
        finally:
            if request.path.startswith("/v1/"):
                handler_s.append(time.perf_counter() - t0)

    bare_body = json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": " t9" * tokens}, "finish_reason": "length"}]}).encode()

    async def bare(request):
        await request.read()
        return web.Response(body=bare_body, content_type="application/json")

    async def stats(request):
        return web.json_response({"handler_s": handler_s})

    async def reset(request):
        handler_s.clear()
        return web.json_response({})

    async def main():
        eng = FakeEngine(tokens_per_request=tokens)
        eng.start()
        server = Server(eng, Tokenizer(tok_dir), MODEL, 4096)
        app = server.app()
        app.middlewares.insert(0, timing)          # outermost: the whole handler, errors included
        app.router.add_post("/bench/bare", bare)
        app.router.add_get("/bench/stats", stats)
        app.router.add_post("/bench/reset", reset)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)   # as `disagg serve`
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        print("READY", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())


# ---------------------------------------------------------------------- sequential latency client
class BlockingClient:
    """One keep-alive connection; reads exactly one response (Content-Length or chunked)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self) -> None:
        got = self.sock.recv(262144)
        if not got:
            raise ConnectionError("server closed the connection")
        self.buf += got

    def _until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            self._fill()
        out, self.buf = self.buf[:i], self.buf[i + len(sep):]
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def roundtrip(self, req: bytes) -> tuple[int, bytes]:
        self.sock.sendall(req)
        head = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:])}
        if "content-length" in hdrs:
            return status, self._exactly(int(hdrs["content-length"]))
        body = []
        while True:                                   # chunked
            size = int(self._until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                self._until(b"\r\n")
                return status, b"".join(body)
            body.append(self._exactly(size))
            self._exactly(2)


def measure_latency(port: int, path: str, body: dict, n: int, warmup: int, stream: bool) -> list[float]:
    c = BlockingClient(port)
    req = http_request(path, {**body, "stream": True} if stream else body, port)
    for _ in range(warmup):
        status, data = c.roundtrip(req)
        assert status == 200, data[:300]
        if stream:
            assert data.endswith(b"data: [DONE]\n\n"), data[-200:]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.roundtrip(req)
        out.append(time.perf_counter() - t0)
    c.sock.close()
    return out


def direct_engine_latency(tokens: int, n: int) -> list[float]:
    """The FakeEngine's own time: generate() drained in-process, no HTTP, no tokenizer."""
    from disagg.request import SamplingParams
    from router.fake_engine import FakeEngine

    async def run():
        eng = FakeEngine(tokens_per_request=tokens)
        eng.start()
        params = SamplingParams(max_tokens=tokens)
        ids = [0, 5, 6, 7, 8]
        out = []
        for i in range(n + 200):
            t0 = time.perf_counter()
            async for _ in eng.generate(ids, params, f"r{i}"):
                pass
            out.append(time.perf_counter() - t0)
        return out[200:]
    return asyncio.run(run())


# ---------------------------------------------------------------------- throughput client process
async def _raw_worker(port: int, req: bytes, stream: bool, until: float, lat: list[float], counts: list[int]):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            ok = head.startswith(b"HTTP/1.1 200")
            lower = head.lower()
            if b"content-length:" in lower:
                n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(n)
            else:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            lat.append(time.perf_counter() - t0)
            counts[0 if ok else 1] += 1
    finally:
        writer.close()


async def _aiohttp_worker(session, url: str, body: dict, stream: bool, until: float, lat: list[float],
                          counts: list[int]):
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        async with session.post(url, json=body) as r:
            if stream:
                async for _ in r.content:
                    pass
            else:
                await r.read()
            ok = r.status == 200
        lat.append(time.perf_counter() - t0)
        counts[0 if ok else 1] += 1


def client(port: int, kind: str, path: str, stream: bool, concurrency: int, duration: float, warmup: float) -> None:
    body = {**CHAT_BODY, "stream": True} if stream else CHAT_BODY

    async def phase(seconds: float):
        lat: list[float] = []
        counts = [0, 0]
        until = time.perf_counter() + seconds
        if kind == "raw":
            req = http_request(path, body, port)
            await asyncio.gather(*[_raw_worker(port, req, stream, until, lat, counts) for _ in range(concurrency)])
        else:
            import aiohttp
            conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
            async with aiohttp.ClientSession(connector=conn) as s:
                url = f"http://127.0.0.1:{port}{path}"
                await asyncio.gather(*[_aiohttp_worker(s, url, body, stream, until, lat, counts)
                                       for _ in range(concurrency)])
        return lat, counts

    async def main():
        await phase(warmup)
        print("WARM", flush=True)
        sys.stdin.readline()                       # the parent starts every client together
        t0 = time.perf_counter()
        lat, counts = await phase(duration)
        wall = time.perf_counter() - t0
        print(json.dumps({"ok": counts[0], "errors": counts[1], "wall_s": wall, "lat": lat}), flush=True)
    asyncio.run(main())


def measure_throughput(port: int, server_pid: int, kind: str, path: str, stream: bool, concurrency: int,
                       duration: float, procs: int, warmup: float) -> dict:
    per = max(1, concurrency // procs)
    cmd = [sys.executable, os.path.abspath(__file__), "--client", kind, "--port", str(port), "--path", path,
           "--concurrency", str(per), "--duration", str(duration), "--warmup", str(warmup)]
    if stream:
        cmd.append("--stream")
    ps = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    for p in ps:
        assert p.stdout.readline().strip() == "WARM"
    s0, c0 = proc_cpu_s(server_pid), [proc_cpu_s(p.pid) for p in ps]
    m0 = machine_busy()
    t0 = time.perf_counter()
    for p in ps:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.stdout.readline()) for p in ps]
    wall = time.perf_counter() - t0
    s1, c1 = proc_cpu_s(server_pid), [proc_cpu_s(p.pid) for p in ps]
    m1 = machine_busy()
    for p in ps:
        p.wait(30)
    ok = sum(r["ok"] for r in results)
    errors = sum(r["errors"] for r in results)
    lat = [x for r in results for x in r["lat"]]
    span = max(r["wall_s"] for r in results)
    ncpu = os.cpu_count() or 1
    busy_cores = (m1[0] - m0[0]) / max(m1[1] - m0[1], 1) * ncpu
    server_cores = (s1 - s0) / wall
    client_cores = sum(b - a for a, b in zip(c0, c1)) / wall
    return {"client": kind, "client_procs": procs, "concurrency": per * procs, "stream": stream,
            "requests": ok, "errors": errors, "seconds": span, "req_per_s": ok / span,
            "tokens_per_s": ok * CHAT_BODY["max_tokens"] / span, "latency": summary_ms(lat),
            "server_cpu_cores": server_cores, "client_cpu_cores": client_cores,
            "server_cpu_us_per_request": (s1 - s0) / max(ok, 1) * 1e6,
            "req_per_s_per_server_core": ok / max(s1 - s0, 1e-9),
            "machine_busy_cores": busy_cores, "other_load_cores": max(0.0, busy_cores - server_cores - client_cores)}


# ---------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8, help="tokens per request (FakeEngine, no delay)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    ap.add_argument("--latency-n", type=int, default=2000, help="sequential requests per latency run")
    ap.add_argument("--client-procs", type=int, nargs="*", default=[1, 2],
                    help="client process counts to try for the throughput runs")
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "frontdoor_cpu.json"))
    # internal modes
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tok-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default="/v1/chat/completions", help=argparse.SUPPRESS)
    ap.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve, args.tok_dir, args.tokens)
        return 0
    if args.client is not None:
        client(args.port, args.client, args.path, args.stream, args.concurrency, args.duration, args.warmup)
        return 0
    if args.quick:
        args.duration, args.latency_n, args.client_procs = 1.0, 300, [1]

    from router.fake_engine import write_word_tokenizer
    tok_dir = write_word_tokenizer(tempfile.mkdtemp(prefix="frontdoor-tok-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_before = os.getloadavg()
    srv = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(port), "--tok-dir", tok_dir,
                            "--tokens", str(args.tokens)], stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline()
        if line.strip() != "READY":
            raise SystemExit(f"server did not start: {line!r}")
        res = run_all(args, port, srv.pid)
    finally:
        srv.terminate()
        srv.wait(10)
    res["machine"] = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                      "python": platform.python_version(), "loadavg_before": load_before,
                      "loadavg_after": os.getloadavg()}
    res["config"] = {"tokens_per_request": args.tokens, "body": CHAT_BODY, "duration_s": args.duration,
                     "latency_n": args.latency_n, "concurrency": args.concurrency}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], os.path.basename(args.out)), "w") as f:
            json.dump(res, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


def _server_handler_times(port: int) -> list[float]:
    c = BlockingClient(port)
    _, data = c.roundtrip(http_request("/bench/stats", None, port))
    c.roundtrip(http_request("/bench/reset", {}, port))
    c.sock.close()
    return json.loads(data)["handler_s"]


def run_all(args, port: int, server_pid: int) -> dict:
    path = "/v1/chat/completions"
    n, warm = args.latency_n, max(200, args.latency_n // 10)
    print(f"front door over FakeEngine ({args.tokens} tokens/request, no delay); {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    engine = direct_engine_latency(args.tokens, n)
    eng_p50 = pct(engine, 0.5)
    print(f"\nengine alone (direct in-process generate(), drained): p50 {eng_p50 * 1e6:.1f} us")

    latency = {"engine_direct": summary_ms(engine)}
    print("\nlatency, one request at a time (blocking keep-alive socket client)")
    print(f"{'':28s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'handler p50':>12s} {'added p50':>10s}  target")
    _server_handler_times(port)
    bare = measure_latency(port, "/bench/bare", CHAT_BODY, n, warm, stream=False)
    _server_handler_times(port)
    latency["bare_aiohttp"] = summary_ms(bare)
    print(f"{'bare aiohttp route':28s} {pct(bare, .5) * 1e3:8.3f} {pct(bare, .9) * 1e3:8.3f} "
          f"{pct(bare, .99) * 1e3:8.3f}")
    for stream in (False, True):
        name = "chat, streaming" if stream else "chat, non-streaming"
        xs = measure_latency(port, path, CHAT_BODY, n, warm, stream)
        handler = _server_handler_times(port)[-n:]
        added = pct(xs, 0.5) - eng_p50
        met = added * 1e3 <= TARGET_ADDED_MS
        latency["stream" if stream else "non_stream"] = {
            **summary_ms(xs), "server_handler": summary_ms(handler), "added_p50_ms": added * 1e3,
            "added_over_bare_p50_ms": (pct(xs, 0.5) - pct(bare, 0.5)) * 1e3,
            "target_added_ms": TARGET_ADDED_MS, "met": met}
        print(f"{name:28s} {pct(xs, .5) * 1e3:8.3f} {pct(xs, .9) * 1e3:8.3f} {pct(xs, .99) * 1e3:8.3f} "
              f"{pct(handler, .5) * 1e3:12.3f} {added * 1e3:10.3f}  <= {TARGET_ADDED_MS} ms: "
              f"{'met' if met else 'MISSED'}")

    print(f"\nthroughput, {args.concurrency} in flight, {args.duration:.0f} s per run")
    print(f"{'':28s} {'client':>7s} {'procs':>5s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'server':>7s} "
          f"{'client':>7s} {'other':>6s} {'srv us/req':>10s} {'req/s/core':>10s}  target")
    runs = []
    for stream in (False, True):
        for kind in ("aiohttp", "raw"):
            for procs in args.client_procs:
                r = measure_throughput(port, server_pid, kind, path, stream, args.concurrency, args.duration, procs,
                                       warmup=min(1.0, args.duration))
                r["met"] = r["req_per_s"] >= TARGET_RPS
                runs.append(r)
                name = "chat, streaming" if stream else "chat, non-streaming"
                print(f"{name:28s} {kind:>7s} {procs:5d} {r['req_per_s']:8.0f} {r['latency']['p50_ms']:8.2f} "
                      f"{r['latency']['p99_ms']:8.2f} {r['server_cpu_cores']:7.2f} {r['client_cpu_cores']:7.2f} "
                      f"{r['other_load_cores']:6.2f} {r['server_cpu_us_per_request']:10.0f} "
                      f"{r['req_per_s_per_server_core']:10.0f}  >= {TARGET_RPS:.0f}: {'met' if r['met'] else 'MISSED'}"
                      + (f"  ({r['errors']} errors)" if r["errors"] else ""))
    bare_runs = []
    r = measure_throughput(port, server_pid, "raw", "/bench/bare", False, args.concurrency, args.duration, 1,
                           warmup=min(1.0, args.duration))
    bare_runs.append(r)
    print(f"{'bare aiohttp route':28s} {'raw':>7s} {1:5d} {r['req_per_s']:8.0f} {r['latency']['p50_ms']:8.2f} "
          f"{r['latency']['p99_ms']:8.2f} {r['server_cpu_cores']:7.2f} {r['client_cpu_cores']:7.2f} "
          f"{r['other_load_cores']:6.2f} {r['server_cpu_us_per_request']:10.0f} "
          f"{r['req_per_s_per_server_core']:10.0f}  (aiohttp's own ceiling here)")
    best = {s: max((x for x in runs if x["stream"] == s), key=lambda x: x["req_per_s"]) for s in (False, True)}
    print("\ncpu in cores over the window (server process, client processes, everything else on the machine); "
          "srv us/req = server CPU per request; req/s/core = what one fully available core would serve")
    return {"latency": latency, "throughput": runs, "throughput_bare_aiohttp": bare_runs,
            "best_req_per_s": {"non_stream": best[False]["req_per_s"], "stream": best[True]["req_per_s"]},
            "req_per_s_per_server_core": {"non_stream": best[False]["req_per_s_per_server_core"],
                                          "stream": best[True]["req_per_s_per_server_core"]},
            "targets": {"req_per_s": TARGET_RPS, "added_p50_ms": TARGET_ADDED_MS}}


if __name__ == "__main__":
    sys.exit(main())
