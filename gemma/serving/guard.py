"""What an HTTP request to the server (gemma/serving/app.py, run by tools/serve.py) must get past before the API
sees it, and the connection limits that keep slow or hostile clients from starving the others.

Per connection (`GuardedH11Protocol`: uvicorn's h11 protocol with three additions):
  - A request's headers must be complete within `header_timeout` seconds of the connection opening (or of the
    request's first byte, on a kept-alive connection); else 408 and the connection closes. uvicorn alone keeps a
    connection whose headers never end open forever, and its `limit_concurrency` counts such connections, so a few
    hundred trickling clients got every other client a 503. The server therefore does not use `limit_concurrency`:
    its load is bounded by the engine's queue (503 when full) and by `max_connections` open sockets (one more gets
    503 at once), and slow sockets are dropped by the deadlines here.
  - Closing with part of a request body unread "lingers" (`LINGER_S`): the response is sent, our side of the
    connection is shut, and what the client still sends is read and dropped until it closes or the time is up.
    Closing a socket that has unread data makes the kernel reset the connection, which can destroy the response
    (a 413, say) before the client has read it.

Per request (`Guard`, an ASGI middleware), in this order; each refusal comes before any body byte is read, and
closes the connection (the body is never drained):
  1. `Host` and `Origin` (`AllowedHosts`): 421 / 403. DNS rebinding: a page on evil.example whose name is made to
     resolve to 127.0.0.1 can send requests to this server and read the replies, as same-origin; its requests
     name evil.example in Host, and a cross-site page's requests carry its own Origin.
  2. A declared Content-Length over `max_body`: 413, whatever the key.
  3. The API key on protected routes: 401.
  4. POST bodies labelled `application/json` (charset utf-8 allowed): else 415. Browsers send text/plain and form
     POSTs from any page without asking first (no CORS preflight); a JSON label they only send after one.
Then the body is read within `body_timeout` seconds (408) and up to `max_body` bytes (413, for a chunked body).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from http import HTTPStatus
from typing import Iterable

import h11
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from gemma.errors import GemmaError

LINGER_S = 2.0  # how long a refused body is read and dropped before the socket closes for good
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ORIGIN_PORTS = {"http": 80, "https": 443}  # the port an Origin without one means


# ---- OpenAI's error body -------------------------------------------------------------------------------------------


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    # ASCII-escaped: a message may quote the client's input, which can hold lone surrogates that UTF-8 cannot encode.
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, close: bool = False
) -> Response:
    """An OpenAI-style error; `close` ends the connection after it (for refusals sent before the body is read)."""
    headers = {"connection": "close"} if close else None
    return Response(error_body(status, message, param, code), status, headers, media_type="application/json")


def raw_error(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response as bytes, for the connection level, where no request has been parsed (h11
    sends no response before it has seen a request)."""
    body = error_body(status, message, code=code)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


# ---- the connection ------------------------------------------------------------------------------------------------


