"""Serve a Gemma model over HTTP with OpenAI's API, so that existing OpenAI clients can use it.

    python tools/serve.py [--model SRC] [--adapter DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...

Routes:
  POST /v1/chat/completions   chat, with the model's chat template ("stream": true for server-sent events)
  POST /v1/completions        raw text (or token ids) continued as is, no template (streams too)
  GET  /v1/models, /health    the model served; liveness and load
  POST /nlg/text_generate     the older Gemma-SFT API: {"instruction", "text", "max_new_tokens", "temperature",
                              "top_p", "top_k", "do_sample"} in, the reply text (a JSON string) out

Requests that arrive together share forward passes: gemma.engine batches them, each joining at the next step and
leaving when done. A client that disconnects stops its generation. Sampling: `max_tokens` (or
`max_completion_tokens`), `temperature` (OpenAI's default 1; 0 = greedy), `top_p`, `top_k`, `min_p`,
`repetition_penalty`, `stop`, `seed`, `n` = 1; `stream_options.include_usage` adds a usage chunk. Greedy replies
are gemma.generate's for the prompt alone when the model runs in fp32; in bf16 (or fp16) a near-tie between two
tokens can come out either way depending on which other requests share the batch (seen: 28 of 30 replies equal
under 8 concurrent clients), as rounding differs with the batch's shape.

Safety (the HTTP side is tools/serve_guard.py): it listens on 127.0.0.1 unless --host says otherwise, and answers
only requests whose Host names an address it listens on (--allow-host adds names) and that come from no other
site's page (Origin); POST bodies must be labelled application/json. With --api-key (or GEMMA_SFT_API_KEY) the /v1
and /nlg routes need `Authorization: Bearer KEY`. A client gets --header-timeout seconds for its headers and
--body-timeout for its body (408 after), so slow clients cannot tie the server up. A malformed or unsupported
request gets a 4xx with an OpenAI-style error body ({"error": {"message", "type", "param", "code"}}), a declared
body over --max-body-bytes gets 413 before it is read, and the server goes on. On SIGTERM, live requests get
--shutdown-grace seconds to finish; streams still open then end with finish_reason "abort" and `data: [DONE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from gemma.cli import add_model_args, load_model, main_guard
from gemma.errors import GemmaError
from gemma.files import MAX_JSON_DEPTH, has_lone_surrogate, json_depth_ok

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import StreamingResponse
except ImportError as exc:  # pragma: no cover - depends on the installation
    print(f"error: tools/serve.py needs the 'serve' extra ({exc.name} is not installed): "
          "pip install -e '.[serve]'", file=sys.stderr)
    sys.exit(2)

from serve_guard import AllowedHosts, Guard, GuardedH11Protocol, error_response  # noqa: E402 - needs the extra

API_KEY_ENV = "GEMMA_SFT_API_KEY"
PROTECTED = ("/v1/", "/nlg/")  # path prefixes that need the API key, when there is one
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
ABORT_WAIT_S = 1.0  # at shutdown, how long a stream waits for the engine to stop its generation before ending anyway
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


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of pydantic's first complaint, e.g. ("max_tokens: Input should be a valid integer", ...)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    if first.get("type") == "missing" and not loc:
        return "the body must be a JSON object", None
    return (f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid body")), \
        (loc[0] if loc else None)


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
        raise ApiError(400, f"{where}: holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                            "which is not text", where.split(".")[0])
    return value


async def parse_body(http: Request, model: type["_Body"]) -> "_Body":
    """The request's body as `model`, or a 400 naming the field that is wrong."""
    value = request_json(await http.body())
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ApiError(400, *_validation_message(exc.errors())) from None


# ---- request bodies ------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    # Strict: "5" is not an integer and 1 is not a boolean; NaN and infinities are refused. Unknown fields are
    # ignored, as clients send fields of newer API versions.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


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


def _refuse_unsupported(body: _Sampling) -> None:
    neutral = {"n": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "logit_bias": (None, {}), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "tools": (None, []),
               "tool_choice": (None, "none", "auto"), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1)}
    for field, allowed in neutral.items():
        value = getattr(body, field, None)
        if value not in allowed:
            raise ApiError(400, f"{field}={json.dumps(value)} is not supported by this server", field)
    fmt = getattr(body, "response_format", None)
    if fmt and fmt.get("type") not in (None, "text"):
        raise ApiError(400, f"response_format {fmt.get('type')!r} is not supported (only 'text')", "response_format")


