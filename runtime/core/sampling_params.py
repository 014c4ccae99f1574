"""Per-request sampling parameters, validated on construction against their own table."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kubellm.runtime.core.structured_output import GrammarSpec

GREEDY_EPSILON = 1e-5


@dataclass(frozen=True)
class Bounds:
    """A numeric setting's valid values: [low, high] (`low_open`: (low, high]), and any
    of `also` besides."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    also: tuple[int, ...] = ()

    def allows(self, value: float) -> bool:
        if value in self.also:
            return True
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        """As OpenAI and vLLM word it: "in [0, 2]", "at least 1", "positive"."""
        low = "" if self.low is None else f"{self.low:g}"
        if self.high is not None:
            described = f"in {'(' if self.low_open else '['}{low}, {self.high:g}]"
        elif self.low == 0:
            described = "positive" if self.low_open else "non-negative"
        else:
            described = f"{'above' if self.low_open else 'at least'} {low}"
        return ", ".join(map(str, self.also)) + " or " + described if self.also else described


def rule(bounds: Bounds | None = None, *, request: bool = True) -> dict[str, Any]:
    """A SamplingParams field's metadata: its bounds, and `request`: the OpenAI API takes
    it under the same name and meaning, so its request schema is made from this field
    (`api/protocol.py`); the others each endpoint resolves on its own."""
    return {"bounds": bounds, "request": request}


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop; names follow vLLM and OpenAI. The
    one table of sampling fields: each one's name, type, default and bounds (`rule`), from
    which the HTTP request schema is made too."""

    n: int = field(default=1, metadata=rule(Bounds(low=1)))
    max_tokens: int | None = field(default=16, metadata=rule(Bounds(low=1), request=False))
    min_tokens: int = field(default=0, metadata=rule(Bounds(low=0)))
    temperature: float = field(default=1.0, metadata=rule(Bounds(0, 2)))
    top_p: float = field(default=1.0, metadata=rule(Bounds(0, 1, low_open=True)))
    top_k: int = field(default=0, metadata=rule(Bounds(low=0, also=(-1,))))
    min_p: float = field(default=0.0, metadata=rule(Bounds(0, 1)))
    presence_penalty: float = field(default=0.0, metadata=rule(Bounds(-2, 2)))
    frequency_penalty: float = field(default=0.0, metadata=rule(Bounds(-2, 2)))
    repetition_penalty: float = field(default=1.0, metadata=rule(Bounds(0, low_open=True)))
    seed: int | None = field(default=None, metadata=rule())
    # the API also takes one string
    stop: list[str] = field(default_factory=list, metadata=rule(request=False))
    stop_token_ids: list[int] = field(default_factory=list, metadata=rule())
    ignore_eos: bool = field(default=False, metadata=rule())
    logprobs: int | None = field(default=None, metadata=rule(Bounds(0, 20), request=False))
    skip_special_tokens: bool = field(default=True, metadata=rule(request=False))
    # token id -> added to its logit (the API's keys are strings)
    logit_bias: dict[int, float] = field(default_factory=dict, metadata=rule(request=False))
    # the prompt tokens' logprobs, with this many top ones (completions' echo)
    prompt_logprobs: int | None = field(default=None, metadata=rule(Bounds(0, 20), request=False))
    # what the output must match (the API's several constraint fields)
    structured_output: GrammarSpec | None = field(default=None, metadata=rule(request=False))

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = dict(self.logit_bias)
        self._validate()

    def _validate(self) -> None:
        for f in fields(self):
            bounds, value = f.metadata["bounds"], getattr(self, f.name)
            if bounds is not None and value is not None and not bounds.allows(value):
                raise ValueError(f"{f.name} must be {bounds.describe()}, got {value}")
        checks = [
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (all(self.stop), "stop strings must not be empty"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative"),
            (
                all(t >= 0 for t in self.logit_bias),
                "logit_bias keys must be non-negative token ids",
            ),
            (
                all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
                "logit_bias values must be in [-100, 100]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
