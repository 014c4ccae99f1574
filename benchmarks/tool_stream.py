"""The cost of streaming one tool call: a reply of N tokens (a Hermes `<tool_call>` whose
arguments hold a long string, as a code-writing tool's do) fed to `ToolCallStream` one
token at a time (a token taken as 4 characters), as `kubellm serve` does for
`tool_choice: auto`. Prints the total and the cost per token at each length: a parser
that re-reads the whole reply each token grows with the length, a linear one does not.

    python benchmarks/tool_stream.py
    PYTHONPATH=<an earlier kubellm install> python benchmarks/tool_stream.py  # before
"""

from __future__ import annotations

import json
import time

from kubellm.runtime.api.responses import ToolCallStream
from kubellm.runtime.api.tool_parsers import AUTO_PARSERS

TOKEN_CHARS = 4


def reply(tokens: int) -> str:
    """A Hermes call whose `code` argument fills the reply to about `tokens` tokens."""
    line = 'print("a line of the program, with {braces} and \\"quotes\\"")\n'
    code = line * (tokens * TOKEN_CHARS // len(line))
    call = {"name": "run_python", "arguments": {"code": code, "timeout": 30}}
    return "<tool_call>\n" + json.dumps(call) + "\n</tool_call>"


def stream_seconds(text: str) -> float:
    stream = ToolCallStream(AUTO_PARSERS["hermes"])
    pieces = [text[i : i + TOKEN_CHARS] for i in range(0, len(text), TOKEN_CHARS)]
    started = time.perf_counter()
    for number, piece in enumerate(pieces):
        stream.delta(piece, finished=number == len(pieces) - 1)
    return time.perf_counter() - started


def main() -> None:
    print("| reply tokens | stream total (ms) | per token (us) |")
    print("|---|---|---|")
    for tokens in (250, 500, 1000, 2000, 4000):
        text = reply(tokens)
        seconds = min(stream_seconds(text) for _ in range(3))
        count = len(text) // TOKEN_CHARS
        print(f"| {count} | {seconds * 1e3:.1f} | {seconds / count * 1e6:.1f} |")


if __name__ == "__main__":
    main()
