"""The chat format of Gemma 1, 2 and 3 (`<start_of_turn>` / `<end_of_turn>`), as transformers renders Gemma 3's
official template: a list of marker ids (int) and the text spans between them (str)."""

from __future__ import annotations

from collections.abc import Mapping

from gemma.errors import GemmaError

ROLES = ("user", "model", "assistant", "system")


def chat_parts(bos: int, start: int, end: int, messages, add_generation_prompt: bool) -> list:
    """Each turn is <start_of_turn>{role}\\n{content.strip()}<end_of_turn>\\n; "assistant" is written "model"; a
    leading system message is prepended to the first user turn with a blank line (system text not stripped, as the
    official template does)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise GemmaError("chat: messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise GemmaError(f"chat: message {i} must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise GemmaError(f"chat: message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise GemmaError(f"chat: message {i} content must be a string, got {type(m['content']).__name__}")

    prefix, turns, first = "", list(messages), 0
    if turns[0]["role"] == "system":
        prefix, turns, first = turns[0]["content"] + "\n\n", turns[1:], 1
        if not turns:
            # The official template would drop the system text silently; refuse instead.
            raise GemmaError("chat: a system message must be followed by a user message")

    parts: list = [bos]
    for n, m in enumerate(turns):
        role = "model" if m["role"] == "assistant" else m["role"]
        expected = "user" if n % 2 == 0 else "model"
        if role != expected:
            raise GemmaError(
                f"chat: message {first + n} has role {m['role']!r}, expected {expected!r} "
                "(roles alternate user/model, starting with user, after an optional system message)"
            )
        text = (prefix if n == 0 else "") + m["content"].strip()
        # One span from the role to the end of the content: transformers tokenizes the rendered string, which
        # splits only at marker pieces, so the role, newline and content are encoded together.
        parts += [start, f"{role}\n{text}", end, "\n"]
    if add_generation_prompt:
        parts += [start, "model\n"]
    return parts
