
import pytest


@pytest.fixture
def small_chunks():
    """Tiny chunks, so small tensors span many chunks and exercise the chunked paths."""
    import shardckpt

    with shardckpt.knobs.override(chunk_bytes=64):
        yield


from tests.s3util import fault_proxy, s3_bucket, s3_endpoint  # noqa: E402,F401 - fixtures
