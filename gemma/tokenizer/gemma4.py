"""Gemma 4's chat format, as its official template renders it (the revision google/gemma-4-E2B-it ships now, published
2026-07-09; trl keeps it as chat_templates/gemma4_v5.jinja): a list of marker ids (int) and text spans (str) that
transformers' apply_chat_template(..., tokenize=True) turns into the same ids, except that text from the caller
(contents, thoughts, tool names, arguments and schemas) never becomes a marker.

The layout, in short:
    <bos>[<|turn>system\\n[<|think|>\\n][system text][<|tool>declaration:NAME{...}<tool|>...]<turn|>\\n]
    <|turn>user\\n{text}<turn|>\\n
    <|turn>model\\n[<|channel>thought\\n{reasoning}\\n<channel|>][<|tool_call>call:NAME{k:v,...}<tool_call|>...]
        [<|tool_response>response:NAME{...}<tool_response|>...]{content, earlier thoughts stripped}<turn|>\\n
    [<|turn>model\\n]                                   the generation prompt
A system block is written when there is a system (or developer) message first, tools, or thinking. Values inside
tool declarations, calls and responses are written in the template's own notation (strings between <|"|> markers,
keys sorted case-insensitively, true/false/null). A model turn that calls tools without responses ends at
<|tool_response>, where generation stops for the caller to run them.

Written from reading the template (data, not code to copy); tests/test_tokenizer_gemma4.py renders it with
transformers on every feature and compares ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gemma.errors import GemmaError

ROLES = ("user", "model", "assistant", "system", "developer", "tool")
MARKERS = (
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
)
Q = '<|"|>'  # the template's string delimiter inside declarations, calls and responses
_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


class Parts:
    """The rendered chat: marker ids and the text between them, each tagged with who writes it: "prompt" (the
    template, the user, the tools' responses), "model" (what a model turn generates: its content, tool calls and
    closing marker) or "thought" (its reasoning). Adjacent text of one tag is one span; `merged` joins all adjacent
    text, as the reference tokenizes the rendered string, splitting it only at markers."""

    def __init__(self, ids: Mapping[str, int]):
        self.ids, self.out, self.tags, self.tag = ids, [], [], "prompt"

    def _add(self, part) -> None:
        self.out.append(part)
        self.tags.append(self.tag)

    def mark(self, piece: str) -> None:
        self._add(self.ids[piece])

    def text(self, s: str) -> None:
        if not s:
            return
        if self.out and isinstance(self.out[-1], str) and self.tags[-1] == self.tag:
            self.out[-1] += s
        else:
            self._add(s)

    def quoted(self, s: str) -> None:
        self.mark(Q)
        self.text(s)
        self.mark(Q)

    def merged(self) -> list:
        joined: list = []
        for part in self.out:
            if isinstance(part, str) and joined and isinstance(joined[-1], str):
                joined[-1] += part
            else:
                joined.append(part)
        return joined


def _get(d: Any, key: str) -> Any:
    """d[key] as the template reads it: a missing key (or a non-mapping) is falsy."""
    return d.get(key) if isinstance(d, Mapping) else None


def _upper(value: Any) -> str:
    return "" if value is None else str(value).upper()


def _sorted_items(d: Mapping) -> list:
    """Jinja's dictsort: by key, case-insensitively."""
    return sorted(d.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def _number(value: Any) -> str:
    return str(value)


# ---- values --------------------------------------------------------------------------------------------------------


def argument(out: Parts, value: Any, escape_keys: bool = True) -> None:
    """A value in the template's notation: strings quoted, mappings with sorted keys (quoted with escape_keys),
    lists in brackets, true / false / null, numbers as Python writes them."""
    if value is None:
        out.text("null")
    elif isinstance(value, str):
        out.quoted(value)
    elif isinstance(value, bool):
        out.text("true" if value else "false")
    elif isinstance(value, Mapping):
        out.text("{")
        for n, (key, item) in enumerate(_sorted_items(value)):
            if n:
                out.text(",")
            out.quoted(str(key)) if escape_keys else out.text(str(key))
            out.text(":")
            argument(out, item, escape_keys)
        out.text("}")
    elif isinstance(value, (list, tuple)):
        out.text("[")
        for n, item in enumerate(value):
            if n:
                out.text(",")
            argument(out, item, escape_keys)
        out.text("]")
    else:
        out.text(_number(value))


def _quoted_list(out: Parts, items: Any) -> None:
    out.text("[")
    for n, item in enumerate(items or []):
        if n:
            out.text(",")
        out.quoted(str(item))
    out.text("]")


# ---- tool declarations ---------------------------------------------------------------------------------------------


class _Comma:
    """The template's add_comma: a comma before every field of a property but its first."""

    def __init__(self, out: Parts):
        self.out, self.on = out, False

    def __call__(self) -> None:
        if self.on:
            self.out.text(",")
        self.on = True


def _parameters(out: Parts, properties: Mapping, filter_keys: bool = False) -> None:
    """The template's format_parameters: each property as NAME:{description,enum|items,nullable,properties,
    required,type}."""
    first = True
    for key, value in _sorted_items(properties):
        if filter_keys and key in _STANDARD_KEYS:
            continue
        if not first:
            out.text(",")
        first = False
        out.text(f"{key}:{{")
        sep = _Comma(out)
        if _get(value, "description"):
            out.text("description:")
            out.quoted(str(value["description"]))
            sep.on = True
        kind = _upper(_get(value, "type"))
        if kind == "STRING":
            if _get(value, "enum"):
                sep()
                out.text("enum:")
                argument(out, value["enum"])
        elif kind == "ARRAY":
            items = _get(value, "items")
            if isinstance(items, Mapping) and items:
                sep()
                out.text("items:{")
                inner_first = True
                for item_key, item_value in _sorted_items(items):
                    if item_value is None:
                        continue
                    if not inner_first:
                        out.text(",")
                    inner_first = False
                    if item_key == "properties":
                        out.text("properties:{")
                        if isinstance(item_value, Mapping):
                            _parameters(out, item_value)
                        out.text("}")
                    elif item_key == "required":
                        out.text("required:")
                        _quoted_list(out, item_value)
                    elif item_key == "type":
                        out.text("type:")
                        if isinstance(item_value, str):
                            argument(out, item_value.upper())
                        else:
                            argument(out, [_upper(v) for v in item_value])
                    else:
                        out.text(f"{item_key}:")
                        argument(out, item_value)
                out.text("}")
        if _get(value, "nullable"):
            sep()
            out.text("nullable:true")
        if kind == "OBJECT":
            if isinstance(_get(value, "properties"), Mapping):
                sep()
                out.text("properties:{")
                _parameters(out, value["properties"])
                out.text("}")
            elif isinstance(value, Mapping):
                sep()
                out.text("properties:{")
                _parameters(out, value, filter_keys=True)
                out.text("}")
            if _get(value, "required"):
                sep()
                out.text("required:")
                _quoted_list(out, value["required"])
        sep()
        out.text("type:")
        out.quoted(kind)
        out.text("}")


def declaration(out: Parts, tool: Mapping, where: str) -> None:
    """One tool of `tools` (an OpenAI function schema: {"type": "function", "function": {name, description,
    parameters}}) as <|tool>declaration:NAME{description:...,parameters:{...}}<tool|>."""
    function = _get(tool, "function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise GemmaError(f"chat: {where} must be an object with a 'function' object that has a 'name'")
    params = function.get("parameters")
    if params is not None and not isinstance(params, Mapping):
        raise GemmaError(f"chat: {where} has 'parameters' that are not an object (a JSON schema)")
    out.mark("<|tool>")
    out.text(f"declaration:{function['name']}{{description:")
    out.quoted("" if function.get("description") is None else str(function["description"]))
    if params:
        out.text(",parameters:{")
        if isinstance(params.get("properties"), Mapping) and params["properties"]:
            out.text("properties:{")
            _parameters(out, params["properties"])
            out.text("},")
        if params.get("required"):
            out.text("required:")
            _quoted_list(out, params["required"])
            out.text(",")
        if params.get("type"):
            out.text("type:")
            out.quoted(_upper(params["type"]))
            out.text("}")
    if "response" in function:
        response = function["response"]
        out.text(",response:{")
        if _get(response, "description"):
            out.text("description:")
            out.quoted(str(response["description"]))
            out.text(",")
        if _upper(_get(response, "type")) == "OBJECT":
            out.text("type:")
            out.quoted("OBJECT")
            out.text("}")
    out.text("}")
    out.mark("<tool|>")


# ---- messages ------------------------------------------------------------------------------------------------------


def strip_thinking(text: str) -> str:
    """A model turn's content without its <|channel>...<channel|> spans (earlier thoughts leave the history)."""
    result = ""
    for part in text.split("<channel|>"):
        result += part.split("<|channel>")[0] if "<|channel>" in part else part
    return result.strip()


def _text_of(content: Any, model: bool, where: str) -> str:
    if isinstance(content, str):
        return strip_thinking(content) if model else content.strip()
    if content is None:
        return ""
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        text = ""
        for i, item in enumerate(content):
            kind = _get(item, "type")
            if kind == "text":
                body = item.get("text")
                if not isinstance(body, str):
                    raise GemmaError(f"chat: {where} content part {i} has no 'text' string")
                text += strip_thinking(body) if model else body.strip()
            elif kind in ("image", "image_url", "audio", "input_audio", "video"):
                raise GemmaError(f"chat: {where} content part {i} is {kind}: only text is supported")
        return text
    raise GemmaError(f"chat: {where} content must be a string or a list of text parts, got {type(content).__name__}")


def _response_block(out: Parts, name: str, response: Any) -> None:
    out.mark("<|tool_response>")
    out.text(f"response:{name}{{")
    if isinstance(response, Mapping):
        for n, (key, value) in enumerate(_sorted_items(response)):
            if n:
                out.text(",")
            out.text(f"{key}:")
            argument(out, value, escape_keys=False)
    else:
        out.text("value:")
        argument(out, response, escape_keys=False)
    out.text("}")
    out.mark("<tool_response|>")


def _tool_body(content: Any, where: str) -> Any:
    """A tool message's content as the template hands it to the response block: text parts joined."""
    if isinstance(content, Mapping):  # the template would iterate its keys as parts and fail
        raise GemmaError(
            f"chat: {where} content must be a string (JSON text for a structured result) or a list of text parts"
        )
    if isinstance(content, Sequence) and not isinstance(content, (str, bytes, bytearray)):
        text = ""
        for i, part in enumerate(content):
            kind = _get(part, "type")
            if kind == "text":
                text += part.get("text") or ""
            elif kind is not None:
                raise GemmaError(f"chat: {where} content part {i} is {kind}: only text is supported")
        return text
    return content


def _calls(out: Parts, calls: Any, where: str) -> None:
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise GemmaError(f"chat: {where} 'tool_calls' must be a list")
    for i, call in enumerate(calls):
        function = _get(call, "function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise GemmaError(f"chat: {where} tool call {i} must have a 'function' with a 'name'")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            raise GemmaError(
                f"chat: {where} tool call {i} has 'arguments' as a string; give them as an object "
                "(json.loads the string first), as the template needs"
            )
        if arguments is not None and not isinstance(arguments, Mapping):
            raise GemmaError(f"chat: {where} tool call {i} has 'arguments' that are not an object")
        out.mark("<|tool_call>")
        out.text(f"call:{function['name']}{{")
        for n, (key, value) in enumerate(_sorted_items(arguments or {})):
            if n:
                out.text(",")
            out.text(f"{key}:")
            argument(out, value, escape_keys=False)
        out.text("}")
        out.mark("<tool_call|>")


def check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise GemmaError("chat: messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise GemmaError(f"chat: message {i} must be a dict with a 'role'")
        if m["role"] not in ROLES:
            raise GemmaError(f"chat: message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if "content" not in m and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise GemmaError(f"chat: message {i} has no 'content'")
        for key in ("reasoning", "reasoning_content"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise GemmaError(f"chat: message {i} '{key}' must be a string")
    for i, m in enumerate(messages):
        if m["role"] != "tool":
            continue
        before = next((messages[j] for j in range(i - 1, -1, -1) if messages[j]["role"] != "tool"), None)
        if before is None or before["role"] not in ("assistant",) or not before.get("tool_calls"):
            raise GemmaError(
                f"chat: message {i} is a tool response with no tool call before it (an assistant message with "
                "'tool_calls' must come first)"
            )


def render(
    ids: Mapping[str, int],
    bos: int,
    messages,
    add_generation_prompt: bool = True,
    tools=None,
    enable_thinking: bool = False,
) -> Parts:
    """The official template's rendering of `messages` (and `tools`) as tagged Parts: `.merged()` gives the marker
    ids and text spans that apply_chat encodes; the tags say which spans a model turn writes (for training)."""
    check_messages(messages)
    if tools is not None and (not isinstance(tools, Sequence) or isinstance(tools, (str, bytes))):
        raise GemmaError("chat: tools must be a list of function schemas")
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, Mapping):
            raise GemmaError(f"chat: tool {i} is not an object (an OpenAI function schema)")
    out = Parts(ids)
    out._add(bos)
    prev_type = None  # what the last thing written was: think, tool, tool_call, tool_response
    turns = list(messages)
    first = messages[0]["role"] in ("system", "developer")
    if enable_thinking or tools or first:
        out.mark("<|turn>")
        out.text("system\n")
        if enable_thinking:
            out.mark("<|think|>")
            out.text("\n")
            prev_type = "think"
        if first:
            content = messages[0].get("content")
            if isinstance(content, str):
                out.text(content.strip())
            elif isinstance(content, Sequence):
                for item in content:
                    text = _get(item, "text")
                    out.text(("" if text is None else str(text)).strip() + " ")
            turns = turns[1:]
        for i, tool in enumerate(tools or []):
            declaration(out, tool, f"tool {i}")
            prev_type = "tool"
        out.mark("<turn|>")
        out.text("\n")

    offset = len(messages) - len(turns)
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
    prev_non_tool_role = None
    for i, message in enumerate(turns):
        if message["role"] == "tool":
            continue
        where = f"message {i + offset}"
        prev_type = None
        role = "model" if message["role"] == "assistant" else message["role"]
        if not (role == "model" and prev_non_tool_role == "assistant"):  # consecutive assistants: one model turn
            out.mark("<|turn>")
            out.text(role + "\n")
        model = role == "model"
        thinking = message.get("reasoning") or message.get("reasoning_content")
        if thinking and i > last_user:
            out.tag = "thought" if model else "prompt"
            out.mark("<|channel>")
            out.text("thought\n" + thinking + "\n")
            out.mark("<channel|>")
        out.tag = "model" if model else "prompt"
        calls = message.get("tool_calls")
        if calls:
            _calls(out, calls, where)
            prev_type = "tool_call"
        responded = False
        if calls:  # the tool messages that follow answer them, in order
            for k in range(i + 1, len(turns)):
                follow = turns[k]
                if follow["role"] != "tool":
                    break
                name = follow.get("name") or "unknown"
                for call in calls:
                    if _get(call, "id") == follow.get("tool_call_id"):
                        name = call["function"]["name"]
                out.tag = "prompt"  # the tools' answers, not the model's
                _response_block(out, str(name), _tool_body(follow.get("content"), f"message {k + offset}"))
                responded = True
                prev_type = "tool_response"
        out.tag = "model" if model else "prompt"
        content = _text_of(message.get("content"), model, where)
        out.text(content)
        has_content = bool(content.strip())
        following = next((m["role"] for m in turns[i + 1 :] if m["role"] != "tool"), None)
        continues = role == "model" and following == "assistant" and (not calls or responded)
        if prev_type == "tool_call" and not responded:
            out.mark("<|tool_response>")  # where the model stops for the tools to run
        elif not continues and not (responded and not has_content and following is None):  # else: one model turn
            out.mark("<turn|>")
            out.tag = "prompt"
            out.text("\n")
        out.tag = "prompt"
        prev_non_tool_role = message["role"]

    if add_generation_prompt:
        if prev_type not in ("tool_response", "tool_call"):
            out.mark("<|turn>")
            out.text("model\n")
        elif prev_type == "tool_response" and enable_thinking:
            out.mark("<|channel>")
            out.text("thought\n")
    return out
