"""Serve a Gemma model over HTTP with OpenAI's API, so that existing OpenAI clients can use it.

    python tools/serve.py [--model SRC] [--adapter DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...

Routes:
  POST /v1/chat/completions   chat, with the model's chat template ("stream": true for server-sent events)
  POST /v1/completions        raw text (or token ids) continued as is, no template (streams too)
  GET  /v1/models, /health    the model served; liveness and load
  POST /nlg/text_generate     the older Gemma-SFT API: {"instruction", "text", "max_new_tokens", "temperature",
                              "top_p", "top_k", "do_sample"} in, the reply text (a JSON string) out

The server is gemma/serving/ (the routes in app.py); this file parses the flags and starts it. Requests that
arrive together share forward passes: gemma.generation.Engine batches them, each joining at the next step and
leaving when done. A client that disconnects stops its generation. Sampling: `max_tokens` (or
`max_completion_tokens`), `temperature` (OpenAI's default 1; 0 = greedy), `top_p`, `top_k`, `min_p`,
`repetition_penalty`, `stop`, `seed`, `n` = 1; `stream_options.include_usage` adds a usage chunk. Greedy replies
are gemma.generate's for the prompt alone when the model runs in fp32; in bf16 (or fp16) a near-tie between two
tokens can come out either way depending on which other requests share the batch (seen: 28 of 30 replies equal
under 8 concurrent clients), as rounding differs with the batch's shape.

Safety (the HTTP side is gemma/serving/guard.py): it listens on 127.0.0.1 unless --host says otherwise, and answers
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
import os
import sys
from pathlib import Path

from gemma.cli import add_model_args, load_model, main_guard
from gemma.errors import GemmaError

API_KEY_ENV = "GEMMA_SFT_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/serve.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)",
    )
    p.add_argument(
        "--allow-host",
        metavar="NAME[:PORT]",
        action="append",
        default=[],
        help="also answer requests whose Host (or Origin) is NAME, with any port or PORT only; repeatable; "
        "'*' allows any (default: only the loopback names and the address listened on, with its "
        "port: a guard against DNS rebinding)",
    )
    p.add_argument(
        "--model-name",
        metavar="NAME",
        default=None,
        help="the model id that /v1/models reports (default: the --model argument)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="tokens one request may span, prompt and reply (default: the model's context, at most 8192)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests queued for a free row before the server answers 503 (default 256)",
    )
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        help="open connections, slow ones included, before a new one gets 503 (default 1000, lowered "
        "to what the process may open)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a client has to send a request's headers, then 408 (default 10)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a client has to send a request's body, then 408 (default 30)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        metavar="S",
        help="on SIGTERM, seconds live requests get to finish before open streams are ended with "
        "finish_reason 'abort' (default 5)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model (default: torch's)")
    p.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        default="info",
        help="server log level (default info: one line per request)",
    )
    return p


def check_numbers(args) -> None:
    for name, low in (
        ("max_batch", 1),
        ("max_len", 2),
        ("max_waiting", 1),
        ("max_body_bytes", 1024),
        ("threads", 1),
        ("max_connections", 1),
    ):
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
        raise GemmaError(
            f"{where} is empty: give a key, or {'leave it out' if where == '--api-key' else 'unset it'} "
            "to serve without one"
        )
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise GemmaError(
            f"{where} starts or ends with spaces or holds a control character, which an HTTP header cannot carry"
        )
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


def instruction_messages(instruction: str, text: str) -> list[dict]:
    """The user turn of /nlg/text_generate as training builds it from an alpaca record: the instruction, then the
    text after a blank line."""
    from train.data import record_messages

    return record_messages({"instruction": instruction, "input": text, "output": ""}, "request")[:-1]


@main_guard
def main(argv: list[str] | None = None) -> int:
    from gemma.serving import require_serve_extra

    require_serve_extra()  # before anything else, as when the imports below stood at the top of this file
    args = build_parser().parse_args(argv)
    check_numbers(args)
    api_key = api_key_of(args)

    from gemma.serving.guard import AllowedHosts

    AllowedHosts([], 0, args.allow_host)  # a malformed --allow-host fails now, before the model loads

    from gemma.generation.engine import Engine
    from gemma.serving import server
    from gemma.serving.app import LiveGenerations, create_app

    source = args.size or args.model
    sock = server.listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    hosts = AllowedHosts([args.host, host], port, args.allow_host)
    max_connections = connection_cap(args.max_connections)
    model, tokenizer, loaded = load_model(args)
    print(f"[{loaded}]", file=sys.stderr)

    max_len = args.max_len or min(model.config.max_seq_len, 8192)
    engine = Engine(
        model, tokenizer, max_batch=args.max_batch, max_len=max_len, max_waiting=args.max_waiting, threads=args.threads
    )
    name = args.model_name or (Path(source).name if Path(source).exists() else source)
    live = LiveGenerations()
    app = create_app(
        engine,
        name,
        api_key,
        args.max_body_bytes,
        hosts=hosts,
        body_timeout=args.body_timeout,
        live=live,
        instruction_messages=instruction_messages,
    )
    if not api_key and host not in ("127.0.0.1", "::1") and not host.startswith("127."):
        print(
            f"[warning: listening on {host} without --api-key: anyone who reaches this machine can use the model]",
            file=sys.stderr,
        )
    print(
        f"[serving {name} on {server.url_of(sock)}: batch {args.max_batch}, context {engine.context} tokens, "
        f"KV cache {engine.cache_bytes / 2**20:.0f} MiB{', API key required' if api_key else ''}]",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(
            app,
            sock,
            live,
            header_timeout=args.header_timeout,
            max_connections=max_connections,
            log_level=args.log_level,
            shutdown_grace=args.shutdown_grace,
        )
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