class _Transport:
    """The socket's transport as uvicorn sees it: `close()` asks the protocol, which may linger first."""

    def __init__(self, inner: asyncio.Transport, protocol: "GuardedH11Protocol"):
        self.inner, self._protocol = inner, protocol

    def close(self) -> None:
        self._protocol.close_connection()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self.inner.is_closing()

    def __getattr__(self, name):
        return getattr(self.inner, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a cap on open connections and a lingering close (see the
    module's docstring). `configured()` makes a subclass with the server's settings, as uvicorn builds its protocol
    from the class."""

    header_timeout = 10.0
    max_connections = 1000

    @classmethod
    def configured(cls, header_timeout: float, max_connections: int) -> type["GuardedH11Protocol"]:
        return type(cls.__name__, (cls,), {"header_timeout": header_timeout, "max_connections": max_connections})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.lingering, self._gone = False, False
        self._header_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            self._refuse(503, f"the server has {self.max_connections} connections open; try again later", "overloaded")
            return
        self._watch_headers(fresh=True)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the rest of a refused request: dropped unparsed
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()  # a pipelined request may have started already

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        for timer in (self._header_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def _watch_headers(self, fresh: bool = False) -> None:
        """Arm the header deadline when a request's headers are awaited (from the connection's start, or from the
        first byte of a later request: an idle kept-alive connection is uvicorn's keep-alive timeout's business),
        and disarm it once they are complete."""
        awaiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        started = fresh or bool(self.conn.trailing_data[0])
        if awaiting and started and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)
        elif not awaiting and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if not self.conn.trailing_data[0]:  # nothing sent at all: just close, as an idle connection
            self.transport.inner.close()  # type: ignore[attr-defined]
            return
        self._refuse(408, f"the request's headers did not arrive within {self.header_timeout:g} s", "request_timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        self.transport.write(raw_error(status, message, code))
        self.logger.info("%s - %d %s", "%s:%d" % self.client if self.client else "client", status, message)
        self._linger()

    def close_connection(self) -> None:
        """uvicorn's close: lingers when the client may still be sending the request's body."""
        if not self._gone and not self.lingering and self.conn.their_state is h11.SEND_BODY:
            self._linger()
        else:
            self.transport.inner.close()  # type: ignore[attr-defined]

    def _linger(self) -> None:
        if self.lingering:
            return
        self.lingering = True
        inner: asyncio.Transport = self.transport.inner  # type: ignore[attr-defined]
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if not inner.can_write_eof():
            inner.close()
            return
        inner.write_eof()  # our side is done (sent once the response has left); theirs is read and dropped
        if self.flow is not None:
            self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, inner.close)


# ---- which names the server answers for ----------------------------------------------------------------------------


def _canonical(host: str) -> str:
    """A host name lower-cased without a trailing dot; an IP address in its standard form ('::0001' -> '::1')."""
    host = host.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_authority(value: str) -> tuple[str, int | None] | None:
    """('name', port or None) of 'name', 'name:8000' or '[::1]:8000' (as Host and Origin write them), or None
    when malformed."""
    value = value.strip()
    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        host, colon, port = value.partition(":")
        if not colon:
            port = None
        elif ":" in port:  # an IPv6 address without brackets: not a valid authority
            return None
    if not host or any(c in host for c in "/@?# "):
        return None
    if port is None:
        return _canonical(host), None
    if not (port.isascii() and port.isdigit()) or len(port) > 5:
        return None
    return _canonical(host), int(port)


class AllowedHosts:
    """The names a request may address the server by (in Host) and come from (in Origin).

    Built in: the loopback names (localhost, 127.0.0.1, ::1) and the addresses it listens on, each with the port it
    listens on. Listening on every address (0.0.0.0, ::), any IP address with that port: an address names no
    domain, so it cannot be rebound. `extra` adds NAME (any port) or NAME:PORT entries, and `*` allows anything
    (the server is then behind something that checks, or on a trusted network)."""

    def __init__(self, listening: Iterable[str], port: int, extra: Iterable[str] = ()):
        self.port, self.any, self.entries = port, False, set()
        for entry in extra:
            if entry.strip() == "*":
                self.any = True
                continue
            parsed = split_authority(entry)
            if parsed is None:
                raise GemmaError(f"--allow-host {entry!r}: not a host name, address or NAME:PORT")
            self.entries.add(parsed)
        listening = [_canonical(h) for h in listening]
        self.names = {_canonical(n) for n in LOOPBACK_NAMES} | set(listening)
        self.any_address = any(h in ("0.0.0.0", "::", "") for h in listening)

    def allows(self, host: str, port: int | None) -> bool:
        if self.any or (host, None) in self.entries or (host, port) in self.entries:
            return True
        return port == self.port and (host in self.names or (self.any_address and _is_ip(host)))

    def allows_host_header(self, value: str) -> bool:
        parsed = split_authority(value)
        return parsed is not None and self.allows(parsed[0], 80 if parsed[1] is None else parsed[1])

    def allows_origin(self, value: str) -> bool:
        """An Origin is 'scheme://host[:port]'; 'null' (sandboxed frames, file pages) is refused unless `*`."""
        if self.any:
            return True
        scheme, sep, rest = value.strip().partition("://")
        parsed = split_authority(rest) if sep else None
        if parsed is None:
            return False
        host, port = parsed
        return self.allows(host, ORIGIN_PORTS.get(scheme.lower()) if port is None else port)


# ---- the request ---------------------------------------------------------------------------------------------------


def is_json_type(value: bytes | None) -> bool:
    """Whether a Content-Type is application/json, with at most a charset parameter, of UTF-8."""
    if value is None:
        return False
    media, *params = value.decode("latin-1").split(";")
    if media.strip().lower() != "application/json":
        return False
    for param in filter(str.strip, params):  # a trailing ';' leaves an empty one
        name, _, setting = param.partition("=")
        if name.strip().lower() != "charset" or setting.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def first_headers(scope) -> dict[bytes, bytes]:
    """The request's headers by lower-case name; a repeated header counts by its first value."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.lower(), value)
    return headers


class Guard:
    """ASGI middleware: the checks of the module's docstring, then the app with the body read whole."""

    def __init__(
        self,
        app,
        *,
        api_key: str | None,
        protected: tuple[str, ...],
        max_body: int,
        body_timeout: float,
        hosts: AllowedHosts | None,
    ):
        # The key as UTF-8 bytes, compared with the header's raw bytes: starlette would decode headers as latin-1,
        # so a non-ASCII key could never match its own UTF-8 spelling.
        self.app, self.key = app, api_key.encode("utf-8") if api_key else None
        self.protected, self.max_body, self.body_timeout, self.hosts = protected, max_body, body_timeout, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = first_headers(scope)
        refusal = self._refuse_early(scope, headers)
        if refusal is not None:
            return await error_response(*refusal, close=True)(scope, receive, send)
        body = await self._read_body(receive)
        if isinstance(body, tuple):
            return await error_response(*body, close=True)(scope, receive, send)
        if body is None:
            return  # the client left
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)

    def _refuse_early(self, scope, headers: dict[bytes, bytes]) -> tuple | None:
        """(status, message, param, code) of a refusal decided from the headers alone, or None."""
        host, origin = headers.get(b"host"), headers.get(b"origin")
        # No Host at all is HTTP/1.0 from a tool; every browser sends one, so rebinding cannot omit it.
        if self.hosts is not None and host is not None and not self.hosts.allows_host_header(host.decode("latin-1")):
            return (
                421,
                f"this server does not answer for Host {host.decode('latin-1')!r} (a DNS-rebinding page "
                "would send its own name); start it with --allow-host NAME to serve that name",
                None,
                "host_not_allowed",
            )
        if self.hosts is not None and origin is not None and not self.hosts.allows_origin(origin.decode("latin-1")):
            return (
                403,
                f"requests from Origin {origin.decode('latin-1')!r} are not allowed (another site's page); "
                "start the server with --allow-host NAME[:PORT] to allow it",
                None,
                "origin_not_allowed",
            )
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            return 400, "bad Content-Length", None, None
        if declared is not None and int(declared) > self.max_body:
            return (
                413,
                f"the request body ({int(declared)} bytes) is over the limit of {self.max_body} bytes",
                None,
                "request_too_large",
            )
        if self.key and scope["path"].startswith(self.protected) and not self._authorized(headers):
            return 401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key"
        if scope["method"] == "POST" and not is_json_type(headers.get(b"content-type")):
            label = headers.get(b"content-type", b"none").decode("latin-1")
            return (
                415,
                f"the body must be sent as Content-Type: application/json (got {label!r})",
                None,
                "unsupported_media_type",
            )
        return None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def _read_body(self, receive) -> bytes | tuple | None:
        """The whole body; a refusal (408 past the deadline, 413 past the size limit); or None if the client left.
        The deadline covers the whole body, so a client that trickles a byte at a time cannot stretch it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        parts, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                return (408, f"the request body did not arrive within {self.body_timeout:g} s", None, "request_timeout")
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return (413, f"the request body is over the limit of {self.max_body} bytes", None, "request_too_large")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)
