"""Tests of the S3 test harness itself (tests/s3util.py).

The harness is what S3 tests will trust, so each claim it makes is checked against
real traffic: moto stores what s3fs sends, the proxy is transparent to SigV4, and
every fault kind reaches the client as the error real S3 would produce.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import http.server
import io
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions
import pytest
import s3fs
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.s3proxy import FaultProxy, ProxyRecord
from tests.s3util import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    S3Bucket,
    S3Endpoint,
    boto3_client,
    list_multipart_uploads,
    list_objects,
    make_fs,
)

pytestmark = pytest.mark.s3
MiB = 1 << 20


def _blob(n: int, seed: int = 0) -> bytes:
    """Incompressible, position-dependent bytes: a misplaced chunk cannot go unnoticed."""
    return b"".join(hashlib.sha256(b"%d:%d" % (seed, i)).digest() for i in range(n // 32 + 1))[:n]


def test_roundtrip_direct(s3_bucket: S3Bucket) -> None:
    fs = make_fs(s3_bucket.storage_options)
    data = _blob(100_000)
    fs.pipe_file(s3_bucket.url("dir/a.bin"), data)
    assert fs.cat_file(s3_bucket.url("dir/a.bin")) == data
    stored = list_objects(s3_bucket.endpoint, s3_bucket.name)
    assert [(o["Key"], o["Size"]) for o in stored] == [("dir/a.bin", len(data))]


def test_roundtrip_through_proxy_large_and_concurrent(
    s3_bucket: S3Bucket, fault_proxy: FaultProxy
) -> None:
    fs = make_fs(fault_proxy.storage_options(), retries=False)
    big = _blob(24 * MiB, seed=1)  # one PUT and one GET, streamed through the proxy
    fs.call_s3("put_object", Bucket=s3_bucket.name, Key="big.bin", Body=big)
    assert (
        hashlib.sha256(fs.cat_file(s3_bucket.url("big.bin"))).digest()
        == hashlib.sha256(big).digest()
    )
    small = {s3_bucket.url(f"s/{i}"): _blob(1000 + i, seed=i) for i in range(20)}
    fs.pipe(small)
    got = fs.cat(list(small))  # concurrent GETs over several keep-alive connections
    assert got == {k.removeprefix("s3://"): v for k, v in small.items()}  # keys lose "s3://"
    # 1 PUT + 20 PUTs, and each cat_file is a HEAD (size probe) then a GET
    assert fault_proxy.requests == 63 and fault_proxy.faults == 0
    assert fault_proxy.connections <= 12  # keep-alive: aiohttp's pool is reused
    assert {r.status for r in fault_proxy.log} == {200}
    sizes = {o["Key"]: o["Size"] for o in list_objects(s3_bucket.endpoint, s3_bucket.name)}
    assert sizes["big.bin"] == len(big) and len(sizes) == 21


def test_ranged_get_through_proxy(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> None:
    data = _blob(1 * MiB, seed=2)
    s3_bucket.endpoint.client().put_object(Bucket=s3_bucket.name, Key="r.bin", Body=data)
    fs = make_fs(fault_proxy.storage_options(), retries=False)
    assert fs.cat_file(s3_bucket.url("r.bin"), start=1000, end=70_000) == data[1000:70_000]
    tail = fs.call_s3("get_object", Bucket=s3_bucket.name, Key="r.bin", Range="bytes=-10")
    assert tail["ContentRange"] == f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"
    assert ProxyRecord("GET", f"/{s3_bucket.name}/r.bin", 206) in fault_proxy.log


def test_multipart_upload_through_proxy(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> None:
    fs = make_fs(fault_proxy.storage_options(), retries=False)
    bucket, key = s3_bucket.name, "mp/obj.bin"
    parts = [_blob(5 * MiB, seed=10 + i) for i in range(3)]
    upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    assert [u["UploadId"] for u in list_multipart_uploads(s3_bucket.endpoint, bucket)] == [
        upload_id
    ]
    etags = [
        fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=p)[
            "ETag"
        ]
        for n, p in enumerate(parts, start=1)
    ]
    fs.call_s3(
        "complete_multipart_upload",
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )
    assert list_multipart_uploads(s3_bucket.endpoint, bucket) == []
    stored = list_objects(s3_bucket.endpoint, bucket, prefix="mp/")
    assert [(o["Key"], o["Size"]) for o in stored] == [(key, 15 * MiB)]
    assert stored[0]["ETag"].endswith('-3"')  # multipart ETag: md5-of-md5s, "-<parts>"
    assert fs.cat_file(s3_bucket.url(key)) == b"".join(parts)
    assert [r.method for r in fault_proxy.log] == [
        "POST",
        "PUT",
        "PUT",
        "PUT",
        "POST",
        "HEAD",
        "GET",
    ]


def test_every_nth_503_fails_exactly_those_requests(
    s3_bucket: S3Bucket, fault_proxy: FaultProxy
) -> None:
    """With both retry layers off (see ``make_fs``), request k fails iff k % n == 0."""
    fs = make_fs(fault_proxy.storage_options(), retries=False)
    fault_proxy.every_nth(3, "503")
    failed = []
    for i in range(7):
        try:
            fs.pipe_file(s3_bucket.url(f"k{i}"), b"x")
        except OSError as exc:
            assert exc.errno == errno.EBUSY and "reduce your request rate" in str(exc)
            failed.append(i)
    assert failed == [2, 5]
    assert (fault_proxy.requests, fault_proxy.faults) == (7, 2)
    assert [r.status for r in fault_proxy.log] == [200, 200, 503, 200, 200, 503, 200]
    keys = sorted(o["Key"] for o in list_objects(s3_bucket.endpoint, s3_bucket.name))
    assert keys == ["k0", "k1", "k3", "k4", "k6"]  # faulted PUTs never reached moto


def test_every_nth_503_is_absorbed_by_default_retries(
    s3_bucket: S3Bucket, fault_proxy: FaultProxy
) -> None:
    """The control for the test above: the fault only surfaces because retries are off."""
    fs = make_fs(fault_proxy.storage_options())
    fault_proxy.every_nth(2, "503", method="PUT")
    for i in range(3):
        fs.pipe_file(s3_bucket.url(f"k{i}"), b"x")
    assert fault_proxy.faults >= 1 and fault_proxy.requests == 3 + fault_proxy.faults
    assert len(list_objects(s3_bucket.endpoint, s3_bucket.name)) == 3


def test_every_nth_filter_counts_only_matching_requests(
    s3_bucket: S3Bucket, fault_proxy: FaultProxy
) -> None:
    fs = make_fs(fault_proxy.storage_options(), retries=False)
    fault_proxy.every_nth(2, "500", method="GET", path_regex=r"/hot$")
    fs.pipe({s3_bucket.url("hot"): b"h", s3_bucket.url("cold"): b"c"})
    outcomes = []
    for key in ["hot", "cold", "cold", "hot", "hot", "cold"]:
        try:
            fs.cat_file(s3_bucket.url(key))
            outcomes.append("ok")
        except OSError as exc:
            assert exc.errno == errno.EREMOTEIO
            outcomes.append("fail")
    assert outcomes == ["ok", "ok", "ok", "fail", "ok", "ok"]
    assert fault_proxy.faults == 1 and fault_proxy.requests == 2 + 6 * 2  # HEADs don't count
    fault_proxy.clear()
    assert fs.cat_file(s3_bucket.url("hot")) == b"h"


def test_reset_is_a_connection_error(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> None:
    """A RST surfaces as a botocore connection error, never as a response.

    aiohttp transparently retries *idempotent* methods (GET, HEAD, PUT, DELETE) once on
    a dropped connection, whatever botocore's retry config, so a reset GET costs two
    attempts; POST (e.g. CreateMultipartUpload) is attempted exactly once.
    """
    s3_bucket.endpoint.client().put_object(Bucket=s3_bucket.name, Key="obj", Body=b"payload")
    fs = make_fs(fault_proxy.storage_options(), retries=False)
    fault_proxy.every_nth(1, "reset", method="GET")
    with pytest.raises((botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
        fs.cat_file(s3_bucket.url("obj"))
    assert 1 <= fault_proxy.faults <= 2
    assert {r.status for r in fault_proxy.log if r.method == "GET"} == {0}
    fault_proxy.clear()
    fault_proxy.every_nth(1, "reset", method="POST")
    before = fault_proxy.faults
    with pytest.raises((botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
        fs.call_s3("create_multipart_upload", Bucket=s3_bucket.name, Key="mp")
    assert fault_proxy.faults == before + 1
    assert list_multipart_uploads(s3_bucket.endpoint, s3_bucket.name) == []
    fault_proxy.clear()
    assert fs.cat_file(s3_bucket.url("obj")) == b"payload"  # the client recovers


def test_deny_is_permission_error_for_that_key_only(
    s3_bucket: S3Bucket, fault_proxy: FaultProxy
) -> None:
    client = s3_bucket.endpoint.client()
    for key in ["secret.bin", "open.bin", "ckpt/manifest.json"]:
        client.put_object(Bucket=s3_bucket.name, Key=key, Body=key.encode())
    fs = make_fs(fault_proxy.storage_options())  # default retries: 403 is not retried
    fault_proxy.deny(r"/secret\.bin$")
    fault_proxy.deny(r"manifest\.json$", method="PUT")
    with pytest.raises(PermissionError):
        fs.cat_file(s3_bucket.url("secret.bin"))
    with pytest.raises(PermissionError):
        fs.info(s3_bucket.url("secret.bin"))  # HEAD: status only, no body
    assert fs.cat_file(s3_bucket.url("open.bin")) == b"open.bin"
    assert fs.cat_file(s3_bucket.url("ckpt/manifest.json")) == b"ckpt/manifest.json"
    with pytest.raises(PermissionError):
        fs.pipe_file(s3_bucket.url("ckpt/manifest.json"), b"new")
    fs.pipe_file(s3_bucket.url("ckpt/data.bin"), b"fine")
    # the denied HEAD ends each secret.bin call; cat_file of others = HEAD + GET
    assert fault_proxy.faults == 3 and fault_proxy.requests == 8
    assert client.get_object(Bucket=s3_bucket.name, Key="ckpt/manifest.json")["Body"].read() == (
        b"ckpt/manifest.json"
    )


def test_conditional_put_through_proxy(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> None:
    fs = make_fs(fault_proxy.storage_options(), retries=False)
    fs.call_s3("put_object", Bucket=s3_bucket.name, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(FileExistsError):
        fs.call_s3("put_object", Bucket=s3_bucket.name, Key="once", Body=b"second", IfNoneMatch="*")
    with pytest.raises(FileExistsError):
        fs.pipe_file(s3_bucket.url("once"), b"third", mode="create")
    assert fs.cat_file(s3_bucket.url("once")) == b"first"
    assert [r.status for r in fault_proxy.log] == [200, 412, 412, 200, 200]


# ------------------------------------------------------------ protocol-level behaviour


class _Capture(http.server.BaseHTTPRequestHandler):
    """Upstream that records each request (headers and de-chunked body) and says 200."""

    protocol_version = "HTTP/1.1"
    timeout = 10
    seen: list[tuple[str, str, dict[str, str], bytes]]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _handle(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.command, self.path, dict(self.headers.items()), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PUT = do_GET = _handle


@pytest.fixture
def capture() -> Iterator[tuple[str, list[tuple[str, str, dict[str, str], bytes]]]]:
    seen: list[tuple[str, str, dict[str, str], bytes]] = []
    handler = type("Handler", (_Capture,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def _sigv4_valid(method: str, path: str, headers: dict[str, str]) -> bool:
    """Recompute the request's SigV4 signature the way S3 does, from what arrived."""
    fields = dict(
        p.strip().split("=", 1) for p in headers["Authorization"].split(" ", 1)[1].split(",")
    )
    signed = fields["SignedHeaders"].split(";")
    lower = {k.lower(): v for k, v in headers.items()}
    request = AWSRequest(
        method=method, url=f"http://{lower['host']}{path}", headers={h: lower[h] for h in signed}
    )
    request.context["timestamp"] = lower["x-amz-date"]
    signer = S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION)
    string_to_sign = signer.string_to_sign(request, signer.canonical_request(request))
    return signer.signature(string_to_sign, request) == fields["Signature"]


