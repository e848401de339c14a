"""Async front of the colocated engine: the step loop runs in one thread of its own.

    HTTP handler ──submit(cmd)──▶ command queue ──▶ engine thread: add/abort, step()
         ▲                                                   │
         └──── asyncio.Queue per request ◀──call_soon_threadsafe(outputs)

Only the engine thread touches the engine. A request ends exactly once: finished,
aborted (client gone), or failed (engine error: every request gets the error and
`healthy` turns False so /health reports 503).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import AsyncIterator

from disagg.engine.llm_engine import LLMEngine
from disagg.request import RequestOutput, SamplingParams


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int


class EngineDeadError(RuntimeError):
    pass


class RequestRejectedError(ValueError):
    """The engine refused a request (it can never fit): a client error, not a server failure."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cmds: queue.Queue = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: str | None = None
        self.stats = EngineStats(0, 0, 0.0, engine.block_manager.num_blocks)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def prefix_cache_stats(self) -> list[dict]:
        """Prefix-cache counters for /metrics (ints written by the engine thread, read as they are)."""
        pc = self.engine.scheduler.prefix_stats
        return [{"worker": 0, "role": "colocated", "queries": pc.queries, "hits": pc.hits}]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ API
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       predicted_len: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes. Cancelling the consumer aborts it."""
        if not self.healthy:
            raise EngineDeadError(self.error or "engine is not running")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        fut = self._loop.create_future()
        self._cmds.put(("add", request_id, prompt_ids, params, fut, predicted_len))
        done = False
        try:
            await fut                      # raises ValueError if the engine refused the request
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    done = True            # the engine already dropped it
                    raise out
                done = out.finished
                yield out
                if done:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not done:                   # consumer cancelled or closed early: free its KV
                self._cmds.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, rid: str, item) -> None:
        q = self._streams.get(rid)
        if q is not None:
            q.put_nowait(item)

    def _post(self, fn, *args) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def _apply(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, ids, params, fut, pred = cmd
            try:
                self.engine.add_request(ids, params, request_id=rid, predicted_len=pred)
            except ValueError as e:
                err = RequestRejectedError(str(e))
                self._post(lambda f=fut, e=err: f.done() or f.set_exception(e))
                return
            self._post(lambda f=fut: f.done() or f.set_result(None))
        elif kind == "abort":
            self.engine.abort(cmd[1])

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                block = not eng.has_unfinished()
                try:
                    cmd = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
                    while cmd is not None:
                        self._apply(cmd)
                        cmd = self._cmds.get_nowait()
                except queue.Empty:
                    pass
                if self._stop.is_set():
                    break
                if eng.has_unfinished():
                    for out in eng.step():
                        self._post(self._deliver, out.request_id, out)
                sch = eng.scheduler
                self.stats = EngineStats(sch.num_running, sch.num_waiting, eng.block_manager.usage,
                                         eng.block_manager.num_blocks)
        except Exception as e:  # fatal: fail every request, report unhealthy
            self.error = f"engine failed: {type(e).__name__}: {e}"
            traceback.print_exc()
            err = EngineDeadError(self.error)
            for rid in list(eng.requests):
                eng.abort(rid)
            self._post(self._fail_all, err)
        finally:
            for rid in list(eng.requests):   # shutting down: nothing stays allocated
                eng.abort(rid)

    def _fail_all(self, err: BaseException) -> None:
        for rid in list(self._streams):
            self._deliver(rid, err)