def chat_messages(body: ChatRequest) -> list[dict]:
    """The messages as apply_chat takes them: text parts joined, "developer" as "system"."""
    if not body.messages:
        raise ApiError(400, "messages must hold at least one message", "messages")
    out = []
    for i, m in enumerate(body.messages):
        if m.content is None:
            raise ApiError(400, f"messages.{i}: a message needs content", "messages")
        text = m.content if isinstance(m.content, str) else "\n".join(part.text for part in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", "messages")
    return out


def completion_prompt(body: CompletionRequest, tokenizer) -> list[int]:
    """Text is encoded as is with <bos> (no template; chat markers written in it count); ids are taken as given."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request is supported", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=True)
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    return list(prompt)


def sampling_settings(body: _Sampling, prompt_len: int, context: int, max_new: int | None, vocab: int) -> dict:
    """Engine settings from OpenAI's fields, or a 400 that says what is wrong."""
    if prompt_len >= context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your prompt has "
                            f"{prompt_len} tokens.", "messages" if isinstance(body, ChatRequest) else "prompt",
                       "context_length_exceeded")
    if max_new is None:
        max_new = context - prompt_len
    elif max_new < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_new}", "max_tokens")
    elif prompt_len + max_new > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_len + max_new} tokens ({prompt_len} in the prompt, {max_new} in the "
                            "completion). Please reduce the prompt or max_tokens.", "max_tokens",
                       "context_length_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 16 or any(not 0 < len(s) <= 256 for s in stop):
        raise ApiError(400, "stop must be a string of 1 to 256 characters or a list of at most 16 of them", "stop")
    return dict(max_new_tokens=max_new, stop_strings=stop,
                **checked_sampling(1.0 if body.temperature is None else body.temperature, body.top_k, body.top_p,
                                   body.min_p, body.repetition_penalty, body.seed, vocab))


def checked_sampling(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
                     repetition_penalty: float | None, seed: int | None, vocab: int) -> dict:
    """The engine's sampling settings, each value checked here (a 400 naming the parameter) so that nothing reaches
    the sampler that would overflow its arithmetic or mean nothing. Comparisons are written so that NaN fails them.
    Neutral values become "off": top_k None, 0, -1 or at least the vocabulary; top_p 1; min_p 0."""
    low, high = TEMPERATURE_RANGE
    if temperature != 0 and not low <= temperature <= high:
        raise ApiError(400, f"temperature must be 0 (greedy) or in [{low:g}, {high:g}], got {temperature}",
                       "temperature")
    if top_k is not None and top_k < -1:
        raise ApiError(400, f"top_k must be a positive integer (or 0 or -1: off), got {top_k}", "top_k")
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ApiError(400, f"min_p must be in [0, 1], got {min_p}", "min_p")
    low, high = REPETITION_PENALTY_RANGE
    if repetition_penalty is not None and not low <= repetition_penalty <= high:
        raise ApiError(400, f"repetition_penalty must be in [{low:g}, {high:g}] (1 = off), got {repetition_penalty}",
                       "repetition_penalty")
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ApiError(400, f"seed must be an integer in [-2**63, 2**64), got {seed}", "seed")
    return dict(temperature=temperature, top_k=top_k if top_k is not None and 0 < top_k < vocab else None,
                top_p=top_p if top_p not in (None, 1.0) else None, min_p=min_p or None,
                repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty, seed=seed)


# ---- the app -------------------------------------------------------------------------------------------------------


class LiveGenerations:
    """The generations being served, so that a shutdown can end each reply properly: uvicorn alone would cancel their
    tasks once its grace period is over, cutting streams off with no final event."""

    def __init__(self):
        self.open: set[_Generation] = set()
        self.closing = False  # once set, new requests get 503

    def abort_all(self) -> None:
        """Stop every live generation (on the event loop); streams then end with finish_reason "abort"."""
        for gen in list(self.open):
            gen.abort()


class _Generation:
    """One engine request seen from the event loop: its events arrive through an asyncio queue."""

    def __init__(self, engine, prompt: list[int], settings: dict, http: Request, live: LiveGenerations):
        from gemma.engine import EngineBusy, EngineClosed

        if live.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.http, self.live = http, live
        self.prompt_tokens = len(prompt)
        self.aborted_at: float | None = None  # when the shutdown stopped it
        try:
            self.request = engine.submit(prompt, **settings,
                                         sink=lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event))
        except GemmaError as exc:
            raise ApiError(400, str(exc)) from None
        except EngineBusy as exc:
            raise ApiError(503, f"the server is busy ({exc}); try again later", code="overloaded") from None
        except EngineClosed as exc:
            raise ApiError(503, str(exc), code="unavailable") from None
        live.open.add(self)
        self._checked = time.monotonic()

    @property
    def aborted(self) -> bool:
        return self.aborted_at is not None

    async def next_event(self):
        """The next Delta or Finish, or None once the client has gone (the generation is then cancelled). After an
        abort, the engine's Finish ("cancelled"), or a Finish("abort") of our own if the engine is slow to stop."""
        from gemma.engine import Finish

        while True:
            if self.aborted and time.monotonic() - self.aborted_at > ABORT_WAIT_S:
                return Finish("abort", (), "", self.prompt_tokens)
            if time.monotonic() - self._checked > DISCONNECT_POLL_S:
                self._checked = time.monotonic()
                if await self.http.is_disconnected():
                    self.cancel()
                    return None
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue

    async def finish(self):
        """Wait for the Finish (None if the client left)."""
        from gemma.engine import Finish

        while True:
            event = await self.next_event()
            if event is None or isinstance(event, Finish):
                return event

    def abort(self) -> None:
        self.aborted_at = time.monotonic()
        self.request.cancel()

    def cancel(self) -> None:
        self.live.open.discard(self)
        self.request.cancel()


