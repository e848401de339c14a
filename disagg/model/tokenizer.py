"""Tokenizer and chat template of a Hugging Face checkpoint directory.

Text <-> ids through the `tokenizers` library (tokenizer.json). The chat template is
the checkpoint's own (`chat_template.jinja`, or `chat_template` in
tokenizer_config.json), rendered in a sandboxed Jinja environment: templates are
data from a checkpoint, never code we trust, and clients can never supply one.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def _token_str(t: Any) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t


def _raise(msg: str):
    raise TemplateError(msg)


class ChatTemplateError(ValueError):
    pass


class Tokenizer:
    def __init__(self, model_dir: str):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{model_dir!r} has no tokenizer.json")
        self._tok = HFTokenizer.from_file(path)
        cfg: dict[str, Any] = {}
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        if isinstance(template, list):   # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if os.path.exists(jinja_path):
            with open(jinja_path) as f:
                template = f.read()
        self.chat_template: str | None = template
        self._compiled = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(template)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {t.id if hasattr(t, "id") else i for i, t in self._added_tokens() if t.special}

    def _added_tokens(self):
        return list(self._tok.get_added_tokens_decoder().items())

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 16384:   # encode_batch releases the GIL; encode would stall the event loop
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        if self._compiled is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         **kwargs)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template rejected the conversation: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        # The template writes its own special tokens (bos included), as HF's apply_chat_template does.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)
