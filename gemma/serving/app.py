"""The OpenAI-compatible app: a FastAPI app whose routes are the functions below, behind gemma/serving/guard.py.

Routes:
  POST /v1/chat/completions   chat, with the model's chat template ("stream": true for server-sent events)
  POST /v1/completions        raw text (or token ids) continued as is, no template (streams too)
  GET  /v1/models, /health    the model served; liveness and load
  POST /nlg/text_generate     the older Gemma-SFT API: {"instruction", "text", "max_new_tokens", "temperature",
                              "top_p", "top_k", "do_sample"} in, the reply text (a JSON string) out

`create_app(engine, model_name, ...)` builds it for a gemma.generation.Engine; each route finds the engine and the
name in `request.app.state.served` (a `Served`), so a route can be called with any app that carries one. Each
request becomes a `_Generation` (an engine request whose events arrive through an asyncio queue); a reply waits for
its Finish (`finish_reply`) or streams its Deltas (`stream_reply`). The request bodies, and how they are checked,
are gemma/serving/protocol.py's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from gemma.generation.engine import Delta, EngineBusy, EngineClosed, Finish
from gemma.generation.replies import Reply, ReplyStream, openai_tool_calls, parse_reply
from gemma.errors import GemmaError
from gemma.generation.sampling import SamplingParams
from gemma.serving.guard import AllowedHosts, Guard, error_response
from gemma.serving.logprobs import chat_logprobs, completion_logprobs
from gemma.serving.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    TextGenerateRequest,
    chat_messages,
    chat_options,
    checked_sampling,
    chat_scoring,
    completion_prompts,
    completion_scoring,
    engine_params,
    gemma3_messages,
    parse_body,
    refuse_unsupported,
    sampling_settings,
    validation_message,
)

PROTECTED = ("/v1/", "/nlg/")  # path prefixes that need the API key, when there is one
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
ABORT_WAIT_S = 1.0  # at shutdown, how long a stream waits for the engine to stop its generation before ending anyway


# ---- generations --------------------------------------------------------------------------------------------------


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

    def __init__(
        self, engine, prompt: list[int], params: SamplingParams, http: Request, live: LiveGenerations, **scoring
    ):
        if live.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.http, self.live = http, live
        self.prompt_tokens = len(prompt)
        self.aborted_at: float | None = None  # when the shutdown stopped it
        try:
            self.request = engine.submit(
                prompt,
                params=params,
                sink=lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event),
                **scoring,  # logprobs, prompt_logprobs
            )
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
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _failed(finish) -> ApiError:
    return ApiError(503 if "closed" in (finish.error or "") else 500, f"generation failed: {finish.error}")


def include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def stream_reply(gen, delta_chunk, final_chunk, with_usage: bool, first: dict | None = None) -> "EventStream":
    """Server-sent events in OpenAI's chunk format for one generation, ending with a final chunk (its
    finish_reason) and [DONE], also when the shutdown stops it; the generation is cancelled when the client goes
    away."""

    async def events():
        try:
            if first is not None:
                yield sse(first)
            while (event := await gen.next_event()) is not None:
                if isinstance(event, Delta):
                    for chunk in _chunks(delta_chunk(event.text)):
                        yield sse(chunk)
                    continue
                if event.reason == "error":
                    yield sse(
                        {
                            "error": {
                                "message": f"generation failed: {event.error}",
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        }
                    )
                else:
                    # A generation stopped by the shutdown ends as vLLM ends an aborted one.
                    *before, final = _chunks(final_chunk("abort" if gen.aborted else event.reason))
                    for chunk in before:
                        yield sse(chunk)
                    yield sse(final)
                    if with_usage and event.reason != "abort":  # our own Finish("abort") has no counts
                        yield sse(
                            {**final, "choices": [], "usage": usage(event.prompt_tokens, event.completion_tokens)}
                        )
                yield "data: [DONE]\n\n"
                return
        finally:
            gen.cancel()

    return EventStream(events())


def _chunks(made) -> list[dict]:
    """A chunk maker's result as a list (a maker may give one chunk, several, or none)."""
    return made if isinstance(made, list) else [made]


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


