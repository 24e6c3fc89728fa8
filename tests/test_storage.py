import os

import pytest

from shardckpt import knobs
from shardckpt.storage import FsspecStorage, LocalStorage, open_storage


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(tmp_path / "ck")
    return open_storage(f"memory://storage-test-{os.getpid()}-{id(tmp_path)}/ck")


def test_backend_is_picked_by_url(tmp_path):
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(open_storage("memory://x/y"), FsspecStorage)
    with pytest.raises(ValueError):
        open_storage("")


def test_write_read_list_remove(storage):
    assert not storage.exists()
    storage.makedirs("data")
    with knobs.override(writeback_bytes=4):
        w = storage.open_writer("data/a.bin")
        for part in (b"hello ", memoryview(b"world"), b"!" * 10):
            w.write(part)
        w.close()
    assert storage.size("data/a.bin") == 21 and storage.read_bytes("data/a.bin") == b"hello world" + b"!" * 10
    r = storage.open_reader("data/a.bin")
    out = bytearray(5)
    r.read_into(6, memoryview(out))
    assert bytes(out) == b"world" and r.size() == 21
    with pytest.raises(EOFError):
        r.read_into(18, memoryview(bytearray(5)))
    r.close()
    storage.write_atomic("manifest.json", b"{}")
    storage.write_atomic("manifest.json", b"{1}")
    assert storage.read_bytes("manifest.json") == b"{1}"
    assert storage.listdir() == ["data", "manifest.json"] and storage.listdir("data") == ["a.bin"]
    assert storage.listdir("nope") == []
    storage.remove("data/a.bin")
    storage.remove("data/a.bin")  # already gone: fine
    storage.remove_tree("data")
    assert storage.listdir() == ["manifest.json"]


def test_local_atomic_write_leaves_no_tmp(tmp_path):
    s = LocalStorage(str(tmp_path))
    s.write_atomic("m.json", b"x")
    assert os.listdir(tmp_path) == ["m.json"]
