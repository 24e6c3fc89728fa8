import sys
import types

import pytest


def _install_checksum_standin() -> None:
    # Only while the compiled extension's shim is absent (bootstrapping); CI has it.
    try:
        import shardckpt.native.crc32c  # noqa: F401 - only: is it there?
    except ImportError:
        import crc32c as _c

        m = types.ModuleType("shardckpt.native.crc32c")
        m.crc32c = lambda d, v=0: _c.crc32c(d, v)
        m.implementation = lambda: "standin"
        sys.modules["shardckpt.native.crc32c"] = m


_install_checksum_standin()


@pytest.fixture
def small_chunks():
    """Tiny chunks, so small tensors span many chunks and exercise the chunked paths."""
    import shardckpt

    with shardckpt.knobs.override(chunk_bytes=64):
        yield


from tests.s3util import fault_proxy, s3_bucket, s3_endpoint  # noqa: E402,F401 - fixtures
