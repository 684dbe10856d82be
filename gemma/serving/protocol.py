"""OpenAI's API as the server speaks it: the request bodies (pydantic models, strict), how a body is read and
checked (JSON that Python's parser would choke on, lone surrogates, unsupported parameters, sampling values out of
range), and the error every refusal becomes (`ApiError`, answered as {"error": {"message", "type", "param",
"code"}} by gemma/serving/app.py). Nothing here touches the engine: each function maps a body to what the engine
takes (a prompt's ids, the settings as one gemma.generation.sampling.SamplingParams), or raises ApiError."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from gemma.errors import GemmaError
from gemma.files import MAX_JSON_DEPTH, has_lone_surrogate, json_depth_ok
from gemma.generation.logprobs import MAX_TOP_LOGPROBS
from gemma.generation.sampling import SamplingParams

# Sampling values outside these ranges are refused: beyond them the sampler's arithmetic overflows (logits divided
# by a vanishing temperature, or by a vanishing repetition penalty, become inf and the probabilities NaN), or the
# value means nothing (a temperature of 1e6 is uniform noise).
TEMPERATURE_RANGE = (1e-6, 100.0)
REPETITION_PENALTY_RANGE = (0.01, 100.0)
SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator takes


# ---- errors, OpenAI style ------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of pydantic's first complaint, e.g. ("max_tokens: Input should be a valid integer", ...)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    if first.get("type") == "missing" and not loc:
        return "the body must be a JSON object", None
    return (f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid body")), (
        loc[0] if loc else None
    )


# ---- the body as JSON ----------------------------------------------------------------------------------------------


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def lone_surrogate_at(value: Any) -> str | None:
    """The path ('messages.0.content') of the first string or key in `value` that holds a lone surrogate, or None.
    Walked in document order with a stack of our own, so that no depth can reach Python's recursion limit."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                return where or "body"
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                path = f"{where}.{key}" if where else key
                if has_lone_surrogate(key):
                    return _printable(path)
                stack.append((child, path))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{i}") for i, child in reversed(list(enumerate(item))))
    return None


# A lone surrogate can only come from a \uD800-\uDFFF escape (as raw bytes it is not UTF-8): a body without one
# skips the walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def request_json(raw: bytes) -> Any:
    """A request body's JSON value, or a 400 saying what is wrong with it: not UTF-8, nested deeper than
    MAX_JSON_DEPTH (Python's parser would hit its recursion limit), malformed, or holding a lone surrogate, which
    is valid JSON but no text (the tokenizer could not encode it, nor the reply echo it). NaN and infinities parse
    here, so that the field they are in is refused by name."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not UTF-8 (byte {exc.start})") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and not json_depth_ok(text):
        raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError also covers integers of more than 4300 digits
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    where = lone_surrogate_at(value) if _SURROGATE_ESCAPE.search(text) else None
    if where is not None:
        raise ApiError(
            400,
            f"{where}: holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not text",
            where.split(".")[0],
        )
    return value


async def parse_body(http: Request, model: type["_Body"]) -> "_Body":
    """The request's body as `model`, or a 400 naming the field that is wrong."""
    value = request_json(await http.body())
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ApiError(400, *validation_message(exc.errors())) from None


