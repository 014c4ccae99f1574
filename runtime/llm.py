"""The offline API: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from kubellm.runtime.config import BUILTIN_MODEL, EngineConfig
from kubellm.runtime.core.engine import LLMEngine
from kubellm.runtime.core.outputs import RequestOutput
from kubellm.runtime.core.sampling_params import SamplingParams

# Text, token ids, or vLLM's dict forms: {"prompt": text} (TextPrompt) and
# {"prompt_token_ids": ids} (TokensPrompt)
Prompt = str | list[int] | dict


class LLM:
    """Loads a model once; `generate` runs prompts to completion with continuous batching."""

    def __init__(self, model: str = BUILTIN_MODEL, **config):
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the process exits)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are text, token-id lists, or
        vLLM's {"prompt": ...} / {"prompt_token_ids": ...} dictionaries."""
        prompt_list = [_unwrap(p) for p in _as_prompt_list(prompts)]
        params = _as_params_list(sampling_params, len(prompt_list))
        request_ids: list[str] = []
        try:
            for prompt, p in zip(prompt_list, params):
                request_id = f"llm-{next(self._ids)}"
                (admitted,) = self.engine.admission.admit([prompt], p)
                self.engine.add_request(request_id, admitted)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
                self.engine.take_output(request_id)
            raise
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return [self.engine.take_output(request_id) for request_id in request_ids]

    def chat(
        self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None
    ) -> RequestOutput:
        """One conversation through the tokenizer's chat template."""
        prompt = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.generate(prompt, sampling_params)[0]


def _unwrap(prompt: Prompt) -> str | list[int]:
    if not isinstance(prompt, dict):
        return prompt
    if set(prompt) == {"prompt_token_ids"}:
        return list(prompt["prompt_token_ids"])
    if set(prompt) == {"prompt"}:
        return prompt["prompt"]
    raise ValueError(
        f"a prompt dictionary holds 'prompt' (text) or 'prompt_token_ids'; got {sorted(prompt)}"
    )


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params
