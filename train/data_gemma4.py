"""Training conversations in Gemma 4's chat format: messages records with tools, tool calls, tool responses and
reasoning, encoded with their loss masks.

A record: {"messages": [...], "tools": [...]?}, the messages as transformers' apply_chat_template takes them
(roles user, assistant/model, system/developer, tool; an assistant message may carry `reasoning_content` and
OpenAI-shaped `tool_calls` with `arguments` as objects; a tool message `tool_call_id` or `name`), `tools` OpenAI
function schemas. Alpaca and sharegpt records (gemma/train/data.py's shapes) are read as for Gemma 1-3.

The ids are the official template's (gemma.tokenizer.gemma4), each span tokenized as generation meets it: the
model turn's header `<|turn>model\\n` is the end of a prompt, and what the model writes after it (its thought, tool
calls, content and closing `<turn|>` or `<|tool_response>`) is encoded apart from it. Loss goes on what model turns
write: content, tool calls and their end markers, and thoughts unless `train_on_thoughts` is off; prompts, system
text, tool declarations and tool responses are masked (with `train_on_prompt` everything after <bos> is trained).
"""

from __future__ import annotations

from collections.abc import Mapping

from gemma.errors import GemmaError
from train.data import IGNORE, Example, _json_kind, record_messages

# What a message may carry besides its role (everything else in a record's message is an error, not silently lost).
_MESSAGE_KEYS = {"role", "content", "reasoning_content", "reasoning", "tool_calls", "tool_call_id", "name"}


def gemma4_record(record, where: str) -> tuple[list[dict], list | None]:
    """(messages, tools) of one record; errors name `where` ("data.jsonl:12")."""
    if isinstance(record, Mapping) and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise GemmaError(f"{where}: 'messages' must be a list, got {_json_kind(messages)}")
        for i, m in enumerate(messages, 1):
            if not isinstance(m, Mapping):
                raise GemmaError(f"{where}: message {i} must be an object, got {_json_kind(m)}")
            unknown = sorted(set(m) - _MESSAGE_KEYS)
            if unknown:
                raise GemmaError(f"{where}: message {i} has unknown key {unknown[0]!r}")
        tools = record.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise GemmaError(f"{where}: 'tools' must be a list of function schemas, got {_json_kind(tools)}")
        return [dict(m) for m in messages], tools
    messages = record_messages(record, where)  # alpaca, sharegpt: user / model turns
    return [{**m, "role": "assistant" if m["role"] == "model" else m["role"]} for m in messages], None


def encode_gemma4(
    messages: list[dict],
    tools: list | None,
    tokenizer,
    max_len: int,
    train_on_prompt: bool = False,
    train_on_thoughts: bool = True,
    where: str = "conversation",
) -> tuple[Example | None, bool]:
    """(example, truncated): ids and shifted targets. A conversation longer than `max_len` is cut there (what is
    cut off is lost, and a model turn cut short keeps no end marker, so the model never learns to stop
    mid-answer); (None, truncated) when nothing is left to train on."""
    if max_len < 2:
        raise GemmaError(f"max_len must be at least 2, got {max_len}")
    try:
        parts = tokenizer.tagged_chat(messages, tools=tools)
    except GemmaError as exc:
        raise GemmaError(f"{where}: {str(exc).removeprefix('chat: ')}") from None
    ids: list[int] = []
    trained: list[bool] = []
    for part, tag in parts:
        piece = [part] if isinstance(part, int) else tokenizer.encode_content(part)
        wanted = tag == "model" or (tag == "thought" and train_on_thoughts) or (train_on_prompt and bool(ids))
        ids += piece
        trained += [wanted] * len(piece)
    truncated = len(ids) > max_len
    ids, trained = ids[:max_len], trained[:max_len]
    targets = [t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:])] + [IGNORE]
    if all(t == IGNORE for t in targets):
        return None, truncated
    return Example(ids, targets), truncated
