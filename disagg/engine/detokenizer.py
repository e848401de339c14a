"""Incremental detokenization and stop strings.

Decoding token by token breaks multi-byte characters and merges; so each step decodes
a short window (`prefix_offset:`) and emits only the part past `read_offset` once it
no longer ends in a partial character. Stop strings are searched in the text; the
last (longest stop - 1) characters are held back from the stream until they can no
longer begin a stop string.
"""
from __future__ import annotations

from disagg.model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.ids: list[int] = []
        tail = prompt_ids[-4:]           # context so the first word's spacing decodes right
        self.ids.extend(tail)
        self.prefix_offset = 0
        self.read_offset = len(tail)
        self.text = ""                  # output text so far (stop string cut off)
        self.emitted = 0                # characters of `text` already streamed
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Append a token; may set `stopped` when a stop string appears."""
        if self.stopped:
            return
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._append(full[len(prefix):])

    def _append(self, new: str) -> None:
        """Extend `text`; cut it at the earliest stop string that the new characters complete."""
        start = max(len(self.text) - self.holdback, 0)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def flush(self) -> None:
        """At the end: emit a trailing partial character as the tokenizer renders it."""
        if self.stopped or self.read_offset == len(self.ids):
            return
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        self.read_offset = len(self.ids)
        self._append(full[len(prefix):])     # a stop string may sit before the partial character

    def delta(self, final: bool) -> str:
        """Text not yet streamed; holds back a possible stop-string prefix unless final."""
        end = len(self.text) if (final or self.stopped) else max(len(self.text) - self.holdback, self.emitted)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
