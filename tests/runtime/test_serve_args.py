"""`kubellm serve` flags and their KUBELLM_* environment variables."""

from __future__ import annotations

import torch

from kubellm.runtime.placement import resolve_device
from kubellm.runtime.serve import parse_args


def test_environment_sets_flags_and_flags_win():
    env = {
        "KUBELLM_MAX_NUM_SEQS": "8",
        "KUBELLM_ENABLE_PREFIX_CACHING": "false",
        "KUBELLM_API_KEY": "k",
        "KUBELLM_PORT": "9000",
        "KUBELLM_DEVICE": "cpu",
    }
    args = parse_args(["--port", "9100"], env)
    assert args.max_num_seqs == 8 and args.enable_prefix_caching is False
    assert args.api_key == "k" and args.port == 9100 and args.device == "cpu"


def test_kubellm_device_also_pins_the_offline_engine(monkeypatch):
    monkeypatch.setenv("KUBELLM_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")  # a named device wins
    monkeypatch.delenv("KUBELLM_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)


def test_defaults_without_environment():
    args = parse_args([], {})
    assert args.port == 8000 and args.model == "smollm2-135m-instruct" and args.api_key is None
