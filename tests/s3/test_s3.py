"""S3 end to end, against a real S3 HTTP endpoint (moto on loopback), with faults
injected by a proxy at the HTTP layer. Nothing here mocks an S3 client."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import shardckpt
from shardckpt import knobs
from tests.helpers import REPO_ROOT, assert_state_equal, blank_like
from tests.multiproc import run_multiprocess
from tests.s3util import list_multipart_uploads, list_objects

pytestmark = pytest.mark.s3


def _state(seed: int = 0, n: int = 50_000) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.randint(0, 1000, (333,), generator=g),
            "step": seed, "cfg": {"lr": 0.1}}


def _zeros_like(sd: dict) -> dict:
    return blank_like(sd, {"step": -1, "lr": 0.0})


def _keys(endpoint, bucket: str, prefix: str = "") -> list[str]:
    return sorted(o["Key"] for o in list_objects(endpoint, bucket, prefix))


def test_round_trip_with_storage_options(s3_bucket):
    sd, url, opts = _state(), s3_bucket.url("run/step_1"), s3_bucket.storage_options
    shardckpt.save(sd, url, storage_options=opts)
    keys = _keys(s3_bucket.endpoint, s3_bucket.name, "run/step_1/")
    assert "run/step_1/manifest.json" in keys and any(k.startswith("run/step_1/data/") for k in keys)
    assert not any(k.endswith(".probe") for k in keys)
    out = _zeros_like(sd)
    shardckpt.load(out, url, storage_options=opts)
    assert_state_equal(out, sd)
    report = shardckpt.verify(url, storage_options=opts)
    assert report.chunks >= 1 and report.bytes_checked > 0
    # compression="auto" chooses zstd on a remote backend
    assert any(c.codec != "raw" for e in report.manifest.entries.values()
               if hasattr(e, "shards") for s in e.shards for c in s.blob.chunks)


def test_round_trip_with_environment_credentials(s3_bucket, monkeypatch):
    for k, v in s3_bucket.endpoint.env().items():
        monkeypatch.setenv(k, v)
    sd, url = _state(1), s3_bucket.url("envrun")
    shardckpt.save(sd, url)
    out = _zeros_like(sd)
    shardckpt.load(out, url)
    assert_state_equal(out, sd)


def test_large_shard_goes_up_in_parallel_parts(s3_bucket, fault_proxy):
    sd = {"big": torch.randn(4 << 20)}  # 16 MiB raw
    url = s3_bucket.url("mpu")
    with knobs.override(part_bytes=5 << 20, upload_concurrency=3, read_part_bytes=2 << 20):
        shardckpt.save(sd, url, compression=None, storage_options=fault_proxy.storage_options())
        parts = [r for r in fault_proxy.log if r.method == "PUT" and r.path.endswith("-r00000.bin")]
        assert len(parts) == 4  # 16 MiB in 5 MiB parts (the log has no query strings)
        out = {"big": torch.zeros(4 << 20)}
        shardckpt.load(out, url, storage_options=fault_proxy.storage_options())
    assert torch.equal(out["big"], sd["big"])
    gets = [r for r in fault_proxy.log if r.method == "GET" and "/data/" in r.path]
    assert len(gets) == 1  # the whole object is one GET (partial reads: test_storage)
    assert list_multipart_uploads(s3_bucket.endpoint, s3_bucket.name) == []


def test_a_rank_writes_several_objects_cut_at_tensor_boundaries(s3_bucket):
    sd = {f"t{i}": torch.randn(1 << 19) for i in range(5)}  # 5 x 2 MiB
    url, opts = s3_bucket.url("roll"), s3_bucket.storage_options
    with knobs.override(object_bytes=5 << 20):
        shardckpt.save(sd, url, compression=None, storage_options=opts)
    objects = [k for k in _keys(s3_bucket.endpoint, s3_bucket.name, "roll/data/")]
    assert len(objects) == 3  # 2 tensors, 2 tensors, 1 tensor: never split across objects
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    shardckpt.load(out, url, storage_options=opts)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    shardckpt.verify(url, storage_options=opts)


@pytest.mark.parametrize("kind,n", [("503", 4), ("reset", 5), ("500", 3)])
def test_transient_faults_are_retried(s3_bucket, fault_proxy, kind, n):
    fault_proxy.every_nth(n, kind)
    opts, url, sd = fault_proxy.storage_options(), s3_bucket.url("flaky"), _state(2)
    with knobs.override(retry_base_ms=1, part_bytes=5 << 20):
        shardckpt.save(sd, url, storage_options=opts)
        out = _zeros_like(sd)
        shardckpt.load(out, url, storage_options=opts)
        shardckpt.verify(url, storage_options=opts)
    assert fault_proxy.faults >= 3
    assert_state_equal(out, sd)


def test_permanent_denial_is_typed_and_keeps_the_earlier_checkpoint(s3_bucket, fault_proxy):
    opts = fault_proxy.storage_options()
    root = s3_bucket.url("deny")
    shardckpt.save(_state(0), f"{root}/a", storage_options=opts)
    fault_proxy.deny(r"/deny/b/manifest\.json$", method="PUT")
    with pytest.raises(shardckpt.CheckpointWriteError, match=r"s3://.*/deny/b/manifest\.json") as e:
        shardckpt.save(_state(1), f"{root}/b", storage_options=opts)
    assert "PermissionError" in str(e.value) or "denied" in str(e.value).lower()
    # nothing under b/ is left: the failed save removed its objects
    assert not [k for k in _keys(s3_bucket.endpoint, s3_bucket.name) if "deny/b/" in k]
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.load(_zeros_like(_state()), f"{root}/b", storage_options=opts)
    out = _zeros_like(_state())
    shardckpt.load(out, f"{root}/a", storage_options=opts)
    assert_state_equal(out, _state(0))


def test_denied_read_is_a_typed_read_error_naming_the_object(s3_bucket, fault_proxy):
    opts, url = fault_proxy.storage_options(), s3_bucket.url("rd")
    shardckpt.save(_state(), url, storage_options=opts)
    fault_proxy.deny(r"/rd/data/", method="GET")
    with pytest.raises(shardckpt.CheckpointReadError, match=r"s3://.*/rd/data/"):
        shardckpt.load(_zeros_like(_state()), url, storage_options=opts)


def test_missing_bucket_is_a_typed_error(s3_bucket):
    with pytest.raises(shardckpt.CheckpointWriteError, match="no-such-bucket"):
        shardckpt.save(_state(), "s3://no-such-bucket-xyz/p", storage_options=s3_bucket.storage_options)


def test_bit_flip_in_an_object_is_corrupt(s3_bucket):
    opts, url = s3_bucket.storage_options, s3_bucket.url("flip")
    shardckpt.save(_state(), url, storage_options=opts, compression=None)
    client = s3_bucket.endpoint.client()
    key = next(k for k in _keys(s3_bucket.endpoint, s3_bucket.name, "flip/data/"))
    body = bytearray(client.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read())
    body[1000] ^= 0x10
    client.put_object(Bucket=s3_bucket.name, Key=key, Body=bytes(body))
    with pytest.raises(shardckpt.CorruptCheckpointError, match="CRC32C") as e:
        shardckpt.load(_zeros_like(_state()), url, storage_options=opts)
    assert e.value.key == "w" and e.value.chunk == 0
    with pytest.raises(shardckpt.CorruptCheckpointError):
        shardckpt.verify(url, storage_options=opts)


def test_deleted_manifest_is_incomplete_then_resave_works(s3_bucket):
    opts, url = s3_bucket.storage_options, s3_bucket.url("nomf")
    shardckpt.save(_state(), url, storage_options=opts)
    s3_bucket.endpoint.client().delete_object(Bucket=s3_bucket.name, Key="nomf/manifest.json")
    with pytest.raises(shardckpt.IncompleteCheckpointError):
        shardckpt.load(_zeros_like(_state()), url, storage_options=opts)
    shardckpt.save(_state(3), url, storage_options=opts)  # the incomplete leftover is cleared
    data = _keys(s3_bucket.endpoint, s3_bucket.name, "nomf/data/")
    assert len(data) == 1  # only the new save's shard
    out = _zeros_like(_state())
    shardckpt.load(out, url, storage_options=opts)
    assert_state_equal(out, _state(3))


def test_committed_path_fails_closed_and_overwrite_swaps_atomically(s3_bucket):
    opts, url = s3_bucket.storage_options, s3_bucket.url("ow")
    shardckpt.save(_state(0), url, storage_options=opts)
    old = _keys(s3_bucket.endpoint, s3_bucket.name, "ow/data/")
    with pytest.raises(shardckpt.CheckpointExistsError):
        shardckpt.save(_state(1), url, storage_options=opts)
    shardckpt.save(_state(1), url, storage_options=opts, overwrite=True)
    new = _keys(s3_bucket.endpoint, s3_bucket.name, "ow/data/")
    assert set(old).isdisjoint(new) and len(new) == 1  # new save id, old shards deleted after
    out = _zeros_like(_state())
    shardckpt.load(out, url, storage_options=opts)
    assert_state_equal(out, _state(1))


_KILLED_SAVER = textwrap.dedent("""
    import sys, torch, shardckpt
    from shardckpt import knobs
    url, opts = sys.argv[1], eval(sys.argv[2])
    with knobs.override(part_bytes=5 << 20, upload_concurrency=1):
        shardckpt.save({"big": torch.randn(24 << 20)}, url, compression=None, storage_options=opts)
    print("finished", flush=True)
