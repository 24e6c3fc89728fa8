"""S3 and S3-compatible object stores, through s3fs's client.

Why not fsspec's generic file layer: it uploads a file as one sequential
stream, reads one range at a time, and answers ``size``/``ls`` from a directory
cache that can be stale. Here every request is an explicit S3 call
(``S3FileSystem.call_s3``: s3fs still owns credentials, endpoints and the
connection pool), so:

- shard files go up as **multipart uploads**, ``knobs.upload_concurrency``
  parts of ``knobs.part_bytes`` in flight (memory: that many parts + one being
  filled); a failed or aborted writer aborts its upload, and ``abort_uploads``
  removes those a killed process left (S3 bills unfinished parts forever);
- a rank writes several objects of about ``knobs.object_bytes`` (cut at tensor
  boundaries, see ``dcp.writer``), so a save or load is many requests at once;
  reads of part of an object are split into ranged GETs of
  ``knobs.read_part_bytes`` fetched concurrently, a read of a whole object is
  one GET;
- sizes and listings are HEAD / ListObjectsV2 answers, never cached;
- every request goes through ``storage.retry`` (client retries are turned
  off, so its bounds are the real ones);
- ``create_exclusive`` is a conditional PUT (``If-None-Match: *``). An endpoint
  that does not implement conditional writes (older S3-compatibles) gets
  write-then-read-back with a warning: that narrows the race of two creators
  but cannot close it.

Endpoint and credentials: the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) or ``storage_options`` (s3fs's constructor
arguments: ``key``, ``secret``, ``client_kwargs={"endpoint_url": ...}``, ...).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .base import Capabilities, Storage
from .retry import call_with_retry

__all__ = ["S3Storage"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_MIN_PART = 5 << 20  # S3's minimum part size (all parts but the last)


def _frozen(value: Any) -> Any:
    """A hashable, order-independent form of storage options (the filesystem cache's key)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return repr(value)


def _s3fs_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = copy.deepcopy(dict(storage_options or {}))
    # One retry policy (ours): botocore's off here, s3fs's loop in _filesystem.
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    opts["config_kwargs"] = config
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client = dict(opts.get("client_kwargs") or {})
        client.setdefault("endpoint_url", endpoint)
        opts["client_kwargs"] = client
    return opts


_filesystems: dict[tuple[int, str], Any] = {}
_fs_lock = threading.Lock()


def _filesystem(storage_options: Mapping[str, Any] | None) -> Any:
    """One ``S3FileSystem`` per process and options (its connection pool is reused).

    Our own instance (``skip_instance_cache``), because its retries are switched
    off: ``retries`` is an attribute, not a constructor argument, of s3fs."""
    try:
        import s3fs
    except ImportError:
        raise ImportError("s3:// paths need the s3fs package: pip install 'shardckpt[s3]'") from None

    opts = _s3fs_options(storage_options)
    key = (os.getpid(), _frozen(opts))
    with _fs_lock:
        fs = _filesystems.get(key)
        if fs is None:
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
            fs.retries = 1  # one attempt per call_s3: storage.retry decides
            _filesystems[key] = fs
        return fs


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = url.split("://", 1)[1] if "://" in url else url
    bucket, _, prefix = rest.strip("/").partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: an S3 URL needs a bucket (s3://bucket/prefix)")
    return bucket, prefix.strip("/")


class _Upload:
    """One shard file as a multipart upload; a single PUT if it fits in one part."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        k = storage.knobs
        self._s3, self._key = storage, key
        self._part_bytes = max(_MIN_PART, k.part_bytes)
        self._limit = max(1, k.upload_concurrency)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: list[Future[dict[str, Any]]] = []  # oldest first
        self._parts: list[dict[str, Any]] = []  # uploaded: PartNumber, ETag
        self._count = 0

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            # A full part goes up only once more bytes follow: a file of exactly one
            # part is then one PUT at close, not a one-part multipart upload.
            if len(self._buf) == self._part_bytes:
                self._send_part()
            take = min(self._part_bytes - len(self._buf), view.nbytes)
            self._buf += view[:take]
            view = view[take:]

    def _send_part(self) -> None:
        s3, key = self._s3, self._key
        if self._upload_id is None:
            self._upload_id = s3._call("create_multipart_upload", key, Key=key)["UploadId"]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._limit, thread_name_prefix="shardckpt-s3-upload")
        while len(self._in_flight) >= self._limit:  # bounded memory: wait for the oldest part
            self._parts.append(self._in_flight.pop(0).result())
        body, self._buf = bytes(self._buf), bytearray()
        self._count += 1
        number, upload_id = self._count, self._upload_id

        def upload() -> dict[str, Any]:
            r = s3._call("upload_part", key, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": r["ETag"]}

        self._in_flight.append(self._pool.submit(upload))

    def close(self) -> None:
        s3, key = self._s3, self._key
        if self._upload_id is None:
            body, self._buf = bytes(self._buf), bytearray()
            s3._call("put_object", key, Key=key, Body=body)
            return
        try:
            if self._buf:
                self._send_part()
            while self._in_flight:
                self._parts.append(self._in_flight.pop(0).result())
            s3._call("complete_multipart_upload", key, Key=key, UploadId=self._upload_id,
                     MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])})
            self._upload_id = None
        except BaseException:
            self.abort()
            raise
        finally:
            self._shutdown()

    def abort(self) -> None:
        for f in self._in_flight:
            f.cancel()
        self._shutdown()
        self._in_flight, self._buf = [], bytearray()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._s3._call("abort_multipart_upload", self._key, Key=self._key, UploadId=upload_id)
            except Exception as e:  # noqa: BLE001 - the next save's abort_uploads catches it
                log.warning("could not abort the upload of %s: %s", self._s3._url_of(self._key), e)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class _Reader:
    """Ranged reads: one read is cut into ``knobs.read_part_bytes`` GETs fetched at once."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._s3, self._key = storage, key
        self._size: int | None = None

    def size(self) -> int:
        if self._size is None:
            self._size = self._s3._head_size(self._key)
        return self._size

    def read_into(self, offset: int, out: memoryview) -> None:
        view = out.cast("B")
        k = self._s3.knobs
        step = max(1, k.read_part_bytes)
        if offset == 0 and self._size == view.nbytes:
            step = max(1, view.nbytes)  # a whole object: one GET (no range to serve piecewise)
        ranges = [(s, min(s + step, view.nbytes)) for s in range(0, view.nbytes, step)]
        if len(ranges) <= 1:
            for s, e in ranges:
                self._get(offset, view, s, e)
            return
        with ThreadPoolExecutor(min(len(ranges), max(1, k.read_concurrency)),
                                thread_name_prefix="shardckpt-s3-read") as pool:
            for f in [pool.submit(self._get, offset, view, s, e) for s, e in ranges]:
                f.result()

    def _get(self, base: int, view: memoryview, s: int, e: int) -> None:
        lo, hi = base + s, base + e
        data = self._s3._retry(f"read {self._s3._url_of(self._key)} bytes [{lo}, {hi})",
                               lambda: self._s3.fs.cat_file(self._s3._path(self._key), start=lo, end=hi))
        if len(data) != e - s:
            raise EOFError(f"{self._s3._url_of(self._key)}: short read at byte {lo} ({len(data)} of {e - s})")
        view[s:e] = data

    def close(self) -> None:
        pass


class S3Storage(Storage):
    """``s3://bucket/prefix``. ``storage_options`` go to ``s3fs.S3FileSystem``."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *, _fs: Any = None) -> None:
        self.bucket, self.prefix = split_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs = _fs if _fs is not None else _filesystem(storage_options)
        self.capabilities = Capabilities(atomic_put=True, exclusive_create=True, remote=True)
        self._conditional = True

    # -- plumbing

    def _k(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{key}"

    def _url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return call_with_retry(what, fn, self.knobs)

    def _call(self, op: str, key: str, **kwargs: Any) -> Any:
        what = f"{op} {self._url_of(key)}" if key else f"{op} s3://{self.bucket}"
        return self._retry(what, lambda: self.fs.call_s3(op, Bucket=self.bucket, **kwargs))

    def _head_size(self, key: str) -> int:
        return int(self._call("head_object", key, Key=key)["ContentLength"])

    def _list(self, prefix: str, delimiter: str | None) -> tuple[list[str], list[str]]:
        """(keys, common prefixes) under ``prefix``, every page."""
        keys: list[str] = []
        dirs: list[str] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Prefix": prefix}
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            r = self._call("list_objects_v2", prefix, **kw)
            keys += [o["Key"] for o in r.get("Contents", [])]
            dirs += [p["Prefix"] for p in r.get("CommonPrefixes", [])]
            if not r.get("IsTruncated"):
                return keys, dirs
            token = r.get("NextContinuationToken")

    def _dir_prefix(self, rel: str) -> str:
        k = self._k(rel)
        return f"{k}/" if k else ""

    # -- reading

    def exists(self, rel: str = "") -> bool:
        key = self._k(rel)
        if key:
            try:
                self._head_size(key)
                return True
            except FileNotFoundError:
                pass
        return self.isdir(rel)

    def isdir(self, rel: str = "") -> bool:
        r = self._call("list_objects_v2", self._k(rel), Prefix=self._dir_prefix(rel), MaxKeys=1)
        return bool(r.get("KeyCount") or r.get("Contents") or r.get("CommonPrefixes"))

    def listdir(self, rel: str = "") -> list[str]:
        prefix = self._dir_prefix(rel)
        keys, dirs = self._list(prefix, "/")
        names = {k[len(prefix):] for k in keys} | {d[len(prefix):].rstrip("/") for d in dirs}
        return sorted(n for n in names if n)

    def size(self, rel: str) -> int:
        return self._head_size(self._k(rel))

    def read_bytes(self, rel: str) -> bytes:
        key = self._k(rel)
        return bytes(self._retry(f"read {self._url_of(key)}", lambda: self.fs.cat_file(self._path(key))))

    def open_reader(self, rel: str) -> _Reader:
        return _Reader(self, self._k(rel))

    # -- writing

    def open_writer(self, rel: str) -> _Upload:
        return _Upload(self, self._k(rel))

    def put(self, rel: str, data: bytes) -> None:
        key = self._k(rel)
        self._call("put_object", key, Key=key, Body=bytes(data))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        key = self._k(rel)
        if self._conditional:
            try:
                self._call("put_object", key, Key=key, Body=bytes(data), IfNoneMatch="*")
                return True
            except FileExistsError:
                return False
            except NotImplementedError:
                pass
            except OSError as e:
                if "NotImplemented" not in str(e) and "501" not in str(e):
                    raise
            self._conditional = False
            log.warning("%s does not support conditional writes (If-None-Match); exclusive create "
                        "falls back to write-then-read-back, which cannot exclude a simultaneous "
                        "creator", self.url)
        if self.exists(rel):
            return False
        self.put(rel, data)
        return self.read_bytes(rel) == bytes(data)

    def makedirs(self, rel: str) -> None:
        pass  # no directories in S3: a prefix exists once a key under it does

    def remove(self, rel: str) -> None:
        key = self._k(rel)
        try:
            self._call("delete_object", key, Key=key)  # succeeds for a missing key, too
        except FileNotFoundError:
            pass  # no bucket: nothing to remove

    def remove_tree(self, rel: str = "") -> None:
        prefix = self._dir_prefix(rel)
        keys, _ = self._list(prefix, None)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[i:i + 1000]
            r = self._call("delete_objects", prefix, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = r.get("Errors") or []
            if errors:
                e = errors[0]
                raise OSError(f"delete {self._url_of(e.get('Key', '?'))}: {e.get('Code')}: {e.get('Message')}")
        self.abort_uploads(rel)

    def abort_uploads(self, rel: str = "") -> int:
        prefix = self._dir_prefix(rel)
        n = 0
        while True:
            r = self._call("list_multipart_uploads", prefix, Prefix=prefix)
            uploads = r.get("Uploads") or []
            for u in uploads:
                self._call("abort_multipart_upload", u["Key"], Key=u["Key"], UploadId=u["UploadId"])
                n += 1
            if not uploads or not r.get("IsTruncated"):
                return n

    def child(self, rel: str) -> S3Storage:
        out = S3Storage(f"s3://{self.bucket}/{self._k(rel)}", self.storage_options, _fs=self.fs)
        out._knobs = self._knobs
        return out

