"""A fault-injecting reverse proxy for S3 on loopback (standard library only).

It forwards every request unchanged to an upstream S3 endpoint (moto) and relays
the answer, streaming bodies, and on rules injects what real S3 does under load
or misconfiguration: 503 SlowDown, 500 InternalError, dropped connections (TCP
RST) and permanent 403 AccessDenied, at the HTTP layer below every client and its
retry logic.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import re
import socket
import socketserver
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from tests.s3util import S3Endpoint

_CHUNK = 64 * 1024  # the proxy's streaming unit: no body is ever held whole


_ERRORS = {
    403: ("AccessDenied", "Access Denied"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "FaultProxy could not reach the upstream."),
    503: ("SlowDown", "Please reduce your request rate."),
}
_KINDS = {"503": 503, "500": 500, "reset": 0}


class ProxyRecord(NamedTuple):
    """One request: ``path`` percent-decoded, without query; ``status`` 0 = no response."""

    method: str
    path: str
    status: int


@dataclass
class _Rule:
    kind: str  # "503" | "500" | "reset" | "deny"
    every: int
    status: int
    method: str | None
    pattern: re.Pattern[str] | None
    seen: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.method in (None, method) and (
            not self.pattern or bool(self.pattern.search(path))
        )


class _ClientGone(Exception):
    """The client left, stalled past the timeout or sent a malformed body."""


class FaultProxy:
    """A threaded HTTP/1.1 reverse proxy that forwards requests verbatim and injects faults.

    Each request goes, unchanged (the client's ``Host`` too: SigV4 signs it), to a fresh
    upstream connection; bodies stream through in 64 KiB pieces, chunked framing and
    all. Rules apply in the order added: each rule whose filter matches counts the
    request, and the first that fires decides its fault. Faulted requests never reach
    the upstream. Client connections are kept alive although moto closes after every
    response, so clients reuse connections as they would against S3.
    """

    def __init__(self, upstream: S3Endpoint | str, *, timeout: float = 60.0) -> None:
        self.upstream = upstream if isinstance(upstream, str) else upstream.url
        split = urlsplit(self.upstream)
        self._upstream_addr = (split.hostname or "127.0.0.1", split.port or 80)
        self.timeout = timeout  # on every socket, both sides: nothing can hang on us
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._log: list[ProxyRecord] = []
        self._requests = self._faults = self._connections = 0
        self._live: set[socket.socket] = set()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FaultProxy:
        self._server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.proxy = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop at once: idle keep-alive connections are shut down, not waited for."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            live = list(self._live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FaultProxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def storage_options(self) -> dict[str, Any]:
        from tests.s3util import storage_options_for  # (s3util imports this module)

        return storage_options_for(self.url)

    def env(self) -> dict[str, str]:
        from tests.s3util import env_for

        return env_for(self.url)

    def every_nth(
        self, n: int, kind: str = "503", *, method: str | None = None, path_regex: str | None = None
    ) -> None:
        """Fail every ``n``-th matching request: ``"503"`` SlowDown, ``"500"`` or ``"reset"``.

        Without filters every request counts; ``method`` and ``path_regex`` (``re.search``
        on the decoded path) narrow what counts. ``"reset"`` answers nothing: SO_LINGER 0
        and close, so the client sees a TCP RST.
        """
        if n < 1 or kind not in _KINDS:
            raise ValueError(f"need n >= 1 and kind in {sorted(_KINDS)}, got {n!r}, {kind!r}")
        pattern = re.compile(path_regex) if path_regex is not None else None
        with self._lock:
            self._rules.append(_Rule(kind, n, _KINDS[kind], method and method.upper(), pattern))

    def deny(self, path_regex: str, method: str | None = None, status: int = 403) -> None:
        """Refuse matching requests for good (AccessDenied XML unless ``status`` says else)."""
        rule = _Rule("deny", 1, status, method and method.upper(), re.compile(path_regex))
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        """Remove every rule; counters and the log are kept."""
        with self._lock:
            self._rules.clear()

    @property
    def requests(self) -> int:
        """Requests seen, faulted ones included (an int read needs no lock)."""
        return self._requests

    @property
    def faults(self) -> int:
        return self._faults

    @property
    def connections(self) -> int:
        """Client connections accepted: shows whether clients reuse them."""
        return self._connections

    @property
    def log(self) -> list[ProxyRecord]:
        """Recorded before each response is sent, so it is complete when a call returns."""
        with self._lock:
            return list(self._log)

    def _decide(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            self._requests += 1
            fired: _Rule | None = None
            for rule in self._rules:
                if rule.matches(method, path):
                    rule.seen += 1
                    if fired is None and rule.seen % rule.every == 0:
                        fired = rule
            self._faults += fired is not None
            return fired

    def _record(self, record: ProxyRecord) -> None:
        with self._lock:
            self._log.append(record)

    def _track(self, sock: socket.socket, live: bool) -> None:
        with self._lock:
            if live:
                self._live.add(sock)
                self._connections += 1
            else:
                self._live.discard(sock)


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not join threads idling on keep-alive reads
    request_queue_size = 128
    proxy: FaultProxy

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), which can stall on hosts without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]  # type: ignore[assignment]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping an idle keep-alive connection is routine, not a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def setup(self) -> None:
        self.timeout = self.server.proxy.timeout
        super().setup()
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()
        self.server.proxy._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass

    def handle_expect_100(self) -> bool:
        return True  # deferred: "100 Continue" goes out only once we decide to forward

    def _handle(self) -> None:
        self._path, self._noted = unquote(urlsplit(self.path).path), False
        expects = self.headers.get("Expect", "").lower() == "100-continue"
        rule = self.server.proxy._decide(self.command, self._path)
        try:
            if rule is not None and rule.kind == "reset":
                self._reset()
            elif rule is not None:
                if expects:  # the client holds its body back: answer now, then close
                    self.close_connection = True
                else:
                    self._copy_body(lambda _: None)
                self._send_error(rule.status)
            else:
                if expects:
                    self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self._forward()
        except (_ClientGone, OSError):
            self.close_connection = True
        finally:
            self._note(0)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def _note(self, status: int) -> None:
        """Log the request once, before its response goes out, so tests never race it."""
        if not self._noted:
            self._noted = True
            self.server.proxy._record(ProxyRecord(self.command, self._path, status))

    def _reset(self) -> None:
        self._note(0)
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # drops makefile()'s reference, so close() below is real
        self.connection.close()

    def _send_error(self, status: int) -> None:
        code, message = _ERRORS.get(status, _ERRORS[403])
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>"
        ).encode()
        self._note(status)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _readline(self) -> bytes:
        line = self.rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise _ClientGone("truncated or overlong line in a chunked body")
        return line

    def _copy_exact(self, n: int, sink: Callable[[bytes], None]) -> None:
        while n > 0:
            data = self.rfile.read1(min(n, _CHUNK))
            if not data:
                raise _ClientGone("client closed mid-body")
            sink(data)
            n -= len(data)

    def _copy_body(self, sink: Callable[[bytes], None]) -> None:
        """Pass the request body to ``sink`` as received, chunked framing included."""
        try:
            if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                self._copy_exact(int(self.headers.get("Content-Length") or 0), sink)
                return
            while True:
                sink(line := self._readline())
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while line not in (b"\r\n", b"\n"):  # trailers, then the blank line
                        sink(line := self._readline())
                    return
                self._copy_exact(size + 2, sink)  # the data and its CRLF
        except (OSError, ValueError) as exc:
            raise _ClientGone(str(exc)) from exc

    def _forward(self) -> None:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(*proxy._upstream_addr, timeout=proxy.timeout)
        upstream_ok = True

        def to_upstream(data: bytes) -> None:
            nonlocal upstream_ok
            try:
                if upstream_ok:
                    conn.send(data)
            except OSError:
                upstream_ok = False  # keep draining the client, then try for a response

        try:
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    conn.putheader(name, value)
                conn.endheaders()
            except OSError:
                upstream_ok = False
            self._copy_body(to_upstream)  # read it all even so: an unread body means a RST
            try:
                if not upstream_ok:
                    raise ConnectionError("upstream unreachable")
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException):
                self._send_error(502)
                return
            self._note(resp.status)
            self.send_response_only(resp.status, resp.reason)
            for name, value in resp.getheaders():
                # Hop-by-hop, and werkzeug says "close" every time: persistence is ours.
                if name.lower() not in ("connection", "keep-alive"):
                    self.send_header(name, value)
            no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
            if self.close_connection or not (no_body or resp.chunked or resp.length is not None):
                self.send_header("Connection", "close")  # also: a body delimited by EOF
            self.end_headers()
            if not no_body:
                self._relay_body(resp)
        finally:
            conn.close()

    def _relay_body(self, resp: http.client.HTTPResponse) -> None:
        try:
            while data := resp.read(_CHUNK):  # http.client de-chunks; re-frame if needed
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if resp.chunked else data)
            if resp.chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (http.client.HTTPException, OSError):
            self.close_connection = True  # a truncated upstream body truncates ours too


# -------------------------------------------------------------------------------- fixtures