# ---- request bodies ------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    # Strict: "5" is not an integer and 1 is not a boolean; NaN and infinities are refused. Unknown fields are
    # ignored, as clients send fields of newer API versions.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; an object is taken too


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Gemma 4: an assistant's tool calls and thought, a tool message's answer to a call
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None  # any name is accepted: the server has one model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's; as vLLM: None, 0 or -1 = off
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI parameters this server does not implement: accepted at their neutral values only.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # as vLLM: {"enable_thinking": true}


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for this route (chat's is the rest of the context)
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextGenerateRequest(_Body):
    """The older Gemma-SFT API, with its defaults. num_beams must be 1; penalty_alpha is accepted and ignored."""

    instruction: str = ""
    text: str = ""
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 50
    do_sample: bool = True
    num_beams: int = 1
    penalty_alpha: float | None = None


def refuse_unsupported(body: _Sampling) -> None:
    """A 400 for an OpenAI parameter this server does not implement, unless it has its neutral value."""
    neutral = {
        "n": (None, 1),
        "presence_penalty": (None, 0),
        "frequency_penalty": (None, 0),
        "logit_bias": (None, {}),
        "suffix": (None, ""),
        "best_of": (None, 1),
    }
    for field, allowed in neutral.items():
        value = getattr(body, field, None)
        if value not in allowed:
            raise ApiError(400, f"{field}={json.dumps(value)} is not supported by this server", field)
    fmt = getattr(body, "response_format", None)
    if fmt and fmt.get("type") not in (None, "text"):
        raise ApiError(400, f"response_format {fmt.get('type')!r} is not supported (only 'text')", "response_format")


def chat_messages(body: ChatRequest) -> list[dict]:
    """The messages as apply_chat takes them: text parts joined (Gemma 1-3: "developer" as "system"; only user,
    assistant and system turns, the last from the user). Tool calls and responses, and thoughts, are Gemma 4's:
    their `arguments` are decoded from JSON here, as the template needs objects."""
    if not body.messages:
        raise ApiError(400, "messages must hold at least one message", "messages")
    out = []
    for i, m in enumerate(body.messages):
        text = m.content if isinstance(m.content, str) or m.content is None else "\n".join(p.text for p in m.content)
        if text is None and not m.tool_calls:
            raise ApiError(400, f"messages.{i}: a message needs content", "messages")
        message: dict[str, Any] = {"role": m.role, "content": text}
        if m.tool_calls:
            message["tool_calls"] = [_call(c, i, n) for n, c in enumerate(m.tool_calls)]
        for key in ("tool_call_id", "reasoning_content", "name"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        out.append(message)
    if out[-1]["role"] not in ("user", "tool"):
        raise ApiError(400, "the last message must be from the user (or a tool's answer)", "messages")
    return out


def gemma3_messages(messages: list[dict]) -> list[dict]:
    """Messages for Gemma 1-3's format: role and content, "developer" as "system"; tool turns are refused."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "tool" or m.get("tool_calls") or m.get("reasoning_content"):
            raise ApiError(400, f"messages.{i}: tool calls and thoughts need a Gemma 4 model", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", "messages")
    return out


def _call(call: ToolCall, i: int, n: int) -> dict:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            raise ApiError(
                400, f"messages.{i}.tool_calls.{n}: arguments are not valid JSON ({exc})", "messages"
            ) from None
        if not isinstance(arguments, dict):
            raise ApiError(400, f"messages.{i}.tool_calls.{n}: arguments must be a JSON object", "messages")
    out = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    return out if call.id is None else {"id": call.id, **out}


def chat_options(body: ChatRequest) -> dict[str, Any]:
    """apply_chat's tools and enable_thinking from the request: tool_choice "auto" (the default) or "none" (the
    model is not shown the tools); chat_template_kwargs may set enable_thinking (as vLLM takes it)."""
    choice = body.tool_choice
    if choice not in (None, "auto", "none"):
        shown_choice = json.dumps(choice) if not isinstance(choice, str) else repr(choice)
        raise ApiError(400, f'tool_choice {shown_choice} is not supported (only "auto" or "none")', "tool_choice")
    if body.tools is not None and not all(isinstance(t, dict) for t in body.tools):
        raise ApiError(400, "tools must be a list of function schemas (objects)", "tools")
    kwargs = dict(body.chat_template_kwargs or {})
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise ApiError(
            400, f"chat_template_kwargs {unknown[0]!r} is not supported (only enable_thinking)", "chat_template_kwargs"
        )
    thinking = kwargs.get("enable_thinking", False)
    if not isinstance(thinking, bool):
        raise ApiError(400, "chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
    tools = None if choice == "none" else (body.tools or None)
    return {"tools": tools, "enable_thinking": thinking}


def completion_prompts(body: CompletionRequest, tokenizer, vocab: int) -> list[tuple[list[int], str]]:
    """Each prompt's ids and its text (what `echo` shows). `prompt` is one text, one list of ids in [0, vocab),
    or a list of either (a batch: one choice each, in order). Text is encoded as is with <bos> (no template; chat
    markers written in it count); ids are taken as given, and their text is what they decode to (ids of the
    embedding's padding rows, which have no piece, to nothing)."""
    prompt = body.prompt
    many = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
    prompts = prompt if many else [prompt]
    if body.stream and len(prompts) > 1:
        raise ApiError(400, "stream takes one prompt (send a list of prompts without stream)", "prompt")
    out = []
    for i, one in enumerate(prompts):
        where = f"prompt.{i}" if many else "prompt"
        if isinstance(one, str):
            out.append((tokenizer.encode(one, bos=True), one))
        elif not one:
            raise ApiError(400, f"{where} is empty", "prompt")
        elif not all(0 <= i < vocab for i in one):
            raise ApiError(400, f"{where} holds something other than token ids in [0, {vocab})", "prompt")
        else:
            text = tokenizer.decode([i for i in one if i < tokenizer.vocab_size]) if body.echo else ""
            out.append((list(one), text))
    return out


def _top_logprobs(value, name: str) -> int:
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}], got {value}", name)
    return value


