"""What the engine hands back: per-step deltas and whole-request results."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubellm.runtime.core.sequence import TokenLogprobs


@dataclass
class CompletionOutput:
    """One generated sequence (one of n)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A prompt and its n completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs: per prompt position (None at 0: nothing predicts it)
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass
class StepDelta:
    """What one step added to one sequence: new tokens, new text, and whether it ended."""

    request_id: str  # the request's id, shared by its n sequences
    index: int  # which of the n sequences
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs]
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    queue_seconds: float  # from arrival until first scheduled
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with a sequence's first token
    error: str | None = None  # this sequence could not be processed (it ended; the rest run on)


@dataclass(frozen=True)
class EngineStats:
    """The engine's counters at one moment, taken by the thread that steps it."""

    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens found
    num_blocks: int  # the KV pool's, fixed at load
    block_size: int
