"""aiohttp server with the OpenAI routes, over an engine that yields RequestOutputs.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /health, GET /metrics. Every error leaves as an OpenAI error object.

A request's life here: parse -> tokenize (in a thread: prompts may be megabytes) ->
engine.generate() per choice -> JSON, or SSE chunks as tokens arrive. A client that
goes away cancels the handler; the engine stream's `finally` aborts the request and
frees its KV.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from disagg.engine.async_engine import AsyncEngine, EngineDeadError, RequestRejectedError
from disagg.model.tokenizer import ChatTemplateError, Tokenizer
from router import openai_api as oa
from router.metrics import Metrics

MAX_BODY_BYTES = 64 * 2**20


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _strict_json(text: str):
    """json.loads without NaN / Infinity (Python accepts them; JSON does not)."""
    return json.loads(text, parse_constant=_no_constants)


@dataclass
class _Ctx:
    """One HTTP request's bookkeeping across its n choices."""
    rid: str
    text: str
    prompt_tokens: int
    predicted: float | None
    unqueue: int = 0


class Server:
    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, max_model_len: int,
                 api_key: str | None = None, predictor=None, max_queued_requests: int = 1024,
                 max_queued_tokens: int = 1 << 22, request_log: str | None = None):
        """predictor: router.predictor.LengthPredictor (None: no prediction; requests carry max_tokens).
        Queue bounds count requests accepted but not yet given their first token: past either,
        new requests get 429 with Retry-After. request_log: a JSONL file, one line per finished
        choice (prompt text included: `disagg predictor train --log FILE` learns from it)."""
        self.engine = engine
        self.predictor = predictor
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.queued_requests = 0
        self.queued_tokens = 0
        self._log = open(request_log, "a", buffering=1) if request_log else None
        self.tok = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.metrics = Metrics(model_name)
        if hasattr(engine, "transfer"):      # disaggregated: workers report KV-transfer totals
            self.metrics.add_transfer_source(lambda: engine.transfer)
        if hasattr(engine, "hops"):          # disaggregated: where the time to first token goes
            engine.hops.observe = self.metrics.observe_phase
        if hasattr(engine, "prefix_cache_stats"):   # both engines; not the HTTP tests' fake
            self.metrics.add_prefix_cache_source(engine.prefix_cache_stats)
        self.created = int(time.time())
        self.draining = False      # SIGTERM: stop accepting, finish what is in flight
        self.in_flight = 0         # generation requests accepted and not yet answered

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors_mw, self._auth_mw])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_route)
        return app

    @web.middleware
    async def _errors_mw(self, request: web.Request, handler):
        try:
            return await handler(request)
        except oa.APIError as e:
            return self._error(e)
        except web.HTTPException as e:   # aiohttp's own (404 route, 405, 413): same error shape
            if e.status < 400:
                raise
            type_ = "invalid_request_error" if e.status < 500 else "server_error"
            return self._error(oa.APIError(e.status, e.reason or e.text or "error", type_))
        except RequestRejectedError as e:
            return self._error(oa.bad(str(e)))
        except EngineDeadError as e:
            return self._error(oa.APIError(503, str(e), "server_error", headers={"Retry-After": "5"}))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # noqa: BLE001 - the contract is an error object, never a bare 500 page
            return self._error(oa.APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    def _error(self, e: oa.APIError) -> web.Response:
        self.metrics.errors.labels(self.model_name, str(e.status)).inc()
        return web.json_response(e.body(), status=e.status, headers=e.headers)

    @web.middleware
    async def _auth_mw(self, request: web.Request, handler):
        if self.api_key and request.path.startswith("/v1"):
            got = request.headers.get("Authorization", "")
            token = got[7:] if got.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                raise oa.APIError(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")
        return await handler(request)

    # ------------------------------------------------------------------ simple routes
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "disagg",
            "max_model_len": self.max_model_len}]})

    def begin_drain(self) -> None:
        """Shutdown, step 1: new generation requests get 503 and /health says draining; requests
        in flight run to their end (the caller waits for in_flight == 0, then stops)."""
        self.draining = True

    async def health(self, request: web.Request) -> web.Response:
        workers = {"workers": self.engine.worker_status()} if hasattr(self.engine, "worker_status") else {}
        if not self.engine.healthy:
            return web.json_response({"status": "unhealthy", "error": self.engine.error, **workers}, status=503)
        if self.draining:
            return web.json_response({"status": "draining", **workers}, status=503)
        return web.json_response({"status": "ok", **workers})

    async def metrics_route(self, request: web.Request) -> web.Response:
        st = self.engine.stats
        self.metrics.running.set(st.num_running)
        self.metrics.waiting.set(st.num_waiting)
        self.metrics.kv_usage.set(st.kv_cache_usage)
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    # ------------------------------------------------------------------ generation routes
    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json(loads=_strict_json)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
            raise oa.bad("request body is not valid JSON") from None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise oa.APIError(404, f"The model `{model}` does not exist.", "invalid_request_error", "model",
                              "model_not_found")

    def _fit(self, prompt_ids: list[int], parsed: oa.ParsedRequest, param: str):
        n = len(prompt_ids)
        if n == 0:
            raise oa.bad("the prompt is empty", param)
        room = self.max_model_len - n
        if room <= 0 or (parsed.max_tokens_given and parsed.params.max_tokens > room):
            want = n + (parsed.params.max_tokens if parsed.max_tokens_given else 0)
            raise oa.bad(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                         f"requested {want} tokens ({n} in the {param}, "
                         f"{parsed.params.max_tokens if parsed.max_tokens_given else 0} in the completion). "
                         f"Please reduce the length of the {param} or completion.", param, "context_length_exceeded")
        if not parsed.max_tokens_given:
            parsed.params = replace(parsed.params, max_tokens=room)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        parsed = oa.parse_common(body, chat=True)
        self._check_model(parsed.model)
        msgs = oa.parse_messages(body)
        try:
            prompt_ids = await asyncio.to_thread(self.tok.encode_chat, msgs, True)
        except ChatTemplateError as e:
            raise oa.bad(str(e), "messages") from None
        self._fit(prompt_ids, parsed, "messages")
        text = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), msgs[-1]["content"])
        return await self._generate(request, prompt_ids, parsed, chat=True, text=text)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        parsed = oa.parse_common(body, chat=False)
        self._check_model(parsed.model)
        prompt = oa.parse_prompt(body)
        if isinstance(prompt, str):
            prompt_ids = await asyncio.to_thread(self.tok.encode, prompt, True)
        else:
            if max(prompt) >= self.tok.vocab_size or min(prompt) < 0:
                raise oa.bad("prompt token ids must be within the vocabulary", "prompt")
            prompt_ids = prompt
        self._fit(prompt_ids, parsed, "prompt")
        return await self._generate(request, prompt_ids, parsed, chat=False,
                                    text=prompt if isinstance(prompt, str) else self.tok.decode(prompt))

    def _choice_params(self, parsed: oa.ParsedRequest, i: int):
        p = parsed.params
        return p if p.seed is None or i == 0 else replace(p, seed=p.seed + i)

    def _tok_str(self, tid: int) -> str:
        return self.tok.decode([tid], skip_special_tokens=False)

    async def _generate(self, request, prompt_ids, parsed: oa.ParsedRequest, chat: bool, text: str = ""):
        if self.draining:
            raise oa.APIError(503, "The server is shutting down; retry on another replica.", "server_error",
                              headers={"Retry-After": "5"})
        self.in_flight += 1
        try:
            return await self._generate_counted(request, prompt_ids, parsed, chat, text)
        finally:
            self.in_flight -= 1

    async def _generate_counted(self, request, prompt_ids, parsed: oa.ParsedRequest, chat: bool, text: str):
        n_tok = len(prompt_ids) * parsed.n
        if (self.queued_requests + parsed.n > self.max_queued_requests
                or self.queued_tokens + n_tok > self.max_queued_tokens):
            raise oa.APIError(429, "The server is busy: too many requests are waiting. Retry shortly.",
                              "rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"})
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        self.metrics.prompt_tokens.inc(n_tok)
        pred = None
        if self.predictor is not None:
            pred = float(self.predictor.predict(text, len(prompt_ids)))
            pred = min(pred, parsed.params.max_tokens)
        ctx = _Ctx(rid, text, len(prompt_ids), pred)
        self.queued_requests += parsed.n
        self.queued_tokens += n_tok
        ctx.unqueue = parsed.n
        try:
            if parsed.stream:
                return await self._stream(request, rid, prompt_ids, parsed, chat, ctx)
            t0 = time.monotonic()
            results = await asyncio.gather(*[self._collect(prompt_ids, self._choice_params(parsed, i), t0, ctx)
                                             for i in range(parsed.n)])
        finally:
            self._unqueue(ctx, ctx.unqueue)
        choices, completion_tokens = [], 0
        for i, (text, n_out, reason, lps) in enumerate(results):
            completion_tokens += n_out
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": oa.chat_logprobs(lps, self._tok_str) if parsed.echo_logprobs else None,
                                "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "finish_reason": reason,
                                "logprobs": oa.completion_logprobs(lps, self._tok_str) if parsed.echo_logprobs
                                else None})
        make = oa.chat_response if chat else oa.completion_response
        return web.json_response(make(rid, self.model_name, choices, len(prompt_ids), completion_tokens))

    def _unqueue(self, ctx: "_Ctx", n: int) -> None:
        n = min(n, ctx.unqueue)
        if n > 0:
            ctx.unqueue -= n
            self.queued_requests -= n
            self.queued_tokens -= n * ctx.prompt_tokens

    def _finished(self, ctx: "_Ctx", out, t0: float, now: float, first: float | None) -> None:
        if ctx.predicted is not None:
            self.metrics.predictor_error.observe(abs(ctx.predicted - out.num_output_tokens))
        if self._log is not None:
            self._log.write(json.dumps({
                "time": time.time(), "request_id": ctx.rid, "prompt": ctx.text, "prompt_tokens": ctx.prompt_tokens,
                "response_tokens": out.num_output_tokens,
                "finish_reason": out.finish_reason.value if out.finish_reason else None,
                "predicted_len": ctx.predicted, "ttft_s": None if first is None else first - t0,
                "e2e_s": now - t0}, ensure_ascii=False) + "\n")

    async def _outputs(self, prompt_ids, params, t0: float, ctx: "_Ctx"):
        """One choice's engine outputs, with the bookkeeping every route needs: latency metrics,
        leaving the admission queue at the first token, the request log at the end."""
        last = first = None
        async for out in self.engine.generate(prompt_ids, params, uuid.uuid4().hex, ctx.predicted):
            now = time.monotonic()
            self._observe_token(out, t0, last, now)
            if first is None and (out.new_token_ids or out.finished):
                first = now
                self._unqueue(ctx, 1)
            if out.finished:
                self._finished(ctx, out, t0, now, first)
            last = now
            yield out

    async def _collect(self, prompt_ids, params, t0, ctx: "_Ctx"):
        text, n_out, reason, lps = [], 0, None, []
        async for out in self._outputs(prompt_ids, params, t0, ctx):
            text.append(out.new_text)
            n_out = out.num_output_tokens
            for tid, lp in zip(out.new_token_ids, out.new_logprobs):
                lps.append((tid, lp[0], lp[1]))
            reason = out.finish_reason.value if out.finish_reason else None
        return "".join(text), n_out, reason, lps

    def _observe_token(self, out, t0, last, now) -> None:
        if out.new_token_ids:
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            if last is None:
                self.metrics.ttft.observe(now - t0)
            else:
                self.metrics.itl.observe(now - last)
        if out.finished:
            self.metrics.e2e.observe(now - t0)
            self.metrics.finished(out.finish_reason.value)

    async def _stream(self, request, rid, prompt_ids, parsed: oa.ParsedRequest, chat: bool, ctx: "_Ctx"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        t0 = time.monotonic()
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int):
            try:
                async for out in self._outputs(prompt_ids, self._choice_params(parsed, i), t0, ctx):
                    await q.put((i, out))
            except Exception as e:  # noqa: BLE001 - reported in-stream
                await q.put((i, e))

        async def send(obj) -> None:
            await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

        tasks = [asyncio.create_task(pump(i)) for i in range(parsed.n)]
        try:
            if chat:
                for i in range(parsed.n):
                    await send(oa.chat_chunk(rid, self.model_name, created, i, {"role": "assistant", "content": ""}))
            open_, completion_tokens = parsed.n, 0
            while open_:
                i, out = await q.get()
                if isinstance(out, Exception):
                    open_ -= 1
                    await send(oa.APIError(500, str(out), "server_error").body())
                    continue
                reason = out.finish_reason.value if out.finish_reason else None
                lps = [(t, lp[0], lp[1]) for t, lp in zip(out.new_token_ids, out.new_logprobs)]
                if chat:
                    lp = oa.chat_logprobs(lps, self._tok_str) if parsed.echo_logprobs and lps else None
                    if out.new_text or reason or lp:
                        await send(oa.chat_chunk(rid, self.model_name, created, i,
                                                 {"content": out.new_text} if out.new_text else {}, reason, lp))
                else:
                    lp = oa.completion_logprobs(lps, self._tok_str) if parsed.echo_logprobs and lps else None
                    if out.new_text or reason or lp:
                        await send(oa.completion_chunk(rid, self.model_name, created, i, out.new_text, reason, lp))
                if out.finished:
                    open_ -= 1
                    completion_tokens += out.num_output_tokens
            if parsed.include_usage:
                await send({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": self.model_name, "choices": [],
                            "usage": oa.usage(len(prompt_ids), completion_tokens)})
            await resp.write(b"data: [DONE]\n\n")
        finally:
            for t in tasks:    # client gone or error: cancelling the pumps aborts their requests
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return resp
