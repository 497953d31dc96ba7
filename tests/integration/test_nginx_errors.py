"""Every answer Nginx makes itself is in the contract's JSON error shape.

Nginx runs from the project's template (as `make run` runs it) in front of
upstreams that are down or that never answer, so each kind of answer it makes
on its own can be provoked: unknown paths (404), methods a route does not have
(405 with an Allow header listing what it has, for every route of the
reference), too-large bodies (413), rate limits (429), an upstream that is down
or times out (503), malformed requests (400, 414, 431).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from helper.infra import NginxSettings, Proc, free_port, nginx_binary, port_open, render_nginx, wait_until
from helper.nginx_routes import load_spec, route_methods

METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE", "QUERY")


@dataclass
class Edge:
    base: str
    port: int


class Blackhole:
    """A TCP server that accepts connections and never answers (an upstream that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def _start(tmp: Path, upstream_port: int, read_timeout: str | None = None) -> tuple[Edge, Proc]:
    """Nginx from the template with every upstream on ``upstream_port``, a tiny auth rate limit."""
    port = free_port()
    names = ("profile", "group", "persistence", "gateway")
    settings = NginxSettings(
        public_port=port, upstreams={n: [upstream_port] for n in names}, var=tmp, auth_rate="1r/m", auth_burst=2
    )
    conf = render_nginx(settings)
    if read_timeout:
        # Only the wait is shortened, so a hung upstream times out within the test.
        text = conf.read_text().replace(
            "proxy_http_version 1.1;", f"proxy_http_version 1.1;\n        proxy_read_timeout {read_timeout};", 1
        )
        conf.write_text(text)
    ngx = tmp / "nginx"
    proc = Proc(
        "nginx",
        [nginx_binary(), "-c", str(conf), "-p", str(ngx), "-e", str(ngx / "log" / "error.log"), "-g", "daemon off;"],
        tmp / "log" / "nginx.log",
    )
    proc.start()
    wait_until(lambda: port_open(port), 15, "nginx", proc.proc)
    return Edge(f"http://127.0.0.1:{port}", port), proc


@pytest.fixture(scope="module")
def down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """Nginx whose upstreams are all down (nothing listens on their port)."""
    closed = free_port()
    edge, proc = _start(tmp_path_factory.mktemp("edge-down"), closed)
    yield edge
    proc.stop()


@pytest.fixture(scope="module")
def hung(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """Nginx whose upstreams accept connections and never answer."""
    hole = Blackhole()
    edge, proc = _start(tmp_path_factory.mktemp("edge-hung"), hole.port, read_timeout="1s")
    yield edge
    proc.stop()
    hole.close()


def check_error(r: requests.Response, status: int, code: str) -> None:
    where = f"{r.request.method} {r.request.path_url}"
    assert r.status_code == status, f"{where}: {r.status_code} {r.text[:200]}"
    assert r.headers.get("X-Request-Id"), f"{where}: no X-Request-Id"
    assert r.headers.get("Content-Type", "").startswith("application/json"), f"{where}: {r.headers}"
    if r.request.method == "HEAD":
        return
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code and body["error"]["message"] and body["error"]["details"] == {}, body


def concrete(path: str) -> str:
    return "/".join("x1" if seg.startswith("{") else seg for seg in path.split("/"))


def test_unknown_paths_are_404(down: Edge) -> None:
    for path in ("/v1/nope", "/v1/", "/v1/me/nope", "/v1/groups/a/b/c/d/e", "/internal/auth", "/healthz", "/metrics"):
        for method in ("GET", "POST", "DELETE"):
            check_error(requests.request(method, down.base + path, timeout=5), 404, "not_found")


ROUTES = route_methods(load_spec())


@pytest.mark.parametrize(("path", "allow"), [(p, a) for p, _, a in ROUTES], ids=[p for p, _, _ in ROUTES])
def test_a_method_a_route_does_not_have_is_405_with_allow(down: Edge, path: str, allow: str) -> None:
    allowed = {m.strip() for m in allow.split(",")}
    assert allowed, path
    for method in METHODS:
        if method in allowed:
            continue
        r = requests.request(method, down.base + concrete(path), timeout=5)
        check_error(r, 405, "method_not_allowed")
        assert r.headers.get("Allow") == allow, f"{method} {path}: Allow {r.headers.get('Allow')!r}"


def test_the_static_files_answer_other_methods_with_405(down: Edge) -> None:
    assert requests.get(down.base + "/", timeout=5).status_code == 200
    for method in ("POST", "PUT", "DELETE", "TRACE"):
        r = requests.request(method, down.base + "/index.html", timeout=5)
        check_error(r, 405, "method_not_allowed")
        assert r.headers.get("Allow") == "GET, HEAD"


def test_a_body_over_the_limit_is_413(down: Edge) -> None:
    big = b"x" * (300 * 1024)
    for path in ("/v1/auth/signup", "/v1/groups", "/v1/me"):
        method = "PATCH" if path == "/v1/me" else "POST"
        r = requests.request(
            method, down.base + path, data=big, headers={"Content-Type": "application/json"}, timeout=5
        )
        check_error(r, 413, "payload_too_large")


def test_an_upstream_that_is_down_is_503(down: Edge) -> None:
    # Straight to the service (no token check), and through a token check that cannot be made.
    check_error(requests.post(down.base + "/v1/auth/refresh", json={}, timeout=5), 503, "unavailable")
    headers = {"Authorization": "Bearer x"}
    for method, path in (("GET", "/v1/me"), ("GET", "/v1/groups"), ("GET", "/v1/sync"), ("GET", "/v1/ws")):
        check_error(requests.request(method, down.base + path, headers=headers, timeout=5), 503, "unavailable")


def test_too_many_account_requests_are_429(down: Edge) -> None:
    # 1 request a minute with a burst of 2: at most three reach the (down) upstream, the rest are refused.
    answers = [requests.post(down.base + "/v1/auth/login", json={}, timeout=5) for _ in range(6)]
    statuses = [r.status_code for r in answers]
    assert statuses.count(429) >= 3 and set(statuses) <= {429, 503}, statuses
    for r in answers:
        check_error(r, r.status_code, "rate_limited" if r.status_code == 429 else "unavailable")


def test_an_upstream_that_times_out_is_503(hung: Edge) -> None:
    check_error(requests.post(hung.base + "/v1/auth/signup", json={}, timeout=30), 503, "unavailable")
    # The token check itself times out.
    r = requests.get(hung.base + "/v1/me", headers={"Authorization": "Bearer x"}, timeout=30)
    check_error(r, 503, "unavailable")


def _raw(edge: Edge, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /v1/me HTTP/1.1\r\nHost: x\r\nno colon here\r\nConnection: close\r\n\r\n", 400),
        (b"GET /v1/me HTTP/1.1\r\nConnection: close\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 414),
        (b"GET /v1/me HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\nConnection: close\r\n\r\n", 431),
    ],
    ids=["bad header line", "no host", "uri too long", "header too large"],
)
def test_a_malformed_request_gets_json_too(down: Edge, request_bytes: bytes, status: int) -> None:
    got, headers, body = _raw(down, request_bytes)
    assert got == status, body[:300]
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert headers.get("x-request-id"), headers
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_request" and error["message"], error
