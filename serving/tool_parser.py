"""Tool calls in model text, in the Hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`),
as vLLM's `--tool-call-parser hermes` reads them."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_hermes(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split `text` into its plain content (None if nothing else) and OpenAI-style `tool_calls`.
    A block that is not valid JSON with a `name` stays in the content."""
    calls, content, last = [], [], 0
    for match in _TOOL_CALL.finditer(text):
        call = _decode(match.group(1))
        if call is None:
            continue
        content.append(text[last:match.start()])
        last = match.end()
        arguments = call.get("arguments", {})
        calls.append({"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
                      "function": {"name": call["name"], "arguments": arguments if isinstance(arguments, str)
                                   else json.dumps(arguments, ensure_ascii=False)}})
    if not calls:
        return text, []
    rest = ("".join(content) + text[last:]).strip()
    return rest or None, calls


def _decode(block: str) -> dict[str, Any] | None:
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    return call if isinstance(call, dict) and isinstance(call.get("name"), str) else None