def test_reset_is_a_tcp_rst_not_a_fin(fault_proxy: FaultProxy) -> None:
    fault_proxy.every_nth(1, "reset")
    host, port = urlsplit(fault_proxy.url).hostname, urlsplit(fault_proxy.url).port
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"GET /bkt/key HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):  # a plain close would read b""
            sock.recv(1024)
    assert fault_proxy.log == [ProxyRecord("GET", "/bkt/key", 0)]


def test_signed_requests_still_validate_through_proxy(capture: Any) -> None:
    upstream, seen = capture
    with FaultProxy(upstream) as proxy:
        # a file-like body makes botocore send "Expect: 100-continue" and wait for the 100
        boto3_client(proxy.url).put_object(
            Bucket="bkt", Key="a b/c+d.bin", Body=io.BytesIO(b"boto3")
        )
        make_fs(proxy.storage_options(), retries=False).pipe_file("bkt/x/y=1.bin", b"s3fs")
        proxy_netloc = urlsplit(proxy.url).netloc
    assert [(m, body) for m, _, _, body in seen] == [("PUT", b"boto3"), ("PUT", b"s3fs")]
    assert seen[0][2].get("Expect") == "100-continue"
    for method, path, headers, _ in seen:
        assert headers["Host"] == proxy_netloc  # the client's Host, verbatim
        assert _sigv4_valid(method, path, headers)
        rewritten = {**headers, "Host": urlsplit(upstream).netloc}
        assert not _sigv4_valid(method, path, rewritten)  # the check can fail