class EventStream(StreamingResponse):
    """Server-sent events; the generator is closed however the stream ends (a send to a gone client raises), so
    that its generation is cancelled at once."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _failed(finish) -> ApiError:
    return ApiError(503 if "closed" in (finish.error or "") else 500, f"generation failed: {finish.error}")


def include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def stream_reply(gen, delta_chunk, final_chunk, with_usage: bool, first: dict | None = None) -> "EventStream":
    """Server-sent events in OpenAI's chunk format for one generation, ending with a final chunk (its
    finish_reason) and [DONE], also when the shutdown stops it; the generation is cancelled when the client goes
    away."""
    from gemma.engine import Delta

    async def events():
        try:
            if first is not None:
                yield sse(first)
            while (event := await gen.next_event()) is not None:
                if isinstance(event, Delta):
                    yield sse(delta_chunk(event.text))
                    continue
                if event.reason == "error":
                    yield sse({"error": {"message": f"generation failed: {event.error}",
                                         "type": "server_error", "param": None, "code": None}})
                else:
                    # A generation stopped by the shutdown ends as vLLM ends an aborted one.
                    final = final_chunk("abort" if gen.aborted else event.reason)
                    yield sse(final)
                    if with_usage and event.reason != "abort":  # our own Finish("abort") has no counts
                        yield sse({**final, "choices": [],
                                   "usage": usage(event.prompt_tokens, event.completion_tokens)})
                yield "data: [DONE]\n\n"
                return
        finally:
            gen.cancel()

    return EventStream(events())


async def finish_reply(gen):
    """The generation's Finish, or the response to send instead (499 when the client left; errors raise)."""
    try:
        finish = await gen.finish()
    finally:
        gen.cancel()
    if finish is None:
        return error_response(499, "client closed the request")
    if gen.aborted:
        raise ApiError(503, "the server is shutting down", code="shutting_down")
    if finish.reason == "error":
        raise _failed(finish)
    return finish


