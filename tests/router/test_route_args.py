"""`kubellm route`'s flags: variables, and what it refuses before it listens."""

from __future__ import annotations

import pytest

from kubellm.router.main import main, parse_args
from kubellm.router.policy import LOAD_FACTOR


def test_flags_win_over_variables_which_win_over_defaults():
    env = {"KUBELLM_LOAD_FACTOR": "1.5", "KUBELLM_REPLICA": "http://a:1, http://b:2"}
    args = parse_args([], env)
    assert args.load_factor == 1.5 and args.replica == ["http://a:1", "http://b:2"]
    assert parse_args(["--load-factor", "2"], env).load_factor == 2.0
    assert parse_args([], {}).load_factor == LOAD_FACTOR and parse_args([], {}).policy == "prefix"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "--replica URL (repeatable) or --discover SERVICE"),
        (["--replica", "http://a:1", "--discover", "svc"], "one of the two"),
        (["--replica", "http://a:1", "--load-factor", "0.9"], "--load-factor must be at least 1"),
    ],
)
def test_what_cannot_work_exits_2_and_says_what_to_set(argv, says, capsys, monkeypatch):
    for name in ("KUBELLM_REPLICA", "KUBELLM_DISCOVER", "KUBELLM_LOAD_FACTOR"):
        monkeypatch.delenv(name, raising=False)
    assert main(argv) == 2
    assert says in capsys.readouterr().err
