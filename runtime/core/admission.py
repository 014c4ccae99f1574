"""Admission: a request checked once, before anything is queued.

`Admission.admit` tokenizes the prompts, checks them against the vocabulary and the
context length, checks the logit bias, and compiles the output grammar; what it returns
is what `LLMEngine.add_request` takes, which checks nothing again. It is pure (it changes
no engine state) and thread-safe, so the HTTP layer runs it on a worker thread, off the
event loop and the step thread (a new JSON schema can take a while to compile). A bad
request raises one `AdmissionError`, naming the parameter at fault as OpenAI's errors do.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubellm.runtime.core.sampling_params import SamplingParams
from kubellm.runtime.core.structured_output import GrammarCompiler


class AdmissionError(ValueError):
    """A request the engine cannot take; `param` names the request field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Admitted:
    """One prompt of an admitted request: what `LLMEngine.add_request` queues."""

    token_ids: list[int]
    text: str | None  # the prompt as sent, when it was text
    params: SamplingParams
    grammar: Any = None  # params.structured_output, compiled


class Admission:
    def __init__(
        self, tokenizer: Any, vocab_size: int, max_model_len: int, grammars: GrammarCompiler
    ) -> None:
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.grammars = grammars
        # A fast tokenizer sets its truncation state on each call: one call at a time.
        self._tokenizing = threading.Lock()

    def admit(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams,
        *,
        add_special_tokens: bool = True,
        whole_reply_fits: bool = False,
        constraint_param: str = "structured_outputs",
    ) -> list[Admitted]:
        """Each prompt (text, or token ids) checked with `params`. `whole_reply_fits`:
        refuse a prompt whose `max_tokens` would run past the context (the HTTP API,
        as vLLM's does), instead of stopping it there. `constraint_param`: the request
        field that carried `params.structured_output`, named when it cannot compile."""
        token_ids = [self._token_ids(p, add_special_tokens) for p in prompts]
        for ids in token_ids:
            self._check_prompt(ids, params.max_tokens if whole_reply_fits else None)
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in params.logit_bias):
            raise AdmissionError(f"logit_bias keys must be token ids in [0, {vocab})", "logit_bias")
        grammar = None
        if params.structured_output is not None:
            try:
                grammar = self.grammars.compile(params.structured_output)
            except ValueError as exc:
                raise AdmissionError(str(exc), constraint_param) from None
        texts = [p if isinstance(p, str) else None for p in prompts]
        return [Admitted(ids, text, params, grammar) for ids, text in zip(token_ids, texts)]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._tokenizing:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _token_ids(self, prompt: str | list[int], add_special_tokens: bool) -> list[int]:
        return (
            self.tokenize(prompt, add_special_tokens) if isinstance(prompt, str) else list(prompt)
        )

    def _check_prompt(self, token_ids: list[int], max_tokens: int | None) -> None:
        if not token_ids:
            raise AdmissionError("the prompt must not be empty", "prompt")
        vocab = self.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise AdmissionError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        self._check_context(len(token_ids), max_tokens)

    def _check_context(self, prompt_tokens: int, max_tokens: int | None) -> None:
        """vLLM's message and numbers: the prompt alone, or with the reply asked for."""
        limit = self.max_model_len
        if max_tokens is not None and prompt_tokens + max_tokens > limit:
            raise AdmissionError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                f"messages or completion.",
                "max_tokens",
            )
        if prompt_tokens > limit:
            raise AdmissionError(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"prompt contains {prompt_tokens} input tokens.",
                "prompt",
            )