def create_app(engine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20, *,
               hosts: AllowedHosts | None = None, body_timeout: float = 30.0, live: LiveGenerations | None = None):
    """The ASGI app serving `engine` (a gemma.engine.Engine) as `model_name`, behind serve_guard's checks. `hosts`
    None answers any Host (the command passes the addresses it listens on); `live` is the registry a shutdown
    aborts."""
    from gemma.engine import Finish

    tokenizer = engine.tokenizer
    live = live if live is not None else LiveGenerations()
    started = int(time.time())
    app = FastAPI(title="gemma-sft", description="An OpenAI-compatible server for a Gemma model")

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return error_response(400, *_validation_message(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):  # a bug: answer 500 and keep serving
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health():
        s = engine.stats
        body = {"status": "ok" if engine.healthy else "unavailable", "model": model_name, "active": engine.active,
                "waiting": engine.waiting, "requests": s.requests, "cancelled": s.cancelled, "errors": s.errors,
                "new_tokens": s.new_tokens, "steps": s.steps,
                "mean_batch": round(s.rows_stepped / s.steps, 3) if s.steps else 0.0}
        return JSONResponse(body, 200 if engine.healthy else 503)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "gemma-sft"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise ApiError(404, f"The model {name!r} does not exist (this server has {model_name!r})", "model",
                           "model_not_found")
        return model_card()

    async def encode(fn, *args) -> list[int]:
        try:
            return await run_in_threadpool(fn, *args)
        except GemmaError as exc:
            raise ApiError(400, str(exc), "messages") from None

    def generation(prompt: list[int], settings: dict, http: Request) -> _Generation:
        return _Generation(engine, prompt, settings, http, live)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        body = await parse_body(http, ChatRequest)
        _refuse_unsupported(body)
        prompt = await encode(tokenizer.apply_chat, chat_messages(body))
        max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        gen = generation(prompt, sampling_settings(body, len(prompt), engine.context, max_new, engine.vocab_limit),
                         http)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        if body.stream:
            return stream_reply(gen, lambda text: chunk({"content": text}), lambda reason: chunk({}, reason),
                                include_usage(body), first=chunk({"role": "assistant", "content": ""}))
        finish = await finish_reply(gen)
        if not isinstance(finish, Finish):
            return finish
        return {"id": ident, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": finish.text},
                             "logprobs": None, "finish_reason": finish.reason}],
                "usage": usage(finish.prompt_tokens, finish.completion_tokens)}

    @app.post("/v1/completions")
    async def completions(http: Request):
        body = await parse_body(http, CompletionRequest)
        _refuse_unsupported(body)
        prompt = completion_prompt(body, tokenizer)
        gen = generation(prompt, sampling_settings(body, len(prompt), engine.context, body.max_tokens,
                                                   engine.vocab_limit), http)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish_reason: str | None = None) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        if body.stream:
            return stream_reply(gen, chunk, lambda reason: chunk("", reason), include_usage(body))
        finish = await finish_reply(gen)
        if not isinstance(finish, Finish):
            return finish
        return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": finish.text, "logprobs": None, "finish_reason": finish.reason}],
                "usage": usage(finish.prompt_tokens, finish.completion_tokens)}

    @app.post("/nlg/text_generate")
    async def text_generate(http: Request):
        from train.data import record_messages

        body = await parse_body(http, TextGenerateRequest)
        if body.num_beams != 1:
            raise ApiError(400, "num_beams must be 1 (beam search is not supported)", "num_beams")
        # The user turn as training builds it from an alpaca record: the instruction, then the text after a blank line.
        user = record_messages({"instruction": body.instruction, "input": body.text, "output": ""}, "request")[:-1]
        prompt = await encode(tokenizer.apply_chat, user)
        if len(prompt) >= engine.context:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) does not fit the context of {engine.context} "
                                "tokens", "text", "context_length_exceeded")
        if body.max_new_tokens < 1:
            raise ApiError(400, f"max_new_tokens must be at least 1, got {body.max_new_tokens}", "max_new_tokens")
        greedy = not body.do_sample or body.temperature == 0
        sampling = checked_sampling(0.0 if greedy else body.temperature, body.top_k, body.top_p, None, None, None,
                                    engine.vocab_limit)
        if greedy:
            sampling.update(top_k=None, top_p=None)
        settings = dict(max_new_tokens=min(body.max_new_tokens, engine.context - len(prompt)), **sampling)
        finish = await finish_reply(generation(prompt, settings, http))
        if not isinstance(finish, Finish):
            return finish
        return JSONResponse(finish.text)

    return Guard(app, api_key=api_key, protected=PROTECTED, max_body=max_body_bytes, body_timeout=body_timeout,
                 hosts=hosts)


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGTERM, Ctrl-C) also ends the replies in progress properly: new requests
    get 503, live ones get `grace` seconds to finish, then every generation still running is stopped, its stream
    ending with a final chunk (finish_reason "abort") and [DONE]. uvicorn cancels whatever is left a little later."""

    def __init__(self, config: uvicorn.Config, live: LiveGenerations, grace: float):
        super().__init__(config)
        self.live, self.grace = live, grace

    async def shutdown(self, sockets=None) -> None:
        self.live.closing = True
        asyncio.get_running_loop().call_later(self.grace, self.live.abort_all)
        await super().shutdown(sockets)


# ---- the command ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/serve.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    p.add_argument("--allow-host", metavar="NAME[:PORT]", action="append", default=[],
                   help="also answer requests whose Host (or Origin) is NAME, with any port or PORT only; repeatable; "
                        "'*' allows any (default: only the loopback names and the address listened on, with its "
                        "port: a guard against DNS rebinding)")
    p.add_argument("--model-name", metavar="NAME", default=None,
                   help="the model id that /v1/models reports (default: the --model argument)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens one request may span, prompt and reply (default: the model's context, at most 8192)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued for a free row before the server answers 503 (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections, slow ones included, before a new one gets 503 (default 1000, lowered "
                        "to what the process may open)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a client has to send a request's headers, then 408 (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a client has to send a request's body, then 408 (default 30)")
    p.add_argument("--shutdown-grace", type=float, default=5.0, metavar="S",
                   help="on SIGTERM, seconds live requests get to finish before open streams are ended with "
                        "finish_reason 'abort' (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model (default: torch's)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="server log level (default info: one line per request)")
    return p


def check_numbers(args) -> None:
    for name, low in (("max_batch", 1), ("max_len", 2), ("max_waiting", 1), ("max_body_bytes", 1024), ("threads", 1),
                      ("max_connections", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise GemmaError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    for name, low in (("header_timeout", 0.1), ("body_timeout", 0.1), ("shutdown_grace", 0.0)):
        value = getattr(args, name)
        if not low <= value <= 86400:  # NaN fails too
            raise GemmaError(f"--{name.replace('_', '-')} must be in [{low:g}, 86400] seconds, got {value}")
    if not 0 <= args.port <= 65535:
        raise GemmaError(f"--port must be in 0..65535, got {args.port}")


def api_key_of(args) -> str | None:
    """The key from --api-key, else from $GEMMA_SFT_API_KEY, else None (no key). An empty one is an error, not "no
    key": a variable that a script meant to fill but left empty must not open the server to everyone."""
    if args.api_key is not None:
        key, where = args.api_key, "--api-key"
    elif API_KEY_ENV in os.environ:
        key, where = os.environ[API_KEY_ENV], API_KEY_ENV
    else:
        return None
    if not key.strip():
        raise GemmaError(f"{where} is empty: give a key, or {'leave it out' if where == '--api-key' else 'unset it'} "
                         "to serve without one")
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise GemmaError(f"{where} starts or ends with spaces or holds a control character, which an HTTP header "
                         "cannot carry")
    return key