def completion_scoring(body: CompletionRequest) -> int | None:
    """How many alternatives each token's `logprobs` lists (None: no logprobs). Not with stream."""
    if body.stream and (body.logprobs is not None or body.echo):
        raise ApiError(
            400, "logprobs and echo are not supported with stream", "logprobs" if body.logprobs is not None else "echo"
        )
    return None if body.logprobs is None else _top_logprobs(body.logprobs, "logprobs")


def chat_scoring(body: ChatRequest) -> int | None:
    """How many alternatives each reply token lists (None: no logprobs): top_logprobs needs logprobs, as OpenAI's
    API has it. Not with stream."""
    if not body.logprobs:
        if body.top_logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return None
    if body.stream:
        raise ApiError(400, "logprobs are not supported with stream", "logprobs")
    return _top_logprobs(body.top_logprobs or 0, "top_logprobs")


def sampling_settings(
    body: _Sampling, prompt_len: int, context: int, max_new: int | None, vocab: int, least: int = 1
) -> SamplingParams:
    """The engine's settings from OpenAI's fields, or a 400 that says what is wrong. max_tokens must be at least
    `least` (0 where the prompt alone is wanted: an echo)."""
    if prompt_len >= context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, your prompt has {prompt_len} tokens.",
            "messages" if isinstance(body, ChatRequest) else "prompt",
            "context_length_exceeded",
        )
    if max_new is None:
        max_new = context - prompt_len
    elif max_new < least:
        raise ApiError(
            400,
            f"max_tokens must be at least {least}{' (0 only with echo)' if least else ''}, got {max_new}",
            "max_tokens",
        )
    elif prompt_len + max_new > context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + max_new} tokens ({prompt_len} in the prompt, {max_new} in the "
            "completion). Please reduce the prompt or max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 16 or any(not 0 < len(s) <= 256 for s in stop):
        raise ApiError(400, "stop must be a string of 1 to 256 characters or a list of at most 16 of them", "stop")
    return engine_params(
        max_new_tokens=max_new,
        stop_strings=stop,
        **checked_sampling(
            1.0 if body.temperature is None else body.temperature,
            body.top_k,
            body.top_p,
            body.min_p,
            body.repetition_penalty,
            body.seed,
            vocab,
        ),
    )


def engine_params(**settings) -> SamplingParams:
    """Settings this module has checked as the engine's SamplingParams. Its own checks are wider than ours, so it
    refuses none of them; should it ever, the refusal is a 400, as it was when the engine made it."""
    try:
        return SamplingParams(**settings)
    except GemmaError as exc:
        raise ApiError(400, str(exc)) from None


def checked_sampling(
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float | None,
    seed: int | None,
    vocab: int,
) -> dict:
    """The engine's sampling settings, each value checked here (a 400 naming the parameter) so that nothing reaches
    the sampler that would overflow its arithmetic or mean nothing. Comparisons are written so that NaN fails them.
    Neutral values become "off": top_k None, 0, -1 or at least the vocabulary; top_p 1; min_p 0."""
    low, high = TEMPERATURE_RANGE
    if temperature != 0 and not low <= temperature <= high:
        raise ApiError(
            400, f"temperature must be 0 (greedy) or in [{low:g}, {high:g}], got {temperature}", "temperature"
        )
    if top_k is not None and top_k < -1:
        raise ApiError(400, f"top_k must be a positive integer (or 0 or -1: off), got {top_k}", "top_k")
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ApiError(400, f"min_p must be in [0, 1], got {min_p}", "min_p")
    low, high = REPETITION_PENALTY_RANGE
    if repetition_penalty is not None and not low <= repetition_penalty <= high:
        raise ApiError(
            400,
            f"repetition_penalty must be in [{low:g}, {high:g}] (1 = off), got {repetition_penalty}",
            "repetition_penalty",
        )
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ApiError(400, f"seed must be an integer in [-2**63, 2**64), got {seed}", "seed")
    return dict(
        temperature=temperature,
        top_k=top_k if top_k is not None and 0 < top_k < vocab else None,
        top_p=top_p if top_p not in (None, 1.0) else None,
        min_p=min_p or None,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        seed=seed,
    )