def _sign(method: str, url: str, **headers: str) -> dict[str, str]:
    """SigV4 headers for a hand-made request (moto answers unsigned reads with 403)."""
    request = AWSRequest(
        method=method, url=url, headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD", **headers}
    )
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(request)
    return dict(request.headers.items())


def _read_interim(sock: socket.socket) -> bytes:
    """One response head, read byte by byte so nothing after it is consumed."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, "connection closed before any response"
        head += byte
    return head


def test_chunked_expect_continue_keepalive_and_head(
    s3_bucket: S3Bucket, fault_proxy: FaultProxy
) -> None:
    netloc = urlsplit(fault_proxy.url).netloc
    conn = http.client.HTTPConnection(netloc, timeout=10)
    conn.connect()
    sock = conn.sock
    path, pieces = f"/{s3_bucket.name}/chunked.bin", [_blob(70_000, seed=7), b"", _blob(5, seed=8)]
    conn.putrequest("PUT", path, skip_accept_encoding=True)
    for name, value in _sign(
        "PUT", fault_proxy.url + path, **{"Transfer-Encoding": "chunked"}
    ).items():
        conn.putheader(name, value)
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    assert _read_interim(sock).startswith(b"HTTP/1.1 100")  # sent before the body
    for piece in filter(None, pieces):
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))  # werkzeug rejects chunk extensions
    conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 200, response.read()
    response.read()
    conn.request("HEAD", path, headers=_sign("HEAD", fault_proxy.url + path))
    head = conn.getresponse()
    assert head.status == 200 and int(head.headers["Content-Length"]) == 70_005
    assert head.read() == b""
    conn.request("GET", path, headers=_sign("GET", fault_proxy.url + path))
    assert conn.getresponse().read() == b"".join(pieces)
    assert conn.sock is sock  # three requests, one keep-alive connection
    conn.close()
    stored = list_objects(s3_bucket.endpoint, s3_bucket.name)
    assert [(o["Key"], o["Size"]) for o in stored] == [("chunked.bin", 70_005)]


def test_denied_expect_continue_is_answered_without_the_body(
    s3_bucket: S3Bucket, fault_proxy: FaultProxy
) -> None:
    fault_proxy.deny(r"\.bin$", method="PUT")
    netloc = urlsplit(fault_proxy.url)
    with socket.create_connection((netloc.hostname, netloc.port), timeout=5) as sock:
        sock.sendall(
            f"PUT /{s3_bucket.name}/big.bin HTTP/1.1\r\nHost: x\r\nContent-Length: {100 * MiB}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        head = _read_interim(sock).decode()  # the final answer, with no "100 Continue" first
        assert head.startswith("HTTP/1.1 403 ") and "Connection: close\r\n" in head
        length = int(re.search(r"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        body = b""
        while len(body) < length:
            body += sock.recv(length - len(body))
        assert b"<Code>AccessDenied</Code>" in body
        assert sock.recv(1) == b""  # and then it hangs up: no waiting for 100 MiB
    assert list_objects(s3_bucket.endpoint, s3_bucket.name) == []


def test_env_vars_point_s3fs_at_the_endpoint(
    s3_bucket: S3Bucket, fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore >= 1.31 reads AWS_ENDPOINT_URL; s3fs passes no endpoint, so it applies."""
    for name, value in fault_proxy.env().items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe_file(s3_bucket.url("via-env"), b"env")
    assert fs.cat_file(s3_bucket.url("via-env")) == b"env"
    assert fault_proxy.requests == 3  # PUT, HEAD, GET: it really went to the URL in the environment