""")


def test_kill_mid_upload_leaves_incomplete_and_next_save_cleans(s3_bucket, tmp_path):
    opts, root = s3_bucket.storage_options, s3_bucket.url("kill")
    shardckpt.save(_state(0), f"{root}/good", storage_options=opts)
    script = tmp_path / "saver.py"
    script.write_text(_KILLED_SAVER)
    proc = subprocess.Popen([sys.executable, str(script), f"{root}/torn", repr(opts)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list_multipart_uploads(s3_bucket.endpoint, s3_bucket.name, "kill/torn/"):
            assert proc.poll() is None, "the saver finished before it could be killed"
            assert time.monotonic() < deadline, "no multipart upload started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert list_multipart_uploads(s3_bucket.endpoint, s3_bucket.name, "kill/torn/")  # orphaned parts
    with pytest.raises(shardckpt.IncompleteCheckpointError):
        shardckpt.load({"big": torch.zeros(1)}, f"{root}/torn", storage_options=opts)
    out = _zeros_like(_state())
    shardckpt.load(out, f"{root}/good", storage_options=opts)
    assert_state_equal(out, _state(0))
    shardckpt.save(_state(5), f"{root}/torn", storage_options=opts)  # cleans the leftovers
    assert list_multipart_uploads(s3_bucket.endpoint, s3_bucket.name, "kill/torn/") == []
    out = _zeros_like(_state())
    shardckpt.load(out, f"{root}/torn", storage_options=opts)
    assert_state_equal(out, _state(5))


def _save_2(rank, world, url, opts):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(1000 * 7, dtype=torch.float32).reshape(1000, 7)
    with knobs.override(chunk_bytes=4096):
        shardckpt.save({"t": distribute_tensor(full, mesh, [Shard(0)]), "r": torch.arange(10)}, url,
                       storage_options=opts)


def _load_3(rank, world, url, opts):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(1000 * 7, dtype=torch.float32).reshape(1000, 7)
    sd = {"t": distribute_tensor(torch.zeros(1000, 7), mesh, [Shard(0)]), "r": torch.zeros(10, dtype=torch.int64)}
    shardckpt.load(sd, url, storage_options=opts)
    expected = distribute_tensor(full, mesh, [Shard(0)])
    assert torch.equal(sd["t"].to_local(), expected.to_local()) and torch.equal(sd["r"], torch.arange(10))


def test_two_ranks_save_three_ranks_load(s3_bucket):
    url, opts = s3_bucket.url("reshard"), s3_bucket.storage_options
    run_multiprocess(_save_2, 2, url, opts)
    keys = _keys(s3_bucket.endpoint, s3_bucket.name, "reshard/data/")
    # one shard object and one index (where its slices of "t" are) per rank
    assert len([k for k in keys if k.endswith(".bin")]) == 2 and len([k for k in keys if k.endswith(".idx")]) == 2
    run_multiprocess(_load_3, 3, url, opts)


def test_manager_on_s3_keeps_last_and_falls_back_past_corrupt(s3_bucket):
    opts, root = s3_bucket.storage_options, s3_bucket.url("mgr")
    with shardckpt.CheckpointManager(root, keep_last=2, async_save=True, storage_options=opts) as mgr:
        for step in range(4):
            mgr.save(step, _state(step), force=True)
        mgr.wait()
        assert [c.step for c in mgr.list()] == [2, 3] and all(c.valid for c in mgr.list())
        # a second manager on the same root is refused (conditional create of the marker)
        with pytest.raises(shardckpt.CheckpointExistsError, match="in use"):
            shardckpt.CheckpointManager(root, storage_options=opts)
    client = s3_bucket.endpoint.client()
    key = next(k for k in _keys(s3_bucket.endpoint, s3_bucket.name, "mgr/step_0000000003/data/"))
    body = bytearray(client.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read())
    body[len(body) // 2] ^= 1
    client.put_object(Bucket=s3_bucket.name, Key=key, Body=bytes(body))
    with shardckpt.CheckpointManager(root, keep_last=2, storage_options=opts) as mgr:

        class Holder:
            def __init__(self):
                self.sd = _zeros_like(_state())

            def state_dict(self):
                return self.sd

            def load_state_dict(self, sd):
                self.sd = sd

        h = Holder()
        assert mgr.restore(h) == 2
    assert_state_equal(h.sd, _state(2))
    assert "mgr/.shardckpt-owner" not in _keys(s3_bucket.endpoint, s3_bucket.name)


def test_an_object_of_exactly_one_part_is_a_single_put(s3_bucket, fault_proxy):
    from shardckpt.backends import open_storage

    s = open_storage(s3_bucket.url("onepart"), storage_options=fault_proxy.storage_options())
    with knobs.override(part_bytes=5 << 20):
        w = s.open_writer("data/x.bin")
        w.write(b"\7" * (5 << 20))
        w.close()
    data_requests = [(r.method, r.status) for r in fault_proxy.log if r.path.endswith("/onepart/data/x.bin")]
    assert data_requests == [("PUT", 200)]  # no CreateMultipartUpload / Complete (POSTs)
    assert s.size("data/x.bin") == 5 << 20
