"""Driving a DisaggEngine from a test: one request's end, and a batch of them."""
from __future__ import annotations

import asyncio
import uuid


async def collect(eng, prompt, params) -> tuple[str, object]:
    """One request: ("ok", its tokens) or ("error", message) (a clean error is an acceptable end)."""
    toks = []
    try:
        async for out in eng.generate(prompt, params, uuid.uuid4().hex):
            toks.extend(out.new_token_ids)
            if out.finished:
                return "ok", toks
        return "error", "stream ended without a finish"
    except Exception as e:  # noqa: BLE001 - reported to the test
        return "error", f"{type(e).__name__}: {e}"


async def run_requests(eng, prompts, params, chaos=None, timeout: float = 120.0) -> list[tuple[str, object]]:
    """Every request at once (with `chaos()` beside them); asserts none hangs past `timeout`."""
    tasks = [asyncio.ensure_future(collect(eng, p, sp)) for p, sp in zip(prompts, params)]
    if chaos is not None:
        await chaos()
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    assert not pending, f"{len(pending)} requests hung"
    return [t.result() for t in tasks]


def generate_all(eng, prompts, params, timeout: float = 120.0) -> list[list[int]]:
    """Start the engine, run the requests, stop its tasks; each request's tokens (errors fail the test)."""
    async def main():
        eng.start()
        try:
            res = await run_requests(eng, prompts, params, timeout=timeout)
        finally:
            for t in eng._tasks:
                t.cancel()
        bad = [r for r in res if r[0] != "ok"]
        assert not bad, bad[:3]
        return [toks for _, toks in res]
    return asyncio.run(main())
