"""Open-loop load: each request leaves at its arrival time whether or not earlier ones are done.

    results = await run(requests, Target("http://127.0.0.1:8000", model), max_concurrency=None)

A request's life on the client:
    waiting for its arrival time -> (waiting for a --max-concurrency slot) -> sent (clock starts)
    -> streaming (content chunks timed) -> ended: ok, or failed with the reason kept
The run ends when every request has ended, when `stop` is set (Ctrl-C), or at `deadline_s`
after the start: requests still streaming then are cancelled and count as failed
("unfinished at the deadline"); requests never sent are left out of the results.

Timing follows `vllm bench serve`: TTFT is the first chunk that carries text, ITL the gaps
between text chunks, E2EL the end of the stream. Output tokens come from the server's
`usage` (requested with stream_options.include_usage), else one per text chunk.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]          # text, or token ids (exact lengths; /v1/completions only)
    output_len: int                  # max_tokens (exact with ignore_eos)
    arrival_s: float = 0.0           # seconds after the run's start
    prompt_len: int | None = None    # known for token-id prompts; else from the server's usage


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int | None = None
    output_len: int = 0
    ttft: float | None = None        # seconds
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    sent_s: float | None = None      # when it was sent, seconds after the run's start
    error: str | None = None


@dataclass(frozen=True)
class Target:
    base_url: str                    # http://host:port, with or without /v1
    model: str | None = None
    endpoint: str = "completions"    # or "chat"
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0

    def __post_init__(self):
        if self.endpoint not in ("completions", "chat"):
            raise ValueError("endpoint must be 'completions' or 'chat'")

    @property
    def v1(self) -> str:
        u = self.base_url.rstrip("/")
        return u if u.endswith("/v1") else u + "/v1"

    @property
    def url(self) -> str:
        return self.v1 + ("/chat/completions" if self.endpoint == "chat" else "/completions")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, q: BenchRequest) -> dict:
        b: dict = {"stream": True, "stream_options": {"include_usage": True}, "temperature": self.temperature}
        if self.model:
            b["model"] = self.model
        if self.endpoint == "chat":
            if not isinstance(q.prompt, str):
                raise ValueError("the chat endpoint takes text prompts (token ids need --endpoint completions)")
            b.update(messages=[{"role": "user", "content": q.prompt}], max_completion_tokens=q.output_len)
        else:
            b.update(prompt=q.prompt, max_tokens=q.output_len)
        if self.ignore_eos:
            b["ignore_eos"] = True
        return b


@dataclass
class RunOutcome:
    results: list[RequestResult]     # the requests that were sent, in request order
    duration_s: float                # first arrival .. last request ended (or stop / deadline)
    not_sent: int = 0
    interrupted: bool = False        # `stop` was set
    hit_deadline: bool = False


async def fetch_model(base_url: str, api_key: str | None = None, timeout_s: float = 30) -> str:
    """The first model id the server lists at /v1/models."""
    import aiohttp
    t = Target(base_url, api_key=api_key)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        async with s.get(t.v1 + "/models", headers=t.headers()) as r:
            if r.status != 200:
                raise RuntimeError(f"GET {t.v1}/models: HTTP {r.status}: {(await r.text())[:200]}")
            data = await r.json()
    try:
        return data["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"GET {t.v1}/models listed no model: {str(data)[:200]}") from None


def _chunk_text(d: dict, chat: bool) -> str:
    ch = d.get("choices") or []
    if not ch:
        return ""
    if chat:
        return (ch[0].get("delta") or {}).get("content") or ""
    return ch[0].get("text") or ""


async def send(session, target: Target, q: BenchRequest, res: RequestResult, t_run0: float) -> None:
    """POST one streaming request and fill `res` (never raises, except on cancellation)."""
    chat = target.endpoint == "chat"
    t0 = time.perf_counter()
    res.sent_s = t0 - t_run0
    last = None
    n_chunks = 0
    usage = None
    try:
        async with session.post(target.url, json=target.body(q), headers=target.headers()) as r:
            if r.status != 200:
                text = await r.text()
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                res.error = f"HTTP {r.status}: {str(text)[:200]}"
                return
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                d = json.loads(payload)
                if "error" in d:
                    e = d["error"]
                    res.error = "in-stream error: " + str(e.get("message", e) if isinstance(e, dict) else e)[:200]
                    return
                if d.get("usage"):
                    usage = d["usage"]
                if _chunk_text(d, chat):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    n_chunks += 1
        res.e2e = time.perf_counter() - t0
        if n_chunks == 0:
            res.error = "no tokens received"
            return
        res.output_len = int(usage.get("completion_tokens") or n_chunks) if usage else n_chunks
        if usage and usage.get("prompt_tokens") is not None and res.prompt_len is None:
            res.prompt_len = int(usage["prompt_tokens"])
        res.ok = True
    except asyncio.TimeoutError:
        res.error = "timeout"
    except asyncio.CancelledError:
        res.error = "cancelled"
        res.e2e = time.perf_counter() - t0
        raise
    except Exception as e:  # noqa: BLE001 - a failed request is a data point, never a crash
        res.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        if not res.ok and res.e2e == 0.0:
            res.e2e = time.perf_counter() - t0


async def _send_or_abandon(session, target, q, res, t_run0, ttft_timeout_s: float) -> None:
    task = asyncio.ensure_future(send(session, target, q, res, t_run0))
    try:
        await asyncio.wait({task}, timeout=ttft_timeout_s)
        if not task.done() and res.ttft is None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            res.ok, res.error = False, f"no first token within {ttft_timeout_s:g}s (abandoned)"
            return
        await task
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise


class Progress:
    """A one-line progress bar on stderr: '\\r'-redrawn on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, file: TextIO | None = None, label: str = "bench", width: int = 24,
                 min_interval_s: float = 0.2):
        self.total, self.label, self.width, self.min_interval_s = max(total, 1), label, width, min_interval_s
        self.file = file if file is not None else sys.stderr
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1
        self._last_done = -1

    def line(self, done: int, failed: int, in_flight: int) -> str:
        k = round(self.width * done / self.total)
        return (f"{self.label} [{'#' * k}{'.' * (self.width - k)}] {done}/{self.total} done, {failed} failed, "
                f"{in_flight} in flight, {time.perf_counter() - self.t0:.1f}s")

    def update(self, done: int, failed: int, in_flight: int, force: bool = False) -> None:
        now = time.perf_counter()
        if self.tty:
            if force or now - self._last_draw >= self.min_interval_s:
                self.file.write("\r" + self.line(done, failed, in_flight) + "\x1b[K")
                self.file.flush()
                self._last_draw = now
        else:
            decile = 10 * done // self.total
            if decile > self._last_decile or (force and done != self._last_done):
                self._last_decile, self._last_done = decile, done
                self.file.write(self.line(done, failed, in_flight) + "\n")
                self.file.flush()

    def close(self, done: int, failed: int, in_flight: int) -> None:
        self.update(done, failed, in_flight, force=True)
        if self.tty:
            self.file.write("\n")
            self.file.flush()