def connection_cap(requested: int) -> int:
    """--max-connections, lowered to what the process may open: each connection is a file, and the model's files
    and the server's own need some more."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # not Unix
        return requested
    if soft == resource.RLIM_INFINITY or soft - 64 >= requested:
        return requested
    print(f"[--max-connections lowered to {max(1, soft - 64)}: this process may open {soft} files]", file=sys.stderr)
    return max(1, soft - 64)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the (slow) model load so that a taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise GemmaError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_numbers(args)
    api_key = api_key_of(args)
    AllowedHosts([], 0, args.allow_host)  # a malformed --allow-host fails now, before the model loads

    from gemma.engine import Engine

    source = args.size or args.model
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    hosts = AllowedHosts([args.host, host], port, args.allow_host)
    max_connections = connection_cap(args.max_connections)
    model, tokenizer, loaded = load_model(args)
    print(f"[{loaded}]", file=sys.stderr)

    max_len = args.max_len or min(model.config.max_seq_len, 8192)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_len=max_len, max_waiting=args.max_waiting,
                    threads=args.threads)
    name = args.model_name or (Path(source).name if Path(source).exists() else source)
    live = LiveGenerations()
    app = create_app(engine, name, api_key, args.max_body_bytes, hosts=hosts, body_timeout=args.body_timeout,
                     live=live)
    if not api_key and host not in ("127.0.0.1", "::1") and not host.startswith("127."):
        print(f"[warning: listening on {host} without --api-key: anyone who reaches this machine can use the model]",
              file=sys.stderr)
    print(f"[serving {name} on {url_of(sock)}: batch {args.max_batch}, context {engine.context} tokens, "
          f"KV cache {engine.cache_bytes / 2**20:.0f} MiB{', API key required' if api_key else ''}]",
          file=sys.stderr, flush=True)
    # No limit_concurrency: uvicorn counts connections still sending their headers toward it, so slow clients could
    # get everyone a 503. Load is bounded by the engine's queue (--max-waiting) and --max-connections instead.
    # Our h11 protocol whether or not httptools is installed: the header deadline lives there.
    config = uvicorn.Config(app, http=GuardedH11Protocol.configured(args.header_timeout, max_connections),
                            ws="none", log_level=args.log_level, lifespan="off",
                            timeout_graceful_shutdown=args.shutdown_grace + ABORT_WAIT_S + 1)
    try:
        Server(config, live, args.shutdown_grace).run(sockets=[sock])
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
