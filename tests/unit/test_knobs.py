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


def test_override_belongs_to_the_thread_that_entered_it():
    import threading

    seen: dict[str, int] = {}
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with knobs.override(chunk_bytes=8192):
            inside.set()
            release.wait(10)
            seen["other"] = knobs.get().chunk_bytes

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with knobs.override(chunk_bytes=4096):
        seen["main"] = knobs.get().chunk_bytes
        release.set()
        t.join(10)
    assert seen == {"main": 4096, "other": 8192}
    assert knobs.get() == knobs.Knobs.from_env()


def test_a_saves_snapshot_reaches_its_background_threads(tmp_path):
    """The async part of a save runs on another thread and still cuts chunks by the
    caller's override (the request carries it): the manifest's chunks show it."""
    import torch

    import shardckpt
    from shardckpt.store import CheckpointDir

    with knobs.override(chunk_bytes=1024):
        shardckpt.async_save({"w": torch.zeros(4096)}, tmp_path / "c").result()
    shardckpt.close()
    entry = CheckpointDir.at(tmp_path / "c").read_manifest().entries["w"]
    sizes = {c.raw_len for s in entry.shards for c in s.blob.chunks}
    assert sizes == {1024}, sizes
