"""The socket the server listens on and the uvicorn server that runs the app on it (tools/serve.py's `main` calls
`listen` before the slow model load, then `run`)."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from gemma.errors import GemmaError
from gemma.serving.app import ABORT_WAIT_S, LiveGenerations
from gemma.serving.guard import GuardedH11Protocol


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the (slow) model load so that a taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
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


def run(
    app,
    sock: socket.socket,
    live: LiveGenerations,
    *,
    header_timeout: float,
    max_connections: int,
    log_level: str,
    shutdown_grace: float,
) -> None:
    """Serve `app` (create_app's, with `live` its registry) on `sock` until SIGTERM or Ctrl-C."""
    # No limit_concurrency: uvicorn counts connections still sending their headers toward it, so slow clients could
    # get everyone a 503. Load is bounded by the engine's queue (--max-waiting) and --max-connections instead.
    # Our h11 protocol whether or not httptools is installed: the header deadline lives there.
    config = uvicorn.Config(
        app,
        http=GuardedH11Protocol.configured(header_timeout, max_connections),
        ws="none",
        log_level=log_level,
        lifespan="off",
        timeout_graceful_shutdown=shutdown_grace + ABORT_WAIT_S + 1,
    )
    Server(config, live, shutdown_grace).run(sockets=[sock])
