"""The real router.server.Server on a loopback port, in a thread with its own event loop, over any
engine with the AsyncEngine interface (an AsyncEngine around an LLMEngine, or router.fake_engine's
FakeEngine). Shared by the HTTP tests."""
from __future__ import annotations

import asyncio
import socket
import threading

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """The real Server over `make_aeng()` (an AsyncEngine or a FakeEngine), in a thread with its own loop."""

    def __init__(self, make_aeng, tokenizer, max_model_len: int, engine=None, name: str = MODEL,
                 api_key: str | None = None):
        self.make_aeng, self.tok, self.max_model_len, self.engine, self.name = (
            make_aeng, tokenizer, max_model_len, engine, name)
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from aiohttp import web

        from router.server import Server
        asyncio.set_event_loop(self.loop)

        async def start():
            self.aeng = self.make_aeng()
            self.aeng.start()
            self.server = Server(self.aeng, self.tok, self.name, self.max_model_len, api_key=self.api_key)
            self.runner = web.AppRunner(self.server.app(), handler_cancellation=True, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(60)
        return self

    def __exit__(self, *exc):
        async def stop():
            await self.runner.cleanup()
            self.aeng.stop()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
