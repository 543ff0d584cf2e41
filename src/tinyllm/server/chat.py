"""The chat template for base models (neither GPT-2 nor a tinyllm checkpoint is instruction-tuned).

A conversation becomes plain text the model can continue, and generation stops when the model starts the
user's next turn:

    <system and developer messages, one paragraph each>\\n\\n      (only when there are any)
    User: <message>\\n
    Assistant: <message>\\n
    ...
    User: <last message>\\n
    Assistant:

A tool's result (role "tool", e.g. an agent loop's) is a turn of its own: "Tool: <content>".

Stop strings: "\\nUser:" (plus the request's own). The reply's leading whitespace is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from tinyllm.server.schemas_openai import ChatMessage

CHAT_STOP = ("\nUser:",)
_SPEAKERS = {"user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_chat(messages: Sequence[ChatMessage]) -> str:
    """The prompt text for `messages`, ending with "Assistant:" for the model to continue."""
    system = [m.text().strip() for m in messages if m.role in ("system", "developer") and m.text().strip()]
    turns = [f"{_SPEAKERS[m.role]}: {m.text().strip()}\n" for m in messages if m.role in _SPEAKERS]
    head = "\n\n".join(system) + "\n\n" if system else ""
    return head + "".join(turns) + "Assistant:"


def merge_stop(user_stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """The template's stop strings followed by the request's (without duplicates)."""
    extra = (user_stop,) if isinstance(user_stop, str) else tuple(user_stop or ())
    return tuple(dict.fromkeys(CHAT_STOP + extra))
