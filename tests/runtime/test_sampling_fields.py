"""One table of sampling fields: SamplingParams declares each field's name, type,
default and bounds once, and the HTTP request schema is made from it."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import get_type_hints

import pytest

from kubellm.runtime import SamplingParams
from kubellm.runtime.api.protocol import ChatCompletionRequest, CompletionRequest
from kubellm.runtime.core.sampling_params import Bounds

# A value other than the default for every field a request takes as it is.
CHANGED = {
    "n": 3,
    "min_tokens": 2,
    "temperature": 0.5,
    "top_p": 0.5,
    "top_k": 5,
    "min_p": 0.1,
    "presence_penalty": 1.0,
    "frequency_penalty": -1.0,
    "repetition_penalty": 1.2,
    "seed": 7,
    "stop_token_ids": [9],
    "ignore_eos": True,
}
REQUEST_FIELDS = [f for f in fields(SamplingParams) if f.metadata["request"]]
BODIES = {
    CompletionRequest: {"model": "m", "prompt": "x"},
    ChatCompletionRequest: {"model": "m", "messages": [{"role": "user", "content": "x"}]},
}


def test_every_request_field_of_the_table_reaches_sampling_params():
    assert set(CHANGED) == {f.name for f in REQUEST_FIELDS}  # a new field needs a value here
    for endpoint, body in BODIES.items():
        params = endpoint(**body, **CHANGED).sampling_params(16, None)
        assert {name: getattr(params, name) for name in CHANGED} == CHANGED
        defaults = endpoint(**body).sampling_params(16, None)
        assert defaults == SamplingParams(max_tokens=16)  # the table's defaults, unchanged


def test_the_request_schema_has_the_tables_types_defaults_and_bounds():
    for endpoint in BODIES:
        schema = endpoint.model_json_schema()["properties"]
        for f in REQUEST_FIELDS:
            default = f.default_factory() if f.default is MISSING else f.default
            made = endpoint.model_fields[f.name]
            assert made.annotation == get_type_hints(SamplingParams)[f.name], f.name
            assert made.get_default(call_default_factory=True) == default, f.name
            bounds = f.metadata["bounds"]
            assert schema[f.name].get("description") == (bounds and bounds.describe()), f.name
        assert schema["n"]["maximum"] == 128  # what one request may ask of the engine


@pytest.mark.parametrize(
    ("bounds", "allowed", "refused", "described"),
    [
        (Bounds(0, 2), [0, 1.5, 2], [-0.1, 2.1], "in [0, 2]"),
        (Bounds(0, 1, low_open=True), [1e-9, 1], [0, 1.1], "in (0, 1]"),
        (Bounds(low=1), [1, 10**6], [0], "at least 1"),
        (Bounds(low=0), [0, 3], [-1], "non-negative"),
        (Bounds(0, low_open=True), [0.01], [0, -1], "positive"),
        (Bounds(low=0, also=(-1,)), [-1, 0, 50], [-2], "-1 or non-negative"),
    ],
)
def test_bounds_allow_and_describe_their_values(bounds, allowed, refused, described):
    assert all(bounds.allows(v) for v in allowed)
    assert not any(bounds.allows(v) for v in refused)
    assert bounds.describe() == described


def test_a_value_out_of_bounds_is_refused_with_the_fields_rule():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="top_k must be -1 or non-negative, got -2"):
        SamplingParams(top_k=-2)