def test_endpoint_reset_drops_all_buckets(s3_endpoint: S3Endpoint) -> None:
    name = s3_endpoint.make_bucket("reset-me-" + os.urandom(4).hex())
    assert name in [b["Name"] for b in s3_endpoint.client().list_buckets()["Buckets"]]
    s3_endpoint.reset()
    assert name not in [b["Name"] for b in s3_endpoint.client().list_buckets()["Buckets"]]


def test_proxy_stop_is_prompt_with_idle_keepalive(s3_endpoint: S3Endpoint) -> None:
    proxy = FaultProxy(s3_endpoint, timeout=30).start()
    conn = http.client.HTTPConnection(urlsplit(proxy.url).netloc, timeout=5)
    conn.request("GET", "/")
    conn.getresponse().read()  # the connection now idles in the proxy's keep-alive loop
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 3
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("GET", "/")
        conn.getresponse()
    conn.close()


def test_unreachable_upstream_is_a_502() -> None:
    with socket.socket() as placeholder:  # a port that nothing listens on
        placeholder.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
        with FaultProxy(dead, timeout=5) as proxy:
            conn = http.client.HTTPConnection(urlsplit(proxy.url).netloc, timeout=5)
            conn.request("PUT", "/bkt/key", body=b"x" * 1000)
            response = conn.getresponse()
            assert response.status == 502 and b"BadGateway" in response.read()
            conn.close()
    assert proxy.log == [ProxyRecord("PUT", "/bkt/key", 502)]
