"""tools/serve.py against hostile or careless clients (issue 13): slow connections that trickle their headers or
body, bodies labelled as anything but JSON, foreign Host and Origin headers (DNS rebinding), oversized bodies,
lone surrogates and deep nesting, sampling values at the edges, a non-ASCII API key, empty keys at start, and
SIGTERM with streams open. Each refusal is checked for its status and OpenAI's error body. The servers run in
subprocesses on free loopback ports, serving the tiny model of test_serve.py."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_serve import SERVE, Reply, Server, folder  # noqa: F401 - folder is a fixture (tok comes from conftest)

ROOT = Path(__file__).resolve().parents[1]
KEY = "clé-🔑-test"  # non-ASCII on purpose: compared as UTF-8 bytes
KEY_ENV = "GEMMA_SFT_API_KEY"
MAX_BODY = 64 * 1024
TIMEOUT_S = 4  # the hostile server's --header-timeout and --body-timeout
CHAT = "/v1/chat/completions"
GOOD = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def hostile(folder, tmp_path_factory):  # noqa: F811 - the fixture imported above
    env_key = {KEY_ENV: KEY}
    os.environ.update(env_key)  # the key through the variable, as the README advises (kept out of `ps`)
    try:
        srv = Server(
            [
                "--model",
                str(folder),
                "--dtype",
                "fp32",
                "--threads",
                "1",
                "--max-batch",
                "4",
                "--max-body-bytes",
                str(MAX_BODY),
                "--model-name",
                "tiny",
                "--log-level",
                "warning",
                "--header-timeout",
                str(TIMEOUT_S),
                "--body-timeout",
                str(TIMEOUT_S),
                "--allow-host",
                "example.test",
                "--allow-host",
                "ui.test:3000",
            ],
            tmp_path_factory.mktemp("log") / "hostile.log",
        )
    finally:
        os.environ.pop(KEY_ENV)
    yield srv
    srv.stop()


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def call(server, method: str, path: str, body=None, headers: dict | None = None, key: str | None = KEY) -> Reply:
    """One request; the key goes as its UTF-8 bytes (http.client would encode a str header as latin-1)."""
    sent = {
        "Content-Type": "application/json",
        **({"Authorization": b"Bearer " + key.encode("utf-8")} if key else {}),
        **(headers or {}),
    }
    content = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    conn = http.client.HTTPConnection(*address(server), timeout=60)
    try:
        conn.request(method, path, body=content, headers=sent)
        r = conn.getresponse()
        return Reply(r.status, r.headers, r.read())
    finally:
        conn.close()


def assert_refused(r: Reply, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_serving(server) -> None:
    r = call(server, "POST", CHAT, GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text


def read_until_closed(sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# ---- slow clients (1) ----------------------------------------------------------------------------------------------


def test_slow_clients_are_dropped_and_the_others_served(hostile):
    """300 connections trickling their headers or body a byte at a time (beyond uvicorn's concurrency limit the
    server used, which counted them: everyone got 503), and some that send nothing: a normal keyed request is
    answered while they are open, and each of them is answered 408 or closed once its deadline has passed."""
    host, port = address(hostile)
    head = (
        (
            f"POST {CHAT} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: 100"
            "\r\nAuthorization: Bearer "
        ).encode()
        + KEY.encode()
        + b"\r\n\r\n{"
    )
    groups = {"headers": [], "body": [], "silent": []}
    for group, count, first in (
        ("headers", 150, b"POST /v1/models HTTP/1.1\r\nX-Slow: "),
        ("body", 150, head),
        ("silent", 20, b""),
    ):
        for _ in range(count):
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(first)
            groups[group].append(s)
    slow = [s for group in groups.values() for s in group]
    stop = threading.Event()

    def trickle():  # one byte per connection every half second, so that none of them ever completes
        while not stop.wait(0.5):
            for s in groups["headers"] + groups["body"]:
                try:
                    s.send(b"x")
                except OSError:
                    pass

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    outcome: dict[socket.socket, bytes] = {}
    try:
        with selectors.DefaultSelector() as sel:
            for s in slow:
                sel.register(s, selectors.EVENT_READ)
            assert not sel.select(0), "the server closed slow connections before the test's request"
            assert_serving(hostile)  # while all of them are open
            deadline = time.monotonic() + 60
            while len(outcome) < len(slow) and time.monotonic() < deadline:
                for key, _ in sel.select(1):
                    sel.unregister(key.fileobj)
                    outcome[key.fileobj] = read_until_closed(key.fileobj)
    finally:
        stop.set()
        trickler.join()
        for s in slow:
            s.close()
    assert len(outcome) == len(slow), f"{len(slow) - len(outcome)} slow connections were never dropped"
    for group, sockets in groups.items():
        answers = [outcome[s] for s in sockets]
        assert all(a == b"" or a.startswith(b"HTTP/1.1 408 ") for a in answers), (group, set(answers))
        if group != "silent":  # a connection that sent something is told why it is closed
            timed_out = [a for a in answers if a]
            assert timed_out, group
            error = json.loads(timed_out[0].split(b"\r\n\r\n", 1)[1])["error"]
            assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
        else:
            assert answers == [b""] * len(sockets)
    assert_serving(hostile)


def test_a_kept_alive_connection_gets_a_header_deadline_for_its_next_request(hostile):
    host, port = address(hostile)
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        first = b""
        while b"\r\n\r\n" not in first or not first.endswith(b"}"):
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        s.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")  # then nothing more
        assert read_until_closed(s).startswith(b"HTTP/1.1 408 ")


# ---- what a browser page could send (2, 3) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; b=x",
        "application/json; charset=latin-1",
        "application/jsonx",
        None,
    ],
)
def test_only_json_bodies_are_taken(hostile, label):
    headers = {"Content-Type": label} if label else {}
    r = call(hostile, "POST", CHAT, GOOD, headers) if label else _without_content_type(hostile)
    assert_refused(r, 415, code="unsupported_media_type")


def _without_content_type(server) -> Reply:
    conn = http.client.HTTPConnection(*address(server), timeout=60)
    try:
        conn.putrequest("POST", CHAT)
        body = json.dumps(GOOD).encode()
        for name, value in (("Authorization", b"Bearer " + KEY.encode()), ("Content-Length", str(len(body)))):
            conn.putheader(name, value)
        conn.endheaders(body)
        r = conn.getresponse()
        return Reply(r.status, r.headers, r.read())
    finally:
        conn.close()


@pytest.mark.parametrize(
    "label", ["application/json", "application/json; charset=utf-8", 'Application/JSON; charset="UTF-8"']
)
def test_json_labels_are_accepted(hostile, label):
    r = call(hostile, "POST", CHAT, GOOD, {"Content-Type": label})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "host,status",
    [
        ("evil.test:{port}", 421),
        ("127.0.0.1:1", 421),
        ("localhost.evil.test:{port}", 421),
        ("ui.test:3001", 421),
        ("", 421),
        ("a:b:c", 421),
        ("127.0.0.1:{port}", 200),
        ("localhost:{port}", 200),
        ("LOCALHOST.:{port}", 200),
        ("[::1]:{port}", 200),
        ("example.test", 200),
        ("example.test:9999", 200),
        ("ui.test:3000", 200),
    ],
)
def test_host_must_name_this_server(hostile, host, status):
    """DNS rebinding: a page on evil.test whose name resolves to 127.0.0.1 sends Host: evil.test. Refused before
    the key is looked at (no key is sent)."""
    r = call(hostile, "GET", "/v1/models", headers={"Host": host.format(port=address(hostile)[1])}, key=None)
    if status == 200:
        assert r.status_code == 401, r.text  # past the Host check, stopped by the key
    else:
        assert_refused(r, status, code="host_not_allowed")


@pytest.mark.parametrize(
    "origin,allowed",
    [
        ("http://evil.test", False),
        ("null", False),
        ("https://127.0.0.1", False),
        ("http://localhost:3001", False),
        ("file://", False),
        ("http://127.0.0.1:{port}", True),
        ("http://localhost:{port}", True),
        ("http://ui.test:3000", True),
        ("https://example.test", True),
    ],
)
def test_origin_must_be_allowed(hostile, origin, allowed):
    r = call(hostile, "POST", CHAT, GOOD, {"Origin": origin.format(port=address(hostile)[1])})
    if allowed:
        assert r.status_code == 200, r.text
    else:
        assert_refused(r, 403, code="origin_not_allowed")


# ---- oversized bodies (4) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_key", [False, True])
def test_declared_oversized_body_gets_413_before_it_is_sent(hostile, with_key):
    """Headers alone: the 413 comes without the server waiting for (or reading) the body, key or no key, and the
    connection is closed after it."""
    host, port = address(hostile)
    auth = b"Authorization: Bearer " + KEY.encode() + b"\r\n" if with_key else b""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000000\r\n".encode()
            + auth
            + b"\r\n"
        )
        answer = read_until_closed(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower(), answer
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_oversized_bodies_sent_anyway_get_a_readable_413(hostile):
    """A client that sends the whole body before reading still sees the 413 (the server lingers, dropping the
    rest, instead of resetting the connection); so does a chunked body without Content-Length."""
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (4 * MAX_BODY)}]})
    assert_refused(call(hostile, "POST", CHAT, big), 413, code="request_too_large")
    conn = http.client.HTTPConnection(*address(hostile), timeout=60)
    try:
        conn.request(
            "POST",
            CHAT,
            body=iter([b"x" * 16384] * (2 * MAX_BODY // 16384)),
            encode_chunked=True,
            headers={"Content-Type": "application/json", "Authorization": b"Bearer " + KEY.encode()},
        )
        r = conn.getresponse()
        assert_refused(Reply(r.status, r.headers, r.read()), 413, code="request_too_large")
    finally:
        conn.close()
    assert_serving(hostile)


# ---- bodies that parse but are no text, or nest too deeply (5) -----------------------------------------------------


def _chat(**fields) -> str:
    return json.dumps({**GOOD, **fields})


@pytest.mark.parametrize(
    "body,param,where",
    [
        (r'{"messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 3}', "messages", "messages.0.content"),
        (
            r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}',
            "messages",
            "messages.0.content.0.text",
        ),
        (r'{"messages": [{"role": "user", "content": "Hi"}], "stop": ["\ud83d"]}', "stop", "stop.0"),
        (r'{"messages": [{"role": "user", "content": "Hi"}], "user": "\udc00\ud800"}', "user", "user"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(hostile, body, param, where):
    error = assert_refused(call(hostile, "POST", CHAT, body), 400, param=param)
    assert error["message"].startswith(f"{where}: ") and "surrogate" in error["message"]


def test_lone_surrogates_on_the_other_routes(hostile):
    assert_refused(call(hostile, "POST", "/v1/completions", r'{"prompt": "x\ud800"}'), 400, param="prompt")
    assert_refused(call(hostile, "POST", "/nlg/text_generate", r'{"text": "\ud800"}'), 400, param="text")
    r = call(hostile, "POST", CHAT, r'{"messages": [{"role": "user", "content": "\ud83d\ude00"}], "max_tokens": 3}')
    assert r.status_code == 200, r.text  # a pair is one character


CHOKING = [  # bodies within the size limit
    ("deep arrays", '{"messages": ' + "[" * 30_000 + "]" * 30_000 + "}"),
    ("deep objects", '{"x": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + ', "messages": []}'),
    ("just over the depth limit, in an ignored field", _chat()[:-1] + ', "extra": ' + "[" * 64 + "]" * 64 + "}"),
    ("an integer of 5000 digits", _chat()[:-1] + ', "seed": ' + "9" * 5000 + "}"),
    ("not UTF-8", b'{"messages": [{"role": "user", "content": "\xff"}]}'),
    ("a UTF-8 BOM", b"\xef\xbb\xbf" + _chat().encode()),
]


@pytest.mark.parametrize("what,body", CHOKING, ids=[c[0] for c in CHOKING])
def test_bodies_that_python_would_choke_on_are_a_400(hostile, what, body):
    assert_refused(call(hostile, "POST", CHAT, body), 400)
    assert_serving(hostile)


# ---- sampling values at the edges (8) ------------------------------------------------------------------------------


EDGES = [
    ("temperature", "1e-45"),
    ("temperature", "-1"),
    ("temperature", "1e6"),
    ("temperature", "NaN"),
    ("temperature", "Infinity"),
    ("temperature", "1e999"),
    ("temperature", "-0.5"),
    ("top_p", "-0.5"),
    ("top_p", "0"),
    ("top_p", "1.5"),
    ("top_p", "NaN"),
    ("top_p", "1e-400"),
    ("top_k", "-2"),
    ("top_k", "1.5"),
    ("min_p", "-0.1"),
    ("min_p", "2"),
    ("min_p", "Infinity"),
    ("repetition_penalty", "0"),
    ("repetition_penalty", "-1"),
    ("repetition_penalty", "1e-45"),
    ("repetition_penalty", "1e9"),
    ("repetition_penalty", "NaN"),
    ("seed", str(1 << 64)),
    ("seed", str(-(1 << 63) - 1)),
    ("presence_penalty", "NaN"),
]


@pytest.mark.parametrize("field,value", EDGES, ids=[f"{f}={v}" for f, v in EDGES])
def test_sampling_edges_are_a_400_naming_the_parameter(hostile, field, value):
    body = _chat()[:-1] + f', "{field}": {value}}}'
    assert_refused(call(hostile, "POST", CHAT, body), 400, param=field)
    assert_refused(
        call(
            hostile,
            "POST",
            "/v1/completions",
            json.dumps({"prompt": "Hi", "max_tokens": 3})[:-1] + f', "{field}": {value}}}',
        ),
        400,
        param=field,
    )


@pytest.mark.parametrize(
    "field,value", [("temperature", "1e-45"), ("temperature", "NaN"), ("top_p", "-1"), ("top_p", "2"), ("top_k", "-7")]
)
def test_sampling_edges_on_the_older_route(hostile, field, value):
    body = f'{{"text": "hi", "max_new_tokens": 3, "{field}": {value}}}'
    assert_refused(call(hostile, "POST", "/nlg/text_generate", body), 400, param=field)


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 100},
        {"temperature": 1e-6, "seed": 1},
        {"top_k": 10**12},
        {"top_k": -1, "top_p": 1e-9, "min_p": 1.0},
        {"repetition_penalty": 0.01},
        {"seed": -(1 << 63)},
        {"temperature": 0, "top_p": 1},
    ],
)
def test_sampling_edges_that_are_fine(hostile, fields):
    r = call(hostile, "POST", CHAT, _chat(**fields))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3, r.text


# ---- the API key (7) -----------------------------------------------------------------------------------------------


def test_a_non_ascii_key_matches_its_utf8_bytes(hostile):
    assert call(hostile, "GET", "/v1/models").status_code == 200
    assert_refused(call(hostile, "GET", "/v1/models", key="cle-test"), 401, code="invalid_api_key")
    conn = http.client.HTTPConnection(*address(hostile), timeout=60)
    try:  # the same characters in latin-1 where they can be: other bytes, so no match
        conn.request("GET", "/v1/models", headers={"Authorization": b"Bearer cl\xe9-?-test"})
        r = conn.getresponse()
        assert_refused(Reply(r.status, r.headers, r.read()), 401)
    finally:
        conn.close()


CLI_BAD = [
    ("empty key variable", [], {KEY_ENV: ""}, f"{KEY_ENV} is empty"),
    ("blank key variable", [], {KEY_ENV: "   "}, f"{KEY_ENV} is empty"),
    ("empty --api-key", ["--api-key", ""], {}, "--api-key is empty"),
    ("empty --api-key over a set variable", ["--api-key", ""], {KEY_ENV: "k"}, "--api-key is empty"),
    ("a key with a newline", ["--api-key", "a\nb"], {}, "control character"),
    ("a malformed --allow-host", ["--allow-host", "a b"], {}, "--allow-host"),
    ("a zero --header-timeout", ["--header-timeout", "0"], {}, "--header-timeout"),
    ("a NaN --body-timeout", ["--body-timeout", "nan"], {}, "--body-timeout"),
]


@pytest.mark.parametrize("what,args,env,says", CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_bad_settings_stop_the_server_at_start(tmp_path, what, args, env, says):
    """One error line and exit status 2, before the model is looked for (it is missing here)."""
    base = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    r = subprocess.run(
        [sys.executable, str(SERVE), "--model", str(tmp_path / "missing"), "--port", "0", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, **env, "PYTHONUNBUFFERED": "1"},
        timeout=120,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
    assert "Traceback" not in r.stderr


# ---- a keyless server: browser-shaped requests, the connection cap, SIGTERM (2, 6) ---------------------------------


def test_keyless_server_refuses_forms_caps_connections_and_ends_streams_on_sigterm(folder, tmp_path):  # noqa: F811
    """Keyless, one row, '*' hosts, 8 connections at most, no shutdown grace: a text/plain POST (what any web page
    may send without asking) is 415; '*' admits any Host; the 9th open connection gets 503; and SIGTERM with three
    streams open (one generating, two queued) ends every one of them with a final chunk and [DONE]."""
    srv = Server(
        [
            "--model",
            str(folder),
            "--dtype",
            "fp32",
            "--threads",
            "1",
            "--max-batch",
            "1",
            "--shutdown-grace",
            "0",
            "--allow-host",
            "*",
            "--max-connections",
            "8",
            "--log-level",
            "warning",
        ],
        tmp_path / "keyless.log",
    )
    try:
        assert_refused(call(srv, "POST", CHAT, GOOD, {"Content-Type": "text/plain"}, key=None), 415)
        assert call(srv, "GET", "/health", headers={"Host": "rebound.evil.test"}, key=None).status_code == 200
        assert call(srv, "POST", CHAT, GOOD, {"Origin": "http://evil.test"}, key=None).status_code == 200

        idle = [socket.create_connection(address(srv), timeout=30) for _ in range(8)]
        try:
            assert_refused(call(srv, "GET", "/health", key=None), 503, code="overloaded")
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 30
        while call(srv, "GET", "/health", key=None).status_code != 200:  # the server notices the closes
            assert time.monotonic() < deadline
            time.sleep(0.1)

        streams = []
        for i in range(3):
            conn = http.client.HTTPConnection(*address(srv), timeout=60)
            conn.request(
                "POST",
                CHAT,
                headers={"Content-Type": "application/json"},
                body=json.dumps(
                    {
                        "messages": [{"role": "user", "content": f"Tell me {i}"}],
                        "max_tokens": 200,
                        "temperature": 0,
                        "stream": True,
                    }
                ),
            )
            r = conn.getresponse()
            assert r.status == 200 and r.readline().startswith(b"data: ")  # the role chunk: the stream is open
            streams.append((conn, r))
        waiting = http.client.HTTPConnection(*address(srv), timeout=60)  # not streamed, queued behind the streams
        waiting.request(
            "POST",
            CHAT,
            headers={"Content-Type": "application/json"},
            body=json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200}),
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the server has queued it (or the streams have moved on)
            state = call(srv, "GET", "/health", key=None).json()
            if state["active"] + state["waiting"] >= 4:
                break
        srv.proc.send_signal(signal.SIGTERM)
        reasons = []
        for conn, r in streams:
            lines = [line.decode() for line in r.read().split(b"\n") if line.strip()]
            conn.close()
            assert lines[-1] == "data: [DONE]", lines[-3:]
            final = json.loads(lines[-2].removeprefix("data: "))
            reasons.append(final["choices"][0]["finish_reason"])
        assert all(reasons) and "abort" in reasons, reasons  # the queued ones cannot have finished on their own
        r = waiting.getresponse()
        assert_refused(Reply(r.status, r.headers, r.read()), 503, code="shutting_down")
        waiting.close()
        srv.proc.wait(30)
        assert "Traceback" not in srv.log.read_text()
    finally:
        srv.stop()
