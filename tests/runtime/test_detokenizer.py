"""Incremental detokenization: whole characters only, stop strings never leak."""

from __future__ import annotations

import pytest

from kubellm.runtime.core.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def stream(tokenizer, text: str, stop: list[str]) -> tuple[list[str], str | None, str]:
    detok = IncrementalDetokenizer(tokenizer, stop, skip_special_tokens=True)
    deltas, hit = [], None
    for token_id in tokenizer.encode(text):
        hit = detok.add(token_id)
        deltas.append(detok.take_delta(finished=hit is not None))
        if hit:
            break
    else:
        deltas.append(detok.take_delta(finished=True))
    return deltas, hit, detok.text


def test_multibyte_characters_are_never_split(tokenizer):
    text = "naïve café 😀 日本語 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    deltas, _, full = stream(tokenizer, text, [])
    assert "".join(deltas) == full == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cuts_the_text_and_never_appears_in_a_delta(tokenizer):
    deltas, hit, full = stream(tokenizer, "Hello world. STOP here and more", ["STOP"])
    assert hit == "STOP"
    assert full == "Hello world. "
    assert "".join(deltas) == full
    assert not any("S" in d for d in deltas)


def test_stop_string_split_across_tokens_is_found(tokenizer):
    _, hit, full = stream(tokenizer, "alpha<|end|>beta", ["<|end|>"])
    assert hit == "<|end|>" and full == "alpha"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    _, hit, full = stream(tokenizer, "one two three four", ["four", "two three"])
    assert hit == "two three" and full == "one "


def test_held_back_text_is_released_when_no_stop_follows(tokenizer):
    deltas, hit, full = stream(tokenizer, "a long sentence ending in STO", ["STOP"])
    assert hit is None and "".join(deltas) == full == "a long sentence ending in STO"
