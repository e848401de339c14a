"""`disagg chat`: a terminal chat client for an OpenAI-compatible server (stdlib only).

    disagg chat                                   # http://127.0.0.1:8000/v1, the server's first model
    disagg chat --url http://host:8000/v1 --model NAME --system "Be brief." --temperature 0.7
    disagg chat --prompt "Hello"                  # one turn, printed as it streams, then exit

Keeps the conversation, streams each reply as it arrives (SSE), and prints server errors
as one line on stderr. Ctrl-C during a reply stops it (closing the connection aborts the
request on the server) and keeps what was shown; Ctrl-C or Ctrl-D at the prompt quits.
At the prompt, /reset forgets the conversation and /exit quits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator

DEFAULT_URL = "http://127.0.0.1:8000/v1"


class ChatError(Exception):
    """A failure to show the user as one line: a server error object, an unreachable server."""


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self.base = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        host = urllib.parse.urlsplit(self.base).hostname or ""
        # a loopback server is never reached through an http_proxy from the environment
        handlers = [urllib.request.ProxyHandler({})] if host in ("localhost", "127.0.0.1", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)

    def _open(self, path: str, body: dict | None = None):
        headers = {"Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            return self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise ChatError(f"{_error_message(e.read())} (HTTP {e.code})") from None
        except urllib.error.URLError as e:
            raise ChatError(f"cannot reach {self.base}: {e.reason}") from None
        except OSError as e:
            raise ChatError(f"cannot reach {self.base}: {e}") from None

    def first_model(self) -> str:
        with self._open("/models") as r:
            try:
                data = json.loads(r.read())["data"]
                return data[0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise ChatError(f"{self.base}/models lists no model; pass --model") from None

    def stream_chat(self, body: dict) -> Iterator[str]:
        """Yield the reply's text pieces as the server streams them."""
        resp = self._open("/chat/completions", {**body, "stream": True})
        try:
            for data in _sse_events(resp):
                if data == "[DONE]":
                    return
                try:
                    obj = json.loads(data)
                except ValueError:
                    raise ChatError(f"malformed stream event: {data[:200]!r}") from None
                if isinstance(obj, dict) and "error" in obj:
                    raise ChatError(_error_message(data.encode()))
                for ch in obj.get("choices") or ():
                    piece = (ch.get("delta") or {}).get("content")
                    if piece and ch.get("index", 0) == 0:
                        yield piece
            raise ChatError("the stream ended before [DONE] (server went away?)")
        except OSError as e:   # a socket timeout or reset mid-stream
            raise ChatError(f"connection lost: {e}") from None
        finally:
            resp.close()


def _sse_events(resp) -> Iterator[str]:
    """The `data:` payloads of a server-sent-event stream, one per event."""
    lines: list[str] = []
    for raw in resp:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw)["error"]
        return str(err.get("message") or err) if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", errors="replace").strip()
        return text[:500] or "empty response"


def build_parser(prog: str = "disagg chat") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Chat with an OpenAI-compatible server in the terminal.")
    add_chat_args(ap)
    return ap


def add_chat_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--url", default=DEFAULT_URL, help=f"the server's /v1 base URL (default {DEFAULT_URL})")
    ap.add_argument("--model", default=None, help="model name (default: the first one the server lists)")
    ap.add_argument("--system", default=None, help="a system message to start the conversation with")
    ap.add_argument("--api-key", default=None, help="bearer token (default: $DISAGG_API_KEY)")
    ap.add_argument("--temperature", type=float, default=None, help="sampling temperature (server default: 1)")
    ap.add_argument("--max-tokens", type=int, default=None, help="most tokens per reply (default: up to the context)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait on the server (default 600)")
    ap.add_argument("--prompt", default=None, help="send this one message, print the reply, exit")


def _turn(client: Client, body: dict, out) -> str:
    """Stream one reply to `out`; returns its text. KeyboardInterrupt keeps what was shown."""
    pieces: list[str] = []
    try:
        for piece in client.stream_chat(body):
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except ChatError:
        if pieces:
            out.write("\n")
        raise
    except KeyboardInterrupt:
        out.write("\n")
        print("[stopped]", file=sys.stderr)
        return "".join(pieces)
    out.write("\n")
    out.flush()
    return "".join(pieces)


def run(args) -> int:
    client = Client(args.url, args.api_key or os.environ.get("DISAGG_API_KEY"), args.timeout)
    try:
        model = args.model or client.first_model()
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    base: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    params: dict = {"model": model}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens

    if args.prompt is not None:            # one turn, for scripts and tests
        try:
            _turn(client, {**params, "messages": history + [{"role": "user", "content": args.prompt}]}, sys.stdout)
        except ChatError as e:
            sys.stdout.flush()
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print(f"Chatting with {model} at {client.base}. Ctrl-C stops a reply; Ctrl-D or /exit quits; "
              "/reset forgets the conversation.", file=sys.stderr)
    while True:
        try:
            text = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            return 0
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return 0
        if cmd == "/reset":
            history = list(base)
            print("[conversation cleared]", file=sys.stderr)
            continue
        turn = history + [{"role": "user", "content": text}]
        try:
            reply = _turn(client, {**params, "messages": turn}, sys.stdout)
        except ChatError as e:
            sys.stdout.flush()
            print(f"error: {e}", file=sys.stderr)
            continue                        # the failed turn is not kept
        history = turn + [{"role": "assistant", "content": reply}]


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
