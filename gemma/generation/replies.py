"""A Gemma 4 model turn, as decoded text, split into what an API returns: its thought, its answer and its tool calls.

The model writes (gemma.tokenizer.gemma4):
    [<|channel>thought\\n{reasoning}<channel|>]{answer}[<|tool_call>call:NAME{key:value,...}<tool_call|>...]
and stops at <turn|> or, after tool calls, at <|tool_response> (stop ids, not part of the text). Arguments are in the
template's notation: keys bare, strings between <|"|> markers, numbers, true / false / null, {...} and [...].
`parse_reply` turns a finished turn into a Reply (arguments as objects, as OpenAI's tool_calls carry them once
decoded); a call block that is malformed or cut short stays in the answer as text, never an error.
`ReplyStream` does the same while text arrives: what is surely thought or answer is released at once, and what may
still become a marker or a call block is held back until it is known.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
Q = '<|"|>'
_THOUGHT_HEADER = "thought\n"
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")


@dataclass
class Reply:
    content: str
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # [{"name": str, "arguments": dict}]


class _Malformed(ValueError):
    """A call block that does not parse (it then stays text)."""


class _Reader:
    """A recursive-descent reader of the template's value notation."""

    def __init__(self, text: str, pos: int = 0):
        self.text, self.pos = text, pos

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def expect(self, s: str) -> None:
        if not self.peek(s):
            raise _Malformed(f"expected {s!r} at {self.pos}")
        self.pos += len(s)

    def value(self) -> Any:
        t = self.text
        if self.peek(Q):
            end = t.find(Q, self.pos + len(Q))
            if end < 0:
                raise _Malformed("unterminated string")
            out, self.pos = t[self.pos + len(Q) : end], end + len(Q)
            return out
        if self.peek("{"):
            return self.mapping()
        if self.peek("["):
            self.pos += 1
            items = []
            while not self.peek("]"):
                if items:
                    self.expect(",")
                items.append(self.value())
            self.pos += 1
            return items
        for word, val in (("true", True), ("false", False), ("null", None)):
            if self.peek(word):
                self.pos += len(word)
                return val
        m = _NUMBER.match(t, self.pos)
        if m:
            self.pos = m.end()
            number = m.group()
            return float(number) if any(c in number for c in ".eE") else int(number)
        raise _Malformed(f"unexpected text at {self.pos}")

    def key(self) -> str:
        if self.peek(Q):
            return self.value()
        end = self.text.find(":", self.pos)
        if end < 0:
            raise _Malformed("a key without ':'")
        out, self.pos = self.text[self.pos : end], end
        return out

    def mapping(self) -> dict:
        self.expect("{")
        out: dict[str, Any] = {}
        while not self.peek("}"):
            if out:
                self.expect(",")
            key = self.key()
            self.expect(":")
            out[key] = self.value()
            if self.pos >= len(self.text):
                raise _Malformed("unterminated object")
        self.pos += 1
        return out


def parse_call(block: str) -> dict[str, Any]:
    """`call:NAME{...}` (the inside of a <|tool_call> block) as {"name", "arguments"}; ValueError if malformed."""
    r = _Reader(block)
    r.expect("call:")
    m = _NAME.match(block, r.pos)
    if not m:
        raise _Malformed("no function name")
    r.pos = m.end()
    arguments = r.mapping()
    if r.pos != len(block):
        raise _Malformed("text after the arguments")
    return {"name": m.group(), "arguments": arguments}


def _split_thought(text: str) -> tuple[str | None, str]:
    if not text.startswith(THINK_OPEN):
        return None, text
    end = text.find(THINK_CLOSE)
    if end < 0:  # cut short inside its thought: all of it is thought
        return text[len(THINK_OPEN) :].removeprefix(_THOUGHT_HEADER), ""
    return text[len(THINK_OPEN) : end].removeprefix(_THOUGHT_HEADER).removesuffix("\n"), text[end + len(THINK_CLOSE) :]


def parse_reply(text: str) -> Reply:
    """A finished model turn's text as a Reply: the leading thought, the answer, the well-formed tool calls."""
    reasoning, rest = _split_thought(text)
    content, calls, pos = "", [], 0
    while (start := rest.find(CALL_OPEN, pos)) >= 0:
        end = rest.find(CALL_CLOSE, start)
        if end < 0:
            break  # cut short: stays text
        try:
            calls.append(parse_call(rest[start + len(CALL_OPEN) : end]))
        except _Malformed:
            content += rest[pos : end + len(CALL_CLOSE)]
        else:
            content += rest[pos:start]
        pos = end + len(CALL_CLOSE)
    content += rest[pos:]
    return Reply(content=content, reasoning=reasoning, tool_calls=calls)


def openai_tool_calls(reply: Reply, prefix: str) -> list[dict[str, Any]]:
    """The calls in OpenAI's shape: ids `{prefix}_{n}`, arguments as a JSON string."""
    return [
        {
            "id": f"{prefix}_{n}",
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
        }
        for n, c in enumerate(reply.tool_calls)
    ]


def _held(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may be the start of one of `markers` (held back while streaming)."""
    for n in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


class ReplyStream:
    """Text pieces in, (reasoning, content) pieces out, as soon as they are surely one or the other; `finish()`
    gives the last pieces and the Reply."""

    def __init__(self):
        self.text = ""
        self.sent_reasoning = 0  # characters of the thought already released
        self.sent_content = 0  # characters of the answer (as parse_reply would give it so far) already released

    def feed(self, piece: str) -> tuple[str, str]:
        self.text += piece
        text = self.text
        if THINK_OPEN.startswith(text) and len(text) < len(THINK_OPEN):
            return "", ""  # may still open a thought
        if text.startswith(THINK_OPEN) and THINK_CLOSE not in text:
            body = text[len(THINK_OPEN) :]
            if _THOUGHT_HEADER.startswith(body):
                return "", ""
            body = body.removeprefix(_THOUGHT_HEADER)
            safe = body[: len(body) - _held(body, (THINK_CLOSE,))]
            safe = safe.removesuffix("\n")  # the newline before <channel|> is the template's, not the thought's
            return self._reasoning(safe), ""
        reasoning, rest = _split_thought(text)
        out_reasoning = self._reasoning(reasoning) if reasoning is not None else ""
        # The answer up to where a call block (or a marker that may become one) begins.
        cut = rest.find(CALL_OPEN)
        safe = rest if cut < 0 else rest[:cut]
        if cut < 0:
            safe = safe[: len(safe) - _held(safe, (CALL_OPEN,))]
        return out_reasoning, self._content(safe)

    def _reasoning(self, thought: str) -> str:
        new = thought[self.sent_reasoning :]
        self.sent_reasoning = max(self.sent_reasoning, len(thought))
        return new

    def _content(self, answer: str) -> str:
        new = answer[self.sent_content :]
        self.sent_content = max(self.sent_content, len(answer))
        return new

    def finish(self) -> tuple[str, str, Reply]:
        """The pieces still held back, and the whole Reply (the released pieces are prefixes of its parts)."""
        reply = parse_reply(self.text)
        return (reply.reasoning or "")[self.sent_reasoning :], reply.content[self.sent_content :], reply
