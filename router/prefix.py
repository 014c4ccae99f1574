"""The key a request is routed by: the start of its prompt as the model will see it.

For chat that is the messages in order (role and text), so one tenant's system prompt,
and one user's conversation turn after turn, give one key. Only the first
`PREFIX_CHARS` characters count: about 250 tokens, enough to tell tenants' system
prompts apart past a shared opening line, and short enough that every conversation of a
tenant shares its key, so they meet the replica whose prefix cache holds that system
prompt (bounded loads spread a busy tenant). KubeAI hashes 100 characters.
"""

from __future__ import annotations

import json
from typing import Any

PREFIX_CHARS = 1000
PREFIX_TOKENS = 256


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def prefix_key(path: str, body: Any, chars: int = PREFIX_CHARS) -> bytes | None:
    """The routing key of a JSON request body, or None where it has no prompt."""
    if not isinstance(body, dict):
        return None
    model = str(body.get("model", ""))
    if path.endswith("/chat/completions") and isinstance(body.get("messages"), list):
        text = "".join(
            f"{m.get('role')}\n{_text(m.get('content'))}\n"
            for m in body["messages"]
            if isinstance(m, dict)
        )
        return f"{model}\n{text[:chars]}".encode()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of prompts: route by the first
    if isinstance(prompt, str):
        return f"{model}\n{prompt[:chars]}".encode()
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return f"{model}\n{json.dumps(prompt[:PREFIX_TOKENS])}".encode()
    return None
