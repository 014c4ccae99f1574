"""A client's request as the engine holds it: one prompt and the n sequences generated
from it, each with its detokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from kubellm.runtime.core.detokenizer import IncrementalDetokenizer
from kubellm.runtime.core.sequence import Sequence


@dataclass
class Request:
    request_id: str
    prompt: str | None  # as sent, when it was text
    prompt_token_ids: list[int]
    sequences: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
