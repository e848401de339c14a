"""The naive baseline: Hugging Face transformers `generate()` behind a one-request-at-a-time server.

    python benchmarks/hf_server.py CKPT [--load-format dummy] [--port 8000] [--device cuda]

What a user might deploy without a serving engine: an aiohttp server that runs one
`model.generate()` at a time (batch 1, a lock around the model; later requests wait in
line) in a worker thread. It speaks just enough of the OpenAI API for `disagg bench`:

    POST /v1/completions   prompt: token ids (or text, with the checkpoint's tokenizer.json);
                           max_tokens, temperature, top_p, ignore_eos, stream, stream_options
    GET  /v1/models, /health, /stats (requests served and seconds spent in generate())

Streaming is real, token by token: a transformers streamer hands each new token from the
generate() thread to the event loop, which sends it as its own SSE chunk, so the client's
TTFT and ITL are the model's. `ignore_eos` sets min_new_tokens = max_tokens. A client that
disconnects stops its generate() at the next token (a stopping criterion).
--load-format dummy builds the model from config.json with random weights, on the device.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import uuid


def load_model(path: str, load_format: str, device: str, dtype: str):
    import torch
    import transformers
    torch_dtype = getattr(torch, dtype)
    if load_format == "dummy":
        cfg = transformers.AutoConfig.from_pretrained(path)
        torch.manual_seed(0)
        with torch.device(device):
            try:
                model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
            except TypeError:       # transformers 4.x names it torch_dtype
                model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch_dtype)
        model = model.to(device=device, dtype=torch_dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    return model.eval()


class HFServer:
    def __init__(self, model, tokenizer, name: str, device: str):
        self.model, self.tok, self.name, self.device = model, tokenizer, name, device
        self.lock = asyncio.Lock()           # one generate() at a time
        self.served = 0
        self.busy_s = 0.0

    def app(self):
        from aiohttp import web
        app = web.Application(client_max_size=64 * 2**20)
        async def health(request):
            return web.json_response({"status": "ok"})

        async def stats(request):
            return web.json_response({"requests": self.served, "busy_s": self.busy_s})

        async def models(request):
            return web.json_response({"object": "list", "data": [{"id": self.name, "object": "model",
                                                                   "owned_by": "hf"}]})
        app.router.add_get("/health", health)
        app.router.add_get("/stats", stats)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/completions", self.completions)
        return app

    def _error(self, status: int, msg: str):
        from aiohttp import web
        return web.json_response({"error": {"message": msg, "type": "invalid_request_error", "param": None,
                                            "code": None}}, status=status)

    def _text(self, tid: int) -> str:
        return self.tok.decode([tid]) if self.tok is not None else f" {tid}"

    async def completions(self, request):
        from aiohttp import web
        try:
            body = await request.json()
            prompt = body["prompt"]
            if isinstance(prompt, str):
                if self.tok is None:
                    return self._error(400, "this server has no tokenizer: send token ids")
                ids = self.tok.encode(prompt).ids
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                ids = prompt
            else:
                return self._error(400, "'prompt' must be a string or a list of token ids")
            max_tokens = int(body.get("max_tokens") or 16)
            temperature = float(body.get("temperature", 1.0))
            top_p = float(body.get("top_p", 1.0))
        except (ValueError, KeyError, TypeError) as e:
            return self._error(400, f"bad request: {e}")
        ignore_eos = bool(body.get("ignore_eos", False))
        stream = bool(body.get("stream", False))
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        rid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        resp = None
        if stream:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
        out: list[int] = []
        async with self.lock:
            gen = asyncio.ensure_future(asyncio.to_thread(
                self._generate, ids, max_tokens, temperature, top_p, ignore_eos, loop, q, cancelled))
            try:
                while True:
                    tid = await q.get()
                    if tid is None:
                        break
                    out.append(tid)
                    if stream:
                        chunk = {"id": rid, "object": "text_completion", "created": created, "model": self.name,
                                 "choices": [{"index": 0, "text": self._text(tid), "logprobs": None,
                                              "finish_reason": None}]}
                        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await gen
            finally:
                cancelled.set()               # client gone: generate() stops at its next token
                if not gen.done():
                    await asyncio.gather(gen, return_exceptions=True)
        reason = "length" if len(out) >= max_tokens else "stop"
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
        if not stream:
            return web.json_response({"id": rid, "object": "text_completion", "created": created, "model": self.name,
                                      "choices": [{"index": 0, "text": self.tok.decode(out) if self.tok else
                                                   "".join(self._text(t) for t in out),
                                                   "logprobs": None, "finish_reason": reason}], "usage": usage})
        end = {"id": rid, "object": "text_completion", "created": created, "model": self.name,
               "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}]}
        await resp.write(b"data: " + json.dumps(end).encode() + b"\n\n")
        if usage_wanted:
            await resp.write(b"data: " + json.dumps({"id": rid, "object": "text_completion", "created": created,
                                                     "model": self.name, "choices": [], "usage": usage}).encode()
                             + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _generate(self, ids, max_tokens, temperature, top_p, ignore_eos, loop, q, cancelled):
        """Runs in a worker thread: generate() with a streamer that posts each new token to `q`."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class Streamer(BaseStreamer):
            def __init__(self):
                self.prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:          # generate() first puts the prompt itself
                    self.prompt_seen = True
                    return
                for t in value.reshape(-1).tolist():
                    loop.call_soon_threadsafe(q.put_nowait, int(t))

            def end(self):
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        t0 = time.perf_counter()
        try:
            x = torch.tensor([ids], device=self.device)
            kw = dict(max_new_tokens=max_tokens, streamer=Streamer(), attention_mask=torch.ones_like(x),
                      stopping_criteria=StoppingCriteriaList([Cancelled()]),
                      pad_token_id=self.model.config.eos_token_id if isinstance(
                          self.model.config.eos_token_id, int) else 0)
            if ignore_eos:
                kw["min_new_tokens"] = max_tokens
            if temperature > 0:
                kw.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                self.model.generate(x, **kw)
        finally:
            self.busy_s += time.perf_counter() - t0
            self.served += 1
            loop.call_soon_threadsafe(q.put_nowait, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="checkpoint directory (config.json; weights unless --load-format dummy)")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None)
    args = ap.parse_args(argv)
    import torch
    from aiohttp import web
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    t0 = time.perf_counter()
    model = load_model(args.model, args.load_format, device, dtype)
    tok = None
    if os.path.exists(os.path.join(args.model, "tokenizer.json")):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    print(f"HF transformers {__import__('transformers').__version__}: {name} on {device} ({dtype}) in "
          f"{time.perf_counter() - t0:.1f}s; serving http://{args.host}:{args.port}/v1 one request at a time",
          flush=True)
    web.run_app(HFServer(model, tok, name, device).app(), host=args.host, port=args.port, print=None,
                access_log=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