async def run(requests: list[BenchRequest], target: Target, *, max_concurrency: int | None = None,
              progress: Progress | None = None, stop: asyncio.Event | None = None,
              deadline_s: float | None = None, request_timeout_s: float | None = 600.0,
              ttft_timeout_s: float | None = None) -> RunOutcome:
    """Send `requests` at their arrival times; see the module docstring for when it ends.
    `ttft_timeout_s`: abandon a request with no first token after that long (an impatient user;
    the server sees the disconnect and drops it), so an overloaded server's backlog clears."""
    import aiohttp
    results = [RequestResult(prompt_len=q.prompt_len) for q in requests]
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    counts = {"done": 0, "failed": 0, "in_flight": 0}

    def draw(force=False):
        if progress is not None:
            progress.update(counts["done"], counts["failed"], counts["in_flight"], force)

    conn = aiohttp.TCPConnector(limit=max_concurrency or 0)    # aiohttp's default cap (100) would throttle
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=request_timeout_s)) as s:
        t0 = time.perf_counter()

        async def one(q: BenchRequest, res: RequestResult):
            delay = t0 + q.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is not None:
                await sem.acquire()
            counts["in_flight"] += 1
            try:
                if ttft_timeout_s is None:
                    await send(s, target, q, res, t0)
                else:
                    await _send_or_abandon(s, target, q, res, t0, ttft_timeout_s)
            finally:
                counts["in_flight"] -= 1
                if sem is not None:
                    sem.release()
                counts["done"] += 1
                counts["failed"] += not res.ok
                draw()

        tasks = [asyncio.create_task(one(q, r)) for q, r in zip(requests, results)]
        waiters = {asyncio.ensure_future(asyncio.wait(tasks))} if tasks else set()
        if stop is not None:
            waiters.add(asyncio.ensure_future(stop.wait()))

        async def tick():
            while True:
                await asyncio.sleep(0.5)
                draw()
        ticker = asyncio.create_task(tick())
        try:
            timeout = None if deadline_s is None else max(0.0, deadline_s - (time.perf_counter() - t0))
            if waiters:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            end = time.perf_counter()
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()
            for w in waiters:
                w.cancel()
            ticker.cancel()
            await asyncio.gather(*tasks, *waiters, ticker, return_exceptions=True)
        if progress is not None:
            progress.close(counts["done"], counts["failed"], counts["in_flight"])
    sent = [r for r in results if r.sent_s is not None]
    interrupted = stop is not None and stop.is_set()
    for r in sent:
        if not r.ok and r.error in (None, "cancelled"):
            r.error = "unfinished when interrupted" if interrupted else "unfinished at the deadline"
    # Duration, as vLLM: from the start until the last request ended (or the run was cut short).
    dur = end - t0 if pending else max((r.sent_s + r.e2e for r in sent), default=end - t0)
    return RunOutcome(sent, dur, len(results) - len(sent), interrupted, bool(pending) and not interrupted)
