"""Real S3 for tests: an in-process moto server and a fault-injecting reverse proxy.

Why not mock the S3 client? A mock agrees with whatever the code under test believes
about S3. moto's real HTTP server on loopback exercises signing, ranged reads,
multipart uploads and conditional writes exactly as s3fs/aiobotocore perform them, and
:class:`FaultProxy` injects the failures real S3 produces (503 SlowDown, 500, dropped
connections, AccessDenied) at the HTTP layer, below every client and its retry logic.

moto's state is process-global: every server in one process sees the same buckets,
and :meth:`S3Endpoint.reset` empties all of them. moto, boto3 and s3fs are imported
lazily so that ``conftest.py`` importing the fixtures costs tests that never use S3
nothing.
"""

from __future__ import annotations

import logging
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.s3proxy import FaultProxy

ACCESS_KEY = SECRET_KEY = "testing"
REGION = "us-east-1"


def storage_options_for(endpoint: str) -> dict[str, Any]:
    """The ``storage_options`` a user passes to s3fs/fsspec to reach ``endpoint``."""
    return {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
    }


def env_for(endpoint: str) -> dict[str, str]:
    """AWS environment variables pointing any SDK client (s3fs included) at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }


def make_fs(storage_options: dict[str, Any], *, retries: bool = True) -> Any:
    """A fresh (uncached) ``s3fs.S3FileSystem``; ``retries=False`` makes one attempt only.

    Two retry layers must be off for "exactly these requests fail":

    * botocore's: ``config_kwargs={"retries": {"max_attempts": 0}}`` (retries after the
      first attempt; the same as ``{"total_max_attempts": 1}``);
    * s3fs's own loop, which retries SlowDown and connection errors ``fs.retries``
      times (default 5). ``retries`` is *not* an ``S3FileSystem`` argument: passing it
      ends up in ``AioSession(retries=...)``, a ``TypeError`` at first use. Set the
      attribute instead; ``fs.retries = 0`` would make s3fs ``raise None``.

    ``skip_instance_cache`` keeps fsspec from sharing (and us mutating) an instance.
    Not switchable: aiohttp resends an idempotent request (GET, HEAD, PUT, DELETE) once
    if its connection drops, whatever botocore is told.
    """
    import s3fs

    opts = dict(storage_options)
    if not retries:
        opts["config_kwargs"] = {**opts.get("config_kwargs", {}), "retries": {"max_attempts": 0}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    if not retries:
        fs.retries = 1
    return fs


def boto3_client(endpoint: str) -> Any:
    """A plain boto3 S3 client with explicit credentials (ambient AWS config can't leak in)."""
    import boto3

    creds = {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, **creds)


class S3Endpoint:
    """moto's S3 server on a free loopback port, in this process (one per xdist worker)."""

    def __init__(self) -> None:
        self._server: Any = None
        self._url: str | None = None
        self._client: Any = None

    def start(self) -> S3Endpoint:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # else: a line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self._url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> S3Endpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("S3Endpoint.start() has not been called")
        return self._url

    def client(self) -> Any:
        """A cached boto3 client that talks to moto directly, never through a proxy."""
        if self._client is None:
            self._client = boto3_client(self.url)
        return self._client

    def make_bucket(self, name: str) -> str:
        # Not s3fs mkdir: it sends a LocationConstraint that moto rejects for us-east-1.
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Abort pending multipart uploads, delete every object, then the bucket."""
        client = self.client()
        for up in list_multipart_uploads(self, name):
            client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        keys = [{"Key": o["Key"]} for o in list_objects(self, name)]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=name, Delete={"Objects": keys[i : i + 1000]})
        client.delete_bucket(Bucket=name)

    def reset(self) -> None:
        """Drop all of moto's state (every bucket in the process) via ``/moto-api/reset``."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def storage_options(self, endpoint: str | None = None) -> dict[str, Any]:
        return storage_options_for(endpoint or self.url)

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return env_for(endpoint or self.url)


def _paginate(endpoint: S3Endpoint | str, op: str, field: str, **kw: Any) -> list[dict[str, Any]]:
    client = endpoint.client() if isinstance(endpoint, S3Endpoint) else boto3_client(endpoint)
    return [
        item for page in client.get_paginator(op).paginate(**kw) for item in page.get(field, [])
    ]


def list_objects(endpoint: S3Endpoint | str, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
    """What is really stored (``Key``, ``Size``, ``ETag``...), asked of moto directly."""
    return _paginate(endpoint, "list_objects_v2", "Contents", Bucket=bucket, Prefix=prefix)


def list_multipart_uploads(
    endpoint: S3Endpoint | str, bucket: str, prefix: str = ""
) -> list[dict[str, Any]]:
    """Multipart uploads neither completed nor aborted: on real S3, leaks that cost money."""
    return _paginate(endpoint, "list_multipart_uploads", "Uploads", Bucket=bucket, Prefix=prefix)


# ----------------------------------------------------------------------------- fault proxy

@dataclass(frozen=True)
class S3Bucket:
    """A bucket on the session endpoint, unique to one test."""

    endpoint: S3Endpoint
    name: str

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix.lstrip('/')}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.endpoint.storage_options()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """One moto server per test process (so per xdist worker), stopped at the end."""
    with S3Endpoint() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: S3Endpoint) -> Iterator[S3Bucket]:
    """A fresh ``t-<12 hex>`` bucket, emptied and deleted afterwards so moto stays small."""
    bucket = S3Bucket(s3_endpoint, s3_endpoint.make_bucket(f"t-{uuid.uuid4().hex[:12]}"))
    yield bucket
    try:
        s3_endpoint.delete_bucket(bucket.name)
    except Exception as exc:  # cleanup must not mask the test's own outcome
        logging.getLogger(__name__).warning("could not delete bucket %s: %s", bucket.name, exc)


@pytest.fixture
def fault_proxy(s3_endpoint: S3Endpoint) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy`, no rules yet, in front of the session endpoint."""
    with FaultProxy(s3_endpoint) as proxy:
        yield proxy
