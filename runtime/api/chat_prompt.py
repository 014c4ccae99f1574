"""A chat request as the model's prompt: its messages and tools through the model's
chat template, or, for a template that knows no tools, our fallback.

The fallback (documented in docs/architecture.md) asks for Hermes-style calls, the
format `--tool-call-parser hermes` reads: the tools' JSON signatures in the system
message, calls as `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, past calls
written that way in the assistant's turn and tool results as `<tool_response>` user
turns (what Qwen2.5's own template does).

`tool_call_format` says which parser reads a model's `tool_choice: auto` replies: the
fallback's own (hermes) where the fallback is used, else the one whose marker the
template writes.
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


# A template that renders tools shows its calls' format: (marker, parser, whose format).
TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes", "Qwen2.5's and Hermes'"),
    ("[TOOL_CALLS]", "mistral", "Mistral's"),
    ("<|python_tag|>", "llama3_json", "Llama 3.1's"),
    ("ipython", "llama3_json", "Llama 3.1's"),
)


def shows_tools(template: str | None) -> bool:
    """Whether a chat template renders tools, calls and results itself (else: the fallback)."""
    return "tools" in (template or "")


def tool_call_format(template: str | None) -> tuple[str | None, str]:
    """The parser (a name in AUTO_PARSERS) of a model's own tool calls, and why; None
    where the template renders tools in a format none of TEMPLATE_MARKERS names, or
    names markers of two formats."""
    if not shows_tools(template):
        return (
            "hermes",
            "the chat template shows no tools: kubellm's fallback prompt asks "
            "for <tool_call> calls",
        )
    found = [
        (marker, name, whose) for marker, name, whose in TEMPLATE_MARKERS if marker in template
    ]
    markers = ", ".join(marker for marker, _, _ in found)
    if not found:
        every = ", ".join(marker for marker, _, _ in TEMPLATE_MARKERS)
        return None, f"the chat template renders tools but writes none of {every}"
    if len({name for _, name, _ in found}) > 1:
        return None, f"the chat template writes the markers of several formats: {markers}"
    return found[0][1], f"the chat template writes {markers} ({found[0][2]} format)"


def render_chat(tokenizer: Any, messages: list[ChatMessage], tools: list[Tool] | None) -> str:
    """The prompt text, ending with the assistant's turn opened."""
    template = tokenizer.chat_template or ""
    rendered = [m.for_template("developer" in template) for m in messages]
    signatures = [tool.model_dump(exclude_none=True) for tool in tools or []]
    if not shows_tools(template):  # the template cannot show tools, calls or results
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
        return {
            "role": "user",
            "content": f"<tool_response>\n{message['content']}\n</tool_response>",
        }
    calls = message.pop("tool_calls", None)
    if calls:
        written = [
            json.dumps(
                {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
            )
            for call in calls
        ]
        text = "\n".join(f"<tool_call>\n{call}\n</tool_call>" for call in written)
        message["content"] = (message["content"] + "\n" if message["content"] else "") + text
    return message
