"""Structured output: the request's grammar, compiled once (xgrammar, vLLM's default
backend), a matcher per sequence, and the batch's token bitmask.

Compiling is cached by the grammar's text and runs where the caller runs it (the HTTP
layer: a worker thread, never the engine's step thread). Each constrained sequence keeps
its own `GrammarMatcher`, advanced by every token it accepts; since a preempted request
keeps its output tokens, its matcher needs no replay. The sampler masks the logits of
the rows that have a matcher, in one call for the batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import torch

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to: a JSON schema (as JSON text), any JSON
    object, a regex, one of a list of strings (as JSON text), or an EBNF grammar."""

    kind: GrammarKind
    text: str = ""

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:
        return cls("json", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def choice(cls, options: list[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(options)))


class GrammarCompiler:
    """One per engine: the tokenizer's vocabulary as xgrammar sees it is built once."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=True)
        self.vocab_size = vocab_size

    def compile(self, spec: GrammarSpec):
        """The compiled grammar (cached by its text); ValueError saying why for one that
        cannot be compiled."""
        try:
            if spec.kind == "json":
                return self._compiler.compile_json_schema(spec.text)
            if spec.kind == "json_object":  # OpenAI's JSON mode: an object, not any value
                return self._compiler.compile_json_schema('{"type": "object"}')
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.text)
            if spec.kind == "choice":
                options = json.loads(spec.text)
                if not options:
                    raise ValueError("choice needs at least one option")
                rule = " | ".join(json.dumps(option) for option in options)
                return self._compiler.compile_grammar(f"root ::= {rule}")
            return self._compiler.compile_grammar(spec.text)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"the {spec.kind} constraint cannot be compiled: {reason}") from None

    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)

    def mask(self, logits: torch.Tensor, matchers: dict[int, Any]) -> None:
        """Logits of row i (a key of `matchers`) keep only the tokens its grammar allows."""
        if not matchers:
            return
        bitmask = self._xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        for row, matcher in matchers.items():
            matcher.fill_next_token_bitmask(bitmask, row)
        self._xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device), indices=sorted(matchers)
        )
