import subprocess
import sys

import pytest

from shardckpt import knobs


def test_override_is_scoped_and_validated():
    before = knobs.get()
    with knobs.override(chunk_bytes=128, writeback_bytes=0) as k:
        assert k.chunk_bytes == 128 and knobs.get().writeback_bytes == 0
    assert knobs.get() == before
    with pytest.raises(TypeError, match="unknown knob"):
        with knobs.override(chunk_size=1):
            pass
    with pytest.raises(ValueError):
        with knobs.override(chunk_bytes=0):
            pass


def test_environment_overrides():
    code = "from shardckpt import knobs; k = knobs.get(); print(k.chunk_bytes, k.io_threads, k.writeback_bytes)"
    env = {"SHARDCKPT_CHUNK_BYTES": "0x1000", "SHARDCKPT_IO_THREADS": "3", "SHARDCKPT_WRITEBACK_BYTES": "0"}
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["4096", "3", "0"]
    bad = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "SHARDCKPT_CHUNK_BYTES": "lots"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "SHARDCKPT_CHUNK_BYTES" in bad.stderr


def test_bind_carries_this_threads_snapshot_to_a_worker_thread():
    from concurrent.futures import ThreadPoolExecutor

    with knobs.override(chunk_bytes=4096):
        snapshot = knobs.get()
    with knobs.use(snapshot), ThreadPoolExecutor(1) as pool:
        bound = pool.submit(knobs.bind(lambda: knobs.get().chunk_bytes)).result()
        unbound = pool.submit(lambda: knobs.get().chunk_bytes).result()
    assert bound == 4096 and unbound == knobs.Knobs.from_env().chunk_bytes != 4096