# ---- the routes ----------------------------------------------------------------------------------------------------


@dataclass
class Served:
    """What the routes serve: the engine, the model's name in /v1/models, the live generations a shutdown aborts."""

    engine: Any  # a gemma.generation.engine.Engine
    model_name: str
    live: LiveGenerations = field(default_factory=LiveGenerations)
    # (instruction, text) -> the user turn of /nlg/text_generate, as training builds it from an alpaca record (the
    # command passes train.data's rule, which gemma/ cannot import); None leaves the route out.
    instruction_messages: Callable[[str, str], list[dict]] | None = None
    started: int = field(default_factory=lambda: int(time.time()))  # the model card's "created"


def served(http: Request) -> Served:
    return http.app.state.served


async def api_error(request, exc: ApiError):
    return error_response(exc.status, exc.message, exc.param, exc.code)


async def invalid(request, exc: RequestValidationError):
    return error_response(400, *validation_message(exc.errors()))


async def http_error(request, exc: HTTPException):
    return error_response(exc.status_code, str(exc.detail))


async def crash(request, exc: Exception):  # a bug: answer 500 and keep serving
    return error_response(500, f"internal error: {type(exc).__name__}")


async def health(http: Request):
    state = served(http)
    engine, s = state.engine, state.engine.stats
    body = {
        "status": "ok" if engine.healthy else "unavailable",
        "model": state.model_name,
        "active": engine.active,
        "waiting": engine.waiting,
        "requests": s.requests,
        "cancelled": s.cancelled,
        "errors": s.errors,
        "new_tokens": s.new_tokens,
        "steps": s.steps,
        "mean_batch": round(s.rows_stepped / s.steps, 3) if s.steps else 0.0,
    }
    return JSONResponse(body, 200 if engine.healthy else 503)


def model_card(state: Served) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "gemma-sft"}


async def list_models(http: Request):
    return {"object": "list", "data": [model_card(served(http))]}


async def get_model(name: str, http: Request):
    state = served(http)
    if name != state.model_name:
        raise ApiError(
            404, f"The model {name!r} does not exist (this server has {state.model_name!r})", "model", "model_not_found"
        )
    return model_card(state)


async def encode(fn, *args) -> list[int]:
    """The tokenizer's `fn(*args)` off the event loop; a text it cannot encode is a 400."""
    try:
        return await run_in_threadpool(fn, *args)
    except GemmaError as exc:
        raise ApiError(400, str(exc), "messages") from None


def generation(http: Request, prompt: list[int], params: SamplingParams, **scoring) -> _Generation:
    state = served(http)
    return _Generation(state.engine, prompt, params, http, state.live, **scoring)


