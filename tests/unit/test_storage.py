"""The byte-backend contract, run once per backend: local, memory, S3 (moto on loopback)."""

import os
import threading
import uuid

import pytest

from shardckpt import knobs
from shardckpt.backends import Capabilities, Storage, open_storage, register_backend
from shardckpt.backends.retry import call_with_retry, is_transient


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(tmp_path / "ck")
    if request.param == "memory":
        # a fresh root each time (an id() can be reused once its object is freed)
        return open_storage(f"memory://storage-test-{uuid.uuid4().hex}/ck")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(bucket.url("ck"), storage_options=bucket.storage_options)


def test_backends_are_picked_by_url_and_declare_capabilities(tmp_path):
    local = open_storage(tmp_path)
    assert local.capabilities.atomic_rename and local.capabilities.durable_fsync
    assert not local.capabilities.remote
    assert open_storage(f"file://{tmp_path}").capabilities == local.capabilities
    mem = open_storage("memory://x/y")
    assert mem.capabilities.atomic_put and not mem.capabilities.remote and not mem.capabilities.atomic_rename
    with pytest.raises(ValueError):
        open_storage("")
    with pytest.raises(TypeError, match="storage_options"):
        open_storage("memory://x", storage_options=["not", "a", "dict"])


def test_third_party_backend_by_scheme(tmp_path):
    opened = []

    def factory(url, options):
        opened.append((url, dict(options)))
        return open_storage(f"memory://thirdparty/{url.split('://', 1)[1]}")

    register_backend("testfs", factory)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("testfs", factory)
    s = open_storage("testfs://a/b", storage_options={"k": 1})
    assert opened == [("testfs://a/b", {"k": 1})] and isinstance(s, Storage)


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
    storage.put("manifest.json", b"{}")
    storage.put("manifest.json", b"{1}")
    assert storage.read_bytes("manifest.json") == b"{1}"
    assert storage.listdir() == ["data", "manifest.json"] and storage.listdir("data") == ["a.bin"]
    assert storage.isdir("data") and not storage.isdir("manifest.json")
    assert storage.listdir("nope") == []
    with pytest.raises(FileNotFoundError):
        storage.size("data/missing.bin")
    storage.remove("data/a.bin")
    storage.remove("data/a.bin")  # already gone: fine
    assert not storage.exists("data/a.bin")
    storage.remove_tree("data")
    assert storage.listdir() == ["manifest.json"]


def test_child_is_rooted_below(storage):
    child = storage.child("step_1")
    child.makedirs("")
    child.put("x.json", b"1")
    assert storage.listdir() == ["step_1"] and storage.read_bytes("step_1/x.json") == b"1"
    assert child.url.rstrip("/").endswith("step_1") and child.capabilities == storage.capabilities


def test_exclusive_create_where_declared(storage):
    if not storage.capabilities.exclusive_create:
        with pytest.raises(NotImplementedError):
            storage.create_exclusive("m", b"a")
        return
    storage.makedirs("")
    assert storage.create_exclusive("m", b"a") is True
    assert storage.create_exclusive("m", b"b") is False
    assert storage.read_bytes("m") == b"a"


def test_exclusive_create_race_has_one_winner(storage):
    if not storage.capabilities.exclusive_create:
        # nothing to race (test_exclusive_create_where_declared checks it refuses): a skip, not a pass
        pytest.skip("the backend declares no exclusive_create")
    storage.makedirs("")
    wins, barrier = [], threading.Barrier(4)

    def racer(i):
        barrier.wait(timeout=30)
        if storage.create_exclusive("owner", str(i).encode()):
            wins.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(wins) == 1 and storage.read_bytes("owner") == str(wins[0]).encode()


def test_rename_where_declared(storage):
    if not storage.capabilities.atomic_rename:
        with pytest.raises(NotImplementedError):
            storage.rename("a", "b")
        return
    storage.makedirs("")
    storage.put("a.tmp", b"new")
    storage.put("a", b"old")
    storage.rename("a.tmp", "a")
    assert storage.read_bytes("a") == b"new" and not storage.exists("a.tmp")


def test_aborted_writer_leaves_nothing(storage):
    storage.makedirs("data")
    with knobs.override(part_bytes=5 << 20):
        w = storage.open_writer("data/big.bin")
        w.write(b"\1" * (6 << 20))  # past one part: an upload is under way on object stores
        w.abort()
    assert not storage.exists("data/big.bin")
    assert storage.abort_uploads("data") == 0  # the writer aborted its own upload


def test_large_file_in_parts_reads_back_in_ranges(storage):
    storage.makedirs("data")
    payload = os.urandom(13 << 20)
    with knobs.override(part_bytes=5 << 20, upload_concurrency=2, read_part_bytes=3 << 20, read_concurrency=3):
        w = storage.open_writer("data/big.bin")
        for i in range(0, len(payload), 1 << 20):
            w.write(memoryview(payload)[i:i + (1 << 20)])
        w.close()
        assert storage.size("data/big.bin") == len(payload)
        out = bytearray(10 << 20)
        storage.open_reader("data/big.bin").read_into(1234, memoryview(out))
    assert bytes(out) == payload[1234:1234 + (10 << 20)]


def test_local_put_and_rename_leave_no_tmp(tmp_path):
    s = open_storage(tmp_path)
    s.put("m.json.tmp", b"x")
    s.rename("m.json.tmp", "m.json")
    assert os.listdir(tmp_path) == ["m.json"]


class _Flaky(Exception):
    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.response = {"Error": {"Code": "SlowDown" if status == 503 else "AccessDenied"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}


def test_retry_classifies_and_bounds():
    assert is_transient(_Flaky(503)) and is_transient(ConnectionResetError())
    assert not is_transient(_Flaky(403)) and not is_transient(PermissionError("denied"))
    assert not is_transient(FileNotFoundError("gone"))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _Flaky(503)
        return "ok"

    with knobs.override(retry_base_ms=0):
        assert call_with_retry("get s3://b/k", flaky, knobs.get()) == "ok" and len(calls) == 3
        calls.clear()
        with pytest.raises(OSError, match=r"put s3://b/k \(gave up after 2 attempts\)"):
            with knobs.override(retry_attempts=2):
                call_with_retry("put s3://b/k", lambda: (calls.append(1), (_ for _ in ()).throw(_Flaky(503))),
                                knobs.get())
        assert len(calls) == 2
        calls.clear()

        def denied():
            calls.append(1)
            raise PermissionError("Access Denied")

        with pytest.raises(PermissionError, match="put s3://b/manifest.json"):
            call_with_retry("put s3://b/manifest.json", denied, knobs.get())
        assert len(calls) == 1  # permanent: never retried


def test_capabilities_default_is_nothing():
    assert Capabilities() == Capabilities(False, False, False, False, False)
