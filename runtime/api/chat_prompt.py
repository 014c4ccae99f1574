"""A chat request as the model's prompt: its messages and tools through the model's
chat template, or, for a template that knows no tools, our fallback.

The fallback (documented in docs/architecture.md) asks for Hermes-style calls, the
format `--tool-call-parser hermes` reads: the tools' JSON signatures in the system
message, calls as `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, past calls
written that way in the assistant's turn and tool results as `<tool_response>` user
turns (what Qwen2.5's own template does).
"""

from __future__ import annotations

import json
from typing import Any

from kubellm.runtime.api.protocol import ChatMessage, Tool

FALLBACK_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{signatures}
</tools>

For each function call, return a JSON object with the function name and arguments \
within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def render_chat(tokenizer: Any, messages: list[ChatMessage], tools: list[Tool] | None) -> str:
    """The prompt text, ending with the assistant's turn opened."""
    template = tokenizer.chat_template or ""
    rendered = [m.for_template("developer" in template) for m in messages]
    signatures = [tool.model_dump(exclude_none=True) for tool in tools or []]
    if "tools" not in template:  # the template cannot show tools, calls or results
        rendered = _fallback(rendered, signatures)
        signatures = []
    return tokenizer.apply_chat_template(
        rendered, tools=signatures or None, tokenize=False, add_generation_prompt=True
    )


def _fallback(messages: list[dict[str, Any]], signatures: list[dict]) -> list[dict[str, Any]]:
    out = [_as_text(message) for message in messages]
    if not signatures:
        return out
    prompt = FALLBACK_TOOLS_PROMPT.format(signatures="\n".join(map(json.dumps, signatures)))
    if out and out[0]["role"] == "system":
        return [{**out[0], "content": out[0]["content"] + "\n\n" + prompt}, *out[1:]]
    return [{"role": "system", "content": prompt}, *out]


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    """A tool call or a tool result, written as text a plain template shows."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n"
                                           f"</tool_response>"}  # fmt: skip
    calls = message.pop("tool_calls", None)
    if calls:
        written = [json.dumps({"name": call["function"]["name"], "arguments": call["function"][
            "arguments"]}) for call in calls]  # fmt: skip
        text = "\n".join(f"<tool_call>\n{call}\n</tool_call>" for call in written)
        message["content"] = (message["content"] + "\n" if message["content"] else "") + text
    return message
