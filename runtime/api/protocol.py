"""Request bodies of the OpenAI API, as far as we implement them.

Unknown fields are refused (400) rather than silently ignored: a client that
sends `tools` or `response_format` must learn we do not do them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kubellm.runtime.sampling_params import SamplingParams

MAX_N = 128  # choices per prompt: bounds what one request can ask of the engine


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string, as OpenAI) -> bias in [-100, 100]"
    )
    n: int = Field(1, le=MAX_N)
    ignore_eos: bool = False
    min_tokens: int = 0
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:  # fmt: skip
        """`max_tokens` and `logprobs` as the endpoint resolved them (None: up to the
        context length; no logprobs), and the prompt's logprobs (completions' echo)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        same = self.model_dump(include=_SAME_AS_ENGINE)
        return SamplingParams(**same, max_tokens=max_tokens, stop=stop, logprobs=logprobs,
                              logit_bias=self._logit_bias(),
                              prompt_logprobs=prompt_logprobs)  # fmt: skip

    def _logit_bias(self) -> dict[int, float]:
        try:
            return {int(token): bias for token, bias in (self.logit_bias or {}).items()}
        except ValueError:
            raise ValueError("logit_bias keys must be token ids") from None


# Fields a request passes to SamplingParams unchanged (the others are resolved per endpoint).
_SAME_AS_ENGINE = set(_SamplingFields.model_fields) & {
    f.name for f in dataclasses.fields(SamplingParams)
} - {"max_tokens", "stop", "logprobs", "logit_bias"}


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str | list[int]] = Field(
        description="text, token ids, or a list of either (n choices per prompt, in order)"
    )
    logprobs: int | None = None
    echo: bool = Field(False, description="prefix each choice with its prompt (and its logprobs)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        """One clear message instead of pydantic's one per union branch."""

        def one(p: Any) -> bool:
            return isinstance(p, str) or (isinstance(p, list) and all(type(t) is int for t in p))

        if not (one(prompt) or (isinstance(prompt, list) and all(one(p) for p in prompt))):
            raise ValueError("must be a string, a list of token ids, or a list of either")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
