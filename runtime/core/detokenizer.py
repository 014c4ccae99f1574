"""Incremental detokenization with stop strings.

Text grows one token at a time through the tokenizer's own streaming decoder, so
a UTF-8 character split across tokens is never emitted half-done. Stop strings
are searched in the text; text that could still be the start of a stop string
is held back, so a stop string never leaks out, not even in a stream.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str], skip_special_tokens: bool) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = stop
        self._hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._emitted = 0

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token's text; return the stop string if the text now contains one
        (the text is then cut just before it)."""
        piece = self._stream.step(self._backend, token_id)
        if not piece or not check_stop:
            if piece:
                self.text += piece
            return None
        search_from = max(0, len(self.text) - self._hold_back)
        self.text += piece
        found = [
            (at, stop) for stop in self._stop if (at := self.text.find(stop, search_from)) >= 0
        ]
        if not found:
            return None
        at, stop = min(found)
        self.text = self.text[:at]
        return stop

    def take_delta(self, finished: bool) -> str:
        """The text not yet handed out, keeping back what might begin a stop string."""
        end = len(self.text) if finished else max(self._emitted, len(self.text) - self._hold_back)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
