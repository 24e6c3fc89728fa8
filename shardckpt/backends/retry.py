"""Retries for remote backends, in one place.

Object stores answer load with ``503 SlowDown``, drop connections and time out;
a checkpoint of thousands of requests meets some of those on every save. Each
request is retried with exponential backoff and full jitter (AWS's advice: it
spreads the retries of many ranks apart), bounded in attempts and in total time
(``knobs.retry_attempts`` / ``retry_base_ms`` / ``retry_max_seconds``).
Permanent errors (403, a missing bucket or key, a failed precondition) are never
retried: they are raised at once, naming the object.

Client libraries retry too (botocore, s3fs). Backends turn those off, so the
policy here is the only one and its bounds are the real bounds.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from .. import knobs

__all__ = ["is_transient", "call_with_retry"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 error codes that mean "try again later" (AWS docs, "Error responses").
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException",
    "BandwidthLimitExceeded", "PriorRequestNotComplete", "EC2ThrottledException",
}
_PERMANENT_TYPES = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError,
                    NotADirectoryError, ValueError, TypeError, NotImplementedError)
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                     errno.ETIMEDOUT, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH}


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _answer(e: BaseException) -> tuple[str | None, int | None]:
    """(S3 error code, HTTP status) of a botocore-style error, where it carries one."""
    resp = getattr(e, "response", None)
    if not isinstance(resp, dict):
        return None, None
    code = resp.get("Error", {}).get("Code")
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (code if isinstance(code, str) else None), (status if isinstance(status, int) else None)


def is_transient(exc: BaseException) -> bool:
    """Whether a request that failed with ``exc`` may succeed if sent again."""
    chain = _chain(exc)
    for e in chain:  # an explicit S3 answer decides
        code, status = _answer(e)
        if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return True
        if status is not None and 400 <= status < 500:
            return False
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        name = type(e).__name__
        # Network errors of aiohttp / botocore / fsspec, named to avoid importing them here.
        if name in {"ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "ClientPayloadError",
                    "ServerTimeoutError", "ConnectionClosedError", "EndpointConnectionError",
                    "ReadTimeoutError", "ConnectTimeoutError", "IncompleteReadError", "ResponseStreamingError",
                    "FSTimeoutError", "ClientResponseError", "HTTPClientError", "ProxyConnectionError"}:
            return True
    return False


def call_with_retry(what: str, fn: Callable[[], T], k: knobs.Knobs,
                    transient: Callable[[BaseException], bool] = is_transient) -> T:
    """``fn()``, retried on transient errors under the call's knobs ``k``; the final
    error names ``what`` (the object)."""
    deadline = time.monotonic() + k.retry_max_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below; permanent ones re-raised at once
            if not transient(e):
                raise _named(e, what) from e
            delay = random.uniform(0, min(20.0, k.retry_base_ms / 1000 * 2 ** (attempt - 1)))
            if attempt >= k.retry_attempts or time.monotonic() + delay > deadline:
                raise _named(e, f"{what} (gave up after {attempt} attempts)") from e
            log.debug("transient error on %s (attempt %d): %s; retrying in %.2fs", what, attempt, e, delay)
            time.sleep(delay)


def _named(e: Exception, what: str) -> Exception:
    """The same kind of exception, with the object in its message (so a typed error
    upstream says which object failed)."""
    text = f"{what}: {type(e).__name__}: {e}"
    for cls in (PermissionError, FileNotFoundError, FileExistsError, TimeoutError, ConnectionError):
        if isinstance(e, cls):
            return cls(text)
    return OSError(getattr(e, "errno", None) or errno.EIO, text)