async def finish_all(gens: list[_Generation]):
    """The Finishes of several generations (a batch of prompts), or the response to send instead: the first
    error raised, or the first response finish_reply answered with (the client left), once every one has ended."""
    results = await asyncio.gather(*(finish_reply(g) for g in gens), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return next((r for r in results if not isinstance(r, Finish)), results)


def chat_chunk(ident: str, created: int, model_name: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_name,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


async def chat_completions(http: Request):
    state = served(http)
    engine = state.engine
    body = await parse_body(http, ChatRequest)
    refuse_unsupported(body)
    tok = engine.tokenizer
    options = chat_options(body)
    messages = chat_messages(body)
    gemma4 = tok.chat_format == 4  # tools, thinking and tool calls in and out
    if gemma4:
        prompt = await encode(partial(tok.apply_chat, **options), messages)
    else:
        if options["tools"] or options["enable_thinking"]:
            raise ApiError(400, "tools and thinking need a Gemma 4 model", "tools" if options["tools"] else None)
        prompt = await encode(tok.apply_chat, gemma3_messages(messages))
    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = chat_scoring(body)
    gen = generation(
        http, prompt, sampling_settings(body, len(prompt), engine.context, max_new, engine.vocab_limit), logprobs=top
    )
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    chunk = partial(chat_chunk, ident, created, state.model_name)
    first = chunk({"role": "assistant", "content": ""})
    if body.stream and not gemma4:
        return stream_reply(
            gen, lambda text: chunk({"content": text}), lambda reason: chunk({}, reason), include_usage(body), first
        )
    if body.stream:
        replies = ReplyStream()

        def deltas(text: str) -> list[dict]:
            return _reply_chunks(chunk, *replies.feed(text))

        def final(reason: str) -> list[dict]:
            reasoning, content, reply = replies.finish()
            out = _reply_chunks(chunk, reasoning, content)
            if reply.tool_calls:
                calls = [{"index": n, **c} for n, c in enumerate(openai_tool_calls(reply, f"call_{ident[9:21]}"))]
                out.append(chunk({"tool_calls": calls}))
            return out + [chunk({}, _reason(reason, reply))]

        return stream_reply(gen, deltas, final, include_usage(body), first)
    finish = await finish_reply(gen)
    if not isinstance(finish, Finish):
        return finish
    message: dict[str, Any] = {"role": "assistant", "content": finish.text}
    reason = finish.reason
    if gemma4:
        reply = parse_reply(finish.text)
        message["content"] = reply.content if reply.content or not reply.tool_calls else None
        if reply.reasoning is not None:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = openai_tool_calls(reply, f"call_{ident[9:21]}")
        reason = _reason(reason, reply)
    # The reply's tokens: a stop id ends the turn and is no part of the message.
    scored = chat_logprobs(tok, finish.logprobs[: finish.completion_tokens]) if top is not None else None
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": state.model_name,
        "choices": [{"index": 0, "message": message, "logprobs": scored, "finish_reason": reason}],
        "usage": usage(finish.prompt_tokens, finish.completion_tokens),
    }


def _reply_chunks(chunk, reasoning: str, content: str) -> list[dict]:
    """Stream chunks of a Gemma 4 reply's new thought and answer text (none when there is none)."""
    return ([chunk({"reasoning_content": reasoning})] if reasoning else []) + (
        [chunk({"content": content})] if content else []
    )


def _reason(reason: str, reply: Reply) -> str:
    """OpenAI's finish_reason: "tool_calls" when a turn that stopped by itself called tools."""
    return "tool_calls" if reply.tool_calls and reason == "stop" else reason


def completion_chunk(ident: str, created: int, model_name: str, text: str, finish_reason: str | None = None) -> dict:
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": model_name,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


async def completions(http: Request):
    """One prompt or a list of them (one choice each); `echo` puts the prompt's text before the reply (max_tokens
    0: the prompt alone), `logprobs` N each token's log-probability and N alternatives, the prompt's too with
    echo."""
    state = served(http)
    engine, tok = state.engine, state.engine.tokenizer
    body = await parse_body(http, CompletionRequest)
    refuse_unsupported(body)
    top, echo = completion_scoring(body), bool(body.echo)
    prompts = completion_prompts(body, tok, engine.model.config.vocab_size)
    settings = [
        sampling_settings(body, len(ids), engine.context, body.max_tokens, engine.vocab_limit, least=0 if echo else 1)
        for ids, _ in prompts
    ]
    chunk = partial(completion_chunk, f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name)
    if body.stream:  # one prompt, no echo nor logprobs (completion_prompts and completion_scoring saw to it)
        gen = generation(http, prompts[0][0], settings[0])
        return stream_reply(gen, chunk, lambda reason: chunk("", reason), include_usage(body))
    gens: list[_Generation] = []
    try:
        for (ids, _), params in zip(prompts, settings):
            gens.append(generation(http, ids, params, logprobs=top, prompt_logprobs=top if echo else None))
    except ApiError:  # the queue filled part way: none of the batch runs
        for gen in gens:
            gen.cancel()
        raise
    finishes = await finish_all(gens)
    if not isinstance(finishes, list):
        return finishes
    choices = []
    for i, ((ids, text), finish) in enumerate(zip(prompts, finishes)):
        scored = None
        if top is not None:
            scored = completion_logprobs(
                tok, ids if echo else None, finish.prompt_logprobs, len(text), finish.logprobs or ()
            )
        shown = text + finish.text if echo else finish.text
        choices.append({"index": i, "text": shown, "logprobs": scored, "finish_reason": finish.reason})
    return {
        **chunk("", None),
        "choices": choices,
        "usage": usage(sum(f.prompt_tokens for f in finishes), sum(f.completion_tokens for f in finishes)),
    }


async def text_generate(http: Request):
    state = served(http)
    engine = state.engine
    body = await parse_body(http, TextGenerateRequest)
    if body.num_beams != 1:
        raise ApiError(400, "num_beams must be 1 (beam search is not supported)", "num_beams")
    user = state.instruction_messages(body.instruction, body.text)
    prompt = await encode(engine.tokenizer.apply_chat, user)
    if len(prompt) >= engine.context:
        raise ApiError(
            400,
            f"the prompt ({len(prompt)} tokens) does not fit the context of {engine.context} tokens",
            "text",
            "context_length_exceeded",
        )
    if body.max_new_tokens < 1:
        raise ApiError(400, f"max_new_tokens must be at least 1, got {body.max_new_tokens}", "max_new_tokens")
    greedy = not body.do_sample or body.temperature == 0
    sampling = checked_sampling(
        0.0 if greedy else body.temperature, body.top_k, body.top_p, None, None, None, engine.vocab_limit
    )
    if greedy:
        sampling.update(top_k=None, top_p=None)
    params = engine_params(max_new_tokens=min(body.max_new_tokens, engine.context - len(prompt)), **sampling)
    finish = await finish_reply(generation(http, prompt, params))
    if not isinstance(finish, Finish):
        return finish
    return JSONResponse(finish.text)


# ---- the app -------------------------------------------------------------------------------------------------------


def build_api(state: Served) -> FastAPI:
    """The FastAPI app of the routes above, serving `state`, without the guard (for tests of the routes alone)."""
    app = FastAPI(title="gemma-sft", description="An OpenAI-compatible server for a Gemma model")
    app.state.served = state
    for kind, handler in (
        (ApiError, api_error),
        (RequestValidationError, invalid),
        (HTTPException, http_error),
        (Exception, crash),
    ):
        app.add_exception_handler(kind, handler)
    app.get("/health")(health)
    app.get("/v1/models")(list_models)
    app.get("/v1/models/{name:path}")(get_model)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/v1/completions")(completions)
    if state.instruction_messages is not None:
        app.post("/nlg/text_generate")(text_generate)
    return app


def create_app(
    engine,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    *,
    hosts: AllowedHosts | None = None,
    body_timeout: float = 30.0,
    live: LiveGenerations | None = None,
    instruction_messages: Callable[[str, str], list[dict]] | None = None,
):
    """The ASGI app serving `engine` (a gemma.generation.Engine) as `model_name`, behind the guard's checks. `hosts`
    None answers any Host (the command passes the addresses it listens on); `live` is the registry a shutdown
    aborts; `instruction_messages` makes the user turn of /nlg/text_generate (see `Served`)."""
    state = Served(engine, model_name, live if live is not None else LiveGenerations(), instruction_messages)
    return Guard(
        build_api(state),
        api_key=api_key,
        protected=PROTECTED,
        max_body=max_body_bytes,
        body_timeout=body_timeout,
        hosts=hosts,
    )
