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
`repetition_penalty`, `stop`, `seed`, `n` = 1; `stream_options.include_usage` adds a usage chunk.

Safety: it listens on 127.0.0.1 unless --host says otherwise. With --api-key (or GEMMA_SFT_API_KEY) the /v1 and /nlg
routes need `Authorization: Bearer KEY`. A malformed or unsupported request gets a 4xx with an OpenAI-style error
body ({"error": {"message", "type", "param", "code"}}), bodies over --max-body-bytes get 413, and the server goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from gemma.cli import add_model_args, load_model, main_guard
from gemma.errors import GemmaError

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import StreamingResponse
except ImportError as exc:  # pragma: no cover - depends on the installation
    print(f"error: tools/serve.py needs the 'serve' extra ({exc.name} is not installed): "
          "pip install -e '.[serve]'", file=sys.stderr)
    sys.exit(2)

API_KEY_ENV = "GEMMA_SFT_API_KEY"
PROTECTED = ("/v1/", "/nlg/")  # path prefixes that need the API key, when there is one
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this, so that the client sees the 413


# ---- errors, OpenAI style ------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of pydantic's first complaint, e.g. ("max_tokens: Input should be a valid integer", ...)."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    if first.get("type") == "missing" and not loc:
        return "the body must be a JSON object", None
    return (f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid body")), \
        (loc[0] if loc else None)


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


def sampling_settings(body: _Sampling, prompt_len: int, context: int, max_new: int | None) -> dict:
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
    if body.temperature is not None and body.temperature != 0 and not 1e-6 <= body.temperature <= 100:
        # Below, logits / temperature can overflow (and sampling is greedy in all but name); above, it is noise.
        raise ApiError(400, f"temperature must be 0 (greedy) or in [1e-6, 100], got {body.temperature}",
                       "temperature")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 16 or any(not 0 < len(s) <= 256 for s in stop):
        raise ApiError(400, "stop must be a string of 1 to 256 characters or a list of at most 16 of them", "stop")
    return dict(max_new_tokens=max_new, temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k if body.top_k not in (None, 0, -1) else None,
                top_p=body.top_p if body.top_p not in (None, 1.0) else None,
                min_p=body.min_p or None,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                seed=body.seed, stop_strings=stop)


# ---- auth and body size, before the app reads anything --------------------------------------------------------


class Guard:
    """ASGI middleware: the API key on protected routes (401 before the body is read), then the body size (413).
    The body is read here, up to the limit, and handed on to the app."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["method"] == "POST":  # every body this API takes is JSON, whatever the client labels it
            scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                         + [(b"content-type", b"application/json")])
        if self.api_key and scope["path"].startswith(PROTECTED) and not self._authorized(headers):
            return await self._refuse(scope, receive, send, 401, "Incorrect or missing API key: send "
                                      "'Authorization: Bearer KEY'", "invalid_api_key")
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > DRAIN_LIMIT):
            return await self._refuse(scope, receive, send, 413 if declared.isdigit() else 400,
                                      "bad or oversized Content-Length", "request_too_large")
        body, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_body:
                body.append(chunk)
            if not message.get("more_body", False):
                break
            if size > DRAIN_LIMIT:
                break
        if size > self.max_body:
            return await self._refuse(scope, receive, send, 413, f"the request body ({size} bytes) is over the "
                                      f"limit of {self.max_body} bytes", "request_too_large")
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str, code: str):
        await error_response(status, message, code=code)(scope, receive, send)


# ---- the app -------------------------------------------------------------------------------------------------------


class _Generation:
    """One engine request seen from the event loop: its events arrive through an asyncio queue."""

    def __init__(self, engine, prompt: list[int], settings: dict, http: Request):
        from gemma.engine import EngineBusy, EngineClosed

        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.http = http
        self.prompt_tokens = len(prompt)
        try:
            self.request = engine.submit(prompt, **settings,
                                         sink=lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event))
        except GemmaError as exc:
            raise ApiError(400, str(exc)) from None
        except EngineBusy as exc:
            raise ApiError(503, f"the server is busy ({exc}); try again later", code="overloaded") from None
        except EngineClosed as exc:
            raise ApiError(503, str(exc), code="unavailable") from None
        self._checked = time.monotonic()

    async def next_event(self):
        """The next Delta or Finish, or None once the client has gone (the generation is then cancelled)."""
        while True:
            if time.monotonic() - self._checked > DISCONNECT_POLL_S:
                self._checked = time.monotonic()
                if await self.http.is_disconnected():
                    self.request.cancel()
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

    def cancel(self) -> None:
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
    """Server-sent events in OpenAI's chunk format for one generation, ending with [DONE]; the generation is
    cancelled when the client goes away."""
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
                    final = final_chunk(event.reason)
                    yield sse(final)
                    if with_usage:
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
    if finish.reason == "error":
        raise _failed(finish)
    return finish



def create_app(engine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20):
    """The ASGI app serving `engine` (a gemma.engine.Engine) as `model_name`."""
    from gemma.engine import Finish

    tokenizer = engine.tokenizer
    started = int(time.time())
    app = FastAPI(title="gemma-sft", description="An OpenAI-compatible server for a Gemma model")

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return error_response(400, *_validation_message(exc))

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

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: Request):
        _refuse_unsupported(body)
        prompt = await encode(tokenizer.apply_chat, chat_messages(body))
        max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        gen = _Generation(engine, prompt, sampling_settings(body, len(prompt), engine.context, max_new), http)
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
    async def completions(body: CompletionRequest, http: Request):
        _refuse_unsupported(body)
        prompt = completion_prompt(body, tokenizer)
        gen = _Generation(engine, prompt, sampling_settings(body, len(prompt), engine.context, body.max_tokens),
                          http)
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
    async def text_generate(body: TextGenerateRequest, http: Request):
        from train.data import record_messages

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
        settings = dict(max_new_tokens=min(body.max_new_tokens, engine.context - len(prompt)),
                        temperature=0.0 if greedy else body.temperature,
                        top_k=None if greedy or body.top_k in (0, -1) else body.top_k,
                        top_p=None if greedy or body.top_p == 1.0 else body.top_p)
        finish = await finish_reply(_Generation(engine, prompt, settings, http))
        if not isinstance(finish, Finish):
            return finish
        return JSONResponse(finish.text)

    return Guard(app, api_key, max_body_bytes)


# ---- the command ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/serve.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    p.add_argument("--model-name", metavar="NAME", default=None,
                   help="the model id that /v1/models reports (default: the --model argument)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens one request may span, prompt and reply (default: the model's context, at most 8192)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued for a free row before the server answers 503 (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model (default: torch's)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="server log level (default info: one line per request)")
    return p


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
    for name, low in (("max_batch", 1), ("max_len", 2), ("max_waiting", 1), ("max_body_bytes", 1024), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise GemmaError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if not 0 <= args.port <= 65535:
        raise GemmaError(f"--port must be in 0..65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise GemmaError("--api-key is empty")

    import uvicorn

    from gemma.engine import Engine

    source = args.size or args.model
    sock = listen(args.host, args.port)
    model, tokenizer, loaded = load_model(args)
    print(f"[{loaded}]", file=sys.stderr)

    max_len = args.max_len or min(model.config.max_seq_len, 8192)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_len=max_len, max_waiting=args.max_waiting,
                    threads=args.threads)
    name = args.model_name or (Path(source).name if Path(source).exists() else source)
    app = create_app(engine, name, api_key, args.max_body_bytes)
    host = sock.getsockname()[0]
    if not api_key and host not in ("127.0.0.1", "::1") and not host.startswith("127."):
        print(f"[warning: listening on {host} without --api-key: anyone who reaches this machine can use the model]",
              file=sys.stderr)
    print(f"[serving {name} on {url_of(sock)}: batch {args.max_batch}, context {engine.context} tokens, "
          f"KV cache {engine.cache_bytes / 2**20:.0f} MiB{', API key required' if api_key else ''}]",
          file=sys.stderr, flush=True)
    # Connections beyond what the engine can hold or queue get uvicorn's 503 at once.
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5, lifespan="off",
                            limit_concurrency=args.max_batch + args.max_waiting + 32)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
