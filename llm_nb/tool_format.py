"""The one tool-call syntax, shared by the prompt (workers), the grammar and the parser (host).

Models call a tool by writing, Hermes-style (as Qwen, Hermes and SmolLM templates teach them)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Templates that know ``tools`` get the tools and the conversation's calls as
structured fields; templates that ignore them (SmolLM2's, plain ChatML) get the
same information as text, written here, so every model sees one consistent format.
"""

from __future__ import annotations

import json
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


def render_call(name: str, arguments: Any) -> str:
    """One call as the model writes it (the grammar forces exactly this shape)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}\n"


def _arguments(raw: Any) -> Any:
    """OpenAI sends arguments as a JSON string; templates (and the model) want the object."""
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            return raw
    return raw if raw is not None else {}


def fallback_system_prompt(tools: list[dict]) -> str:
    """The tools described in words, for a chat template that ignores ``tools``."""
    signatures = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
    return (
        "You can call functions. Their signatures are inside <tools></tools>:\n"
        f"<tools>\n{signatures}\n</tools>\n"
        "To call a function, answer with a JSON object inside <tool_call></tool_call> tags, one per call:\n"
        f'{CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<the arguments>}}}}\n{CALL_CLOSE}\n'
        "When a function has returned its result, answer the user in plain words, using that result."
    )


def _calls_as_text(message: dict) -> str:
    calls = [
        render_call(call.get("function", {}).get("name", ""), _arguments(call.get("function", {}).get("arguments")))
        for call in message.get("tool_calls") or []
    ]
    content = message.get("content") or ""
    return ((content + "\n") if content else "") + "".join(calls).rstrip("\n")


def template_messages(messages: list[dict], tools: list[dict] | None, tools_supported: bool) -> list[dict]:
    """The conversation as the chat template should see it.

    ``tools_supported``: the template renders ``tools`` itself, so calls stay structured
    (arguments as objects, as Hugging Face templates expect). Otherwise calls become text,
    tool results become user turns, and the tools are described in the system message.
    """
    if tools_supported:
        out = []
        for message in messages:
            message = dict(message)
            if message.get("tool_calls"):
                message["tool_calls"] = [
                    {
                        "id": call.get("id"),
                        "type": "function",
                        "function": {
                            "name": call.get("function", {}).get("name"),
                            "arguments": _arguments(call.get("function", {}).get("arguments")),
                        },
                    }
                    for call in message["tool_calls"]
                ]
            if message.get("content") is None:
                message["content"] = ""
            out.append(message)
        return out
    out = []
    names = {}  # tool_call_id -> function name: a tool message carries only the id
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            names.update({c.get("id"): c.get("function", {}).get("name") for c in message["tool_calls"]})
            out.append({"role": "assistant", "content": _calls_as_text(message)})
        elif role == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id")) or "the function"
            text = f"{name} returned: {message.get('content') or ''}"
            if out and out[-1]["role"] == "user":  # several results answer one turn: keep roles alternating
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text})
        else:
            out.append({"role": role, "content": message.get("content") or ""})
    if tools:
        prompt = fallback_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
