"""The OpenAI contract: request validation, error objects, response and chunk shapes.

Pure functions over JSON-like dicts; the server wires them to HTTP. Unknown fields
are accepted and ignored (clients send many); a wrong type or range is a 400 with
the offending field in `param`.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from disagg.request import SamplingParams

MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def _num(body: dict, key: str, default, lo=None, hi=None, integer=False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(f"'{key}' must be {'an integer' if integer else 'a number'}", key)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(f"'{key}' must be a finite number", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean", key)
    return v


@dataclass
class ParsedRequest:
    model: str | None
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    max_tokens_given: bool
    echo_logprobs: bool          # chat `logprobs: true` / completions `logprobs: k`


def parse_common(body: Any, chat: bool) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    mt = body.get("max_completion_tokens") if chat else None
    key = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = _num(body, key, None, 1, 1 << 31, integer=True)
    temperature = _num(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("'top_p' must be greater than 0", "top_p")
    top_k = _num(body, "top_k", 0, -1, 1 << 20, integer=True)
    n = _num(body, "n", 1, 1, MAX_N, integer=True)
    seed = _num(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} sequences", "stop")
    if any(not s for s in stop):
        raise bad("'stop' sequences must be non-empty", "stop")
    if chat:
        want_lp = _bool(body, "logprobs")
        top_lp = _num(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        if top_lp and not want_lp:
            raise bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
        logprobs = top_lp if want_lp else None
    else:
        lp = _num(body, "logprobs", None, 0, 5, integer=True)
        want_lp, logprobs = lp is not None, lp
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = bool(so and so.get("include_usage"))
    cache_salt = body.get("cache_salt")       # vLLM's extra: requests with different salts share no cached KV
    if cache_salt is not None and (not isinstance(cache_salt, str) or not 0 < len(cache_salt) <= 256):
        raise bad("'cache_salt' must be a non-empty string of at most 256 characters", "cache_salt")
    params = SamplingParams(
        max_tokens=max_tokens or 1, temperature=float(temperature), top_p=float(top_p),
        top_k=max(top_k, 0), seed=seed, stop=stop, ignore_eos=_bool(body, "ignore_eos"), logprobs=logprobs,
        cache_salt=cache_salt)
    return ParsedRequest(model, params, n, stream, include_usage, max_tokens is not None, want_lp)


def parse_messages(body: dict) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role'", "messages")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise bad(f"messages[{i}].role {m['role']!r} is not one of system, user, assistant, tool", "messages")
        content = m.get("content")
        if isinstance(content, list):   # content parts: keep the text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def parse_prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, str):
        return p
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        return p[0]
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise bad("'prompt' must be a string or a list of token ids (batched prompts: send one request each)",
              "prompt")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries: list, tok_str) -> dict[str, Any]:
    """entries: [(chosen_id, logprob, [(id, logprob), ...])]."""
    content = []
    for tid, lp, top in entries:
        s = tok_str(tid)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": tok_str(i), "logprob": v, "bytes": list(tok_str(i).encode())}
                                         for i, v in top]})
    return {"content": content}


def completion_logprobs(entries: list, tok_str) -> dict[str, Any]:
    return {"tokens": [tok_str(t) for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{tok_str(i): v for i, v in top} for _, _, top in entries],
            "text_offset": []}


def chat_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason=None,
               logprobs=None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def completion_response(rid: str, model: str, choices: list[dict], prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason=None,
                     logprobs=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
