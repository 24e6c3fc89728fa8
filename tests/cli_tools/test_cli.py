"""``python -m shardckpt``, run as a user runs it: a subprocess per command, judged by
its exit code, its ``--json`` document and what it did (or did not do) on disk.

Each subprocess imports torch (~1.5-3 s), so every call checks as much as it can:
one ``verify`` call covers a good, a damaged, an incomplete, a missing and a
hostile checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import socket
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli import parse_storage_options
from shardckpt.manager import (
    OWNER_MARKER,
    CheckpointManager,
    step_dirname,
)
from tests.helpers import REPO_ROOT, gate_writes
from tests.multiproc import run_multiprocess


def cli(*args: str, env: dict[str, str] | None = None, stderr_tty: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m shardckpt ARGS``; with ``stderr_tty`` stderr is a 100-column pty."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    cmd = [sys.executable, "-m", "shardckpt", *map(str, args)]
    if not stderr_tty:
        return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=120)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, text=True, env=full_env, timeout=120)
    finally:
        os.close(slave)
    reader.join(10)
    os.close(master)
    r.stderr = b"".join(chunks).decode(errors="replace")
    return r


def doc(r: subprocess.CompletedProcess) -> dict:
    """stdout as exactly one JSON document (json.loads fails on anything else)."""
    return json.loads(r.stdout)


def flip(path: Path, offset: int) -> None:
    """Flip one bit at ``offset`` of the (only) shard file under ``path``."""
    (shard,) = (path / "data").glob("*.bin")
    with open(shard, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 16, generator=g), "b": torch.randn(16, generator=g).bfloat16(),
                  "layers": [{"idx": torch.arange(40)}]},
        "mask": torch.rand(33, generator=g) > 0.5,
        "step": 5,
        "blob": b"\x00\x01raw",
    }


class Tiny:
    def __init__(self) -> None:
        self.w = torch.zeros(128)

    def state_dict(self) -> dict:
        return {"w": self.w}

    def load_state_dict(self, sd: dict) -> None:
        self.w = sd["w"]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# ------------------------------------------------------------------------------ ls


def test_ls_lists_every_status_and_named_checkpoints(tmp_path):
    root = tmp_path / "run"
    with shardckpt.knobs.override(chunk_bytes=128), CheckpointManager(root) as mgr:
        for step in (1, 2, 3, 4):
            t = Tiny()
            t.w += step
            mgr.save(step, t, metrics={"val_loss": 1.0 / step})
    flip(root / step_dirname(2), 300)  # cheap scan: still valid; --verify: corrupt
    (shard,) = (root / step_dirname(3) / "data").glob("*.bin")
    os.truncate(shard, 100)  # corrupt even for the cheap scan (size differs)
    (root / step_dirname(4) / "manifest.json").unlink()  # incomplete
    shardckpt.save(state(), root / "best", metadata={"step": 7})  # not named step_N: listed
    (root / "notes").mkdir()  # no manifest: not a checkpoint
    (root / "notes" / "todo.txt").write_text("x")

    r = cli("ls", root, "--json")
    assert r.returncode == 0, r.stderr
    listed = doc(r)["checkpoints"]
    assert [(c["name"], c["step"], c["status"]) for c in listed] == [
        (step_dirname(1), 1, "valid"), (step_dirname(2), 2, "valid"), (step_dirname(3), 3, "corrupt"),
        (step_dirname(4), 4, "incomplete"), ("best", 7, "valid")]
    first = listed[0]
    assert first["metrics"] == {"val_loss": 1.0} and first["size_bytes"] > 0 and first["world_size"] == 1
    assert 0 <= first["age_seconds"] < 600 and "manifest" in listed[3]["reason"]
    assert r.stderr == ""  # a cheap listing shows no progress

    r = cli("ls", root, "--verify", "--json")
    assert r.returncode == 0
    assert [c["status"] for c in doc(r)["checkpoints"]] == ["valid", "corrupt", "corrupt", "incomplete", "valid"]
    assert "CRC32C" in doc(r)["checkpoints"][1]["reason"]
    assert "ls: [5/5] best" in r.stderr  # not a TTY: plain progress lines on stderr

    r = cli("ls", root)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].split() == ["STEP", "STATUS", "SIZE", "SAVED", "AGE", "METRICS", "NAME"]
    assert lines[4].split()[:2] == ["4", "incomplete"] and lines[5].split()[-1] == "best"
    assert "val_loss=0.5" in lines[2]


def test_ls_while_an_async_save_is_in_flight(tmp_path, monkeypatch):
    root = tmp_path / "run"
    shardckpt.save(state(), root / step_dirname(1))
    gate = gate_writes(monkeypatch, wait_s=60)
    handle = shardckpt.async_save(state(1), root / step_dirname(2))
    try:
        assert not handle.done()
        before = tree(root)
        r = cli("ls", root, "--json")
        assert r.returncode == 0, r.stderr
        assert [(c["step"], c["status"]) for c in doc(r)["checkpoints"]] == [(1, "valid"), (2, "incomplete")]
        assert tree(root) == before  # read-only: no lock, no marker, nothing touched
        assert not handle.done()  # (still in flight when ls looked)
    finally:
        gate.set()
        handle.result(timeout=60)
        shardckpt.close()
    shardckpt.verify(root / step_dirname(2))  # the listing did not disturb the save


# ------------------------------------------------------------------------- inspect


def test_inspect_json_keys_and_table(tmp_path):
    path = tmp_path / "c"
    sd = state()
    sd["zeros"] = torch.zeros(4096)  # compresses: a "bgz" codec to show
    with shardckpt.knobs.override(chunk_bytes=4096):
        shardckpt.save(sd, path, compression="zstd", metadata={"step": 5, "note": "warmup"})

    r = cli("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    d = doc(r)
    assert set(d["keys"]) == {"model.w", "model.b", "model.layers.0.idx", "mask", "step", "blob", "zeros"}
    w, z = d["keys"]["model.w"], d["keys"]["zeros"]
    assert (w["kind"], w["dtype"], w["shape"], w["shards"], w["raw_bytes"]) == ("tensor", "float32", [64, 16], 1, 4096)
    assert z["codecs"] == ["bgz"] and z["stored_bytes"] < z["raw_bytes"] / 10
    assert d["keys"]["model.b"]["dtype"] == "bfloat16" and d["keys"]["mask"]["dtype"] == "bool"
    assert d["keys"]["step"] == {**d["keys"]["step"], "kind": "object", "encoding": "json", "value": 5}
    assert d["keys"]["blob"]["encoding"] == "bytes" and d["keys"]["blob"]["raw_bytes"] == 5
    assert d["world_size"] == 1 and d["metadata"] == {"step": 5, "note": "warmup"}
    assert d["library"]["torch"] == torch.__version__ and d["library"]["shardckpt"] == shardckpt.__version__
    assert d["totals"]["keys"] == 7 and d["totals"]["file_bytes"] == sum(d["files"].values())

    r = cli("inspect", path, "--keys", "model.*", "--keys", "step")
    assert r.returncode == 0, r.stderr
    assert "world size  1" in r.stdout and '"note": "warmup"' in r.stdout and "7 (6 tensors, 2 objects)" not in r.stdout
    table = r.stdout.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["KEY", "DTYPE", "SHAPE", "RAW", "STORED", "CODEC", "SHARDS"]
    assert [row.split()[0] for row in table[1:]] == ["model.b", "model.layers.0.idx", "model.w", "step"]
    assert table[3].split()[1:4] == ["float32", "[64,", "16]"] and table[4].split()[1:3] == ["object", "5"]
    assert "keys        7 (5 tensors, 2 objects)" in r.stdout  # totals stay the whole checkpoint's


# -------------------------------------------------------------------------- verify


def test_verify_names_every_damaged_place_and_keeps_going(tmp_path):
    good, bad, incomplete, hostile = (tmp_path / n for n in ("good", "bad", "incomplete", "hostile"))
    with shardckpt.knobs.override(chunk_bytes=256):
        for p in (good, bad, incomplete, hostile):
            shardckpt.save(state(), p)
    flip(bad, 10)  # two chunks of model.w (stored first), 1 KiB apart
    flip(bad, 1034)
    (incomplete / "manifest.json").unlink()
    m = hostile / "manifest.json"
    m.write_text(m.read_text().replace('"world_size":1', '"world_size":9'))

    r = cli("verify", good, bad, incomplete, tmp_path / "missing", hostile, "--json")
    assert r.returncode == 1
    d = doc(r)
    assert d["ok"] is False
    assert [c["status"] for c in d["checkpoints"]] == ["valid", "corrupt", "incomplete", "not_found", "corrupt"]
    ok = d["checkpoints"][0]
    assert ok["bytes_checked"] > 0 and ok["chunks"] > 2 and ok["damaged"] == []
    places = [(p["key"], p["chunk"]) for p in d["checkpoints"][1]["damaged"]]
    assert places == [("model.w", 0), ("model.w", 4)]
    assert all(p["file"].startswith("data/") and "CRC32C" in p["message"] for p in d["checkpoints"][1]["damaged"])
    assert d["checkpoints"][4]["damaged"][0]["file"].endswith("manifest.json")
    assert "2 of 5" not in r.stderr and "3 of 5" not in r.stderr and "4 of 5" in r.stderr

    # A terminal gets a tqdm bar on stderr; stdout stays the human report.
    r = cli("verify", good, good, stderr_tty=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("valid") == 2 and "100%" in r.stderr and "2/2" in r.stderr


def test_problems_exit_1_with_a_message_and_a_json_error(tmp_path):
    path = tmp_path / "c"
    shardckpt.save(state(), path)
    (path / "manifest.json").unlink()
    r = cli("inspect", path, "--json")
    assert r.returncode == 1
    err = doc(r)["error"]
    assert err["type"] == "IncompleteCheckpointError" and err["path"] == str(path)
    assert f"shardckpt inspect: error: {path} is not a loadable checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- diff


def test_diff_equal_changed_and_values(tmp_path):
    a, same, zstd, other = (tmp_path / n for n in ("a", "same", "zstd", "other"))
    shardckpt.save(state(), a)
    shardckpt.save(state(), same)  # another save id, the same layout: decided by CRC
    shardckpt.save({**state(), "zeros": torch.zeros(512)}, zstd, compression="zstd")
    sd = state()
    sd["model"]["w"][3, 4] += 0.5
    sd["model"]["b"] = sd["model"]["b"].float()  # dtype change
    sd["mask"][0] = not sd["mask"][0]
    del sd["blob"]
    sd["extra"] = torch.ones(2)
    sd["step"] = 6
    shardckpt.save(sd, other)

    r = cli("diff", a, same, "--json", "--exit-code")
    assert r.returncode == 0, r.stderr
    d = doc(r)
    assert d["identical"] and d["compared"] == {"by_crc": 4, "by_reading": 0} and len(d["unchanged"]) == 6

    r = cli("diff", a, other, "--values", "--json", "--exit-code")
    assert r.returncode == 1  # --exit-code: they differ
    d = doc(r)
    assert not d["identical"] and d["only_in_a"] == ["blob"] and d["only_in_b"] == ["extra"]
    assert d["type_changed"] == {"model.b": {"a": "bfloat16[16]", "b": "float32[16]"}}
    assert sorted(d["content_changed"]) == ["mask", "model.w", "step"]
    assert d["values"]["model.w"] == {"max_abs_diff": 0.5, "differing": 1, "elements": 1024}
    assert d["values"]["mask"]["differing"] == 1 and d["values"]["model.layers.0.idx"]["max_abs_diff"] == 0
    assert d["unchanged"] == ["model.layers.0.idx"]

    # Other codecs for the same values: layouts differ, so the data is read and compared.
    r = cli("diff", a, zstd)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "only in B        zeros" in lines and lines[-1] == "different"
    assert not any(ln.startswith("content changed") for ln in lines)
    # (chunks under 64 bytes stay raw whatever the codec: those still compare by CRC)
    assert any(ln.startswith("unchanged") and "2 by chunk CRC32C, 2 by reading" in ln for ln in lines)


def _save_sharded(rank: int, world_size: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = _full_values()
    sd = {"rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
          "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
          "plain": full["plain"], "step": 3}
    with shardckpt.knobs.override(chunk_bytes=512):
        shardckpt.save(sd, path)


def _full_values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return {"rows": torch.randn(37, 9, generator=g), "cols": torch.randn(5, 21, generator=g).bfloat16(),
            "plain": torch.arange(100)}


def test_diff_of_a_resharded_save_reports_no_content_change(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    run_multiprocess(_save_sharded, 2, str(two), timeout=120)
    with shardckpt.knobs.override(chunk_bytes=512):
        shardckpt.save({**_full_values(), "step": 3}, one)
    r = cli("diff", two, one, "--json", "--exit-code")
    assert r.returncode == 0, r.stdout + r.stderr
    d = doc(r)
    assert d["identical"] and d["a"]["world_size"] == 2 and d["b"]["world_size"] == 1
    assert d["compared"] == {"by_crc": 1, "by_reading": 2}  # "plain" has one slice either way


# ------------------------------------------------------------------------------ gc


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("step_*"))


def test_gc_refuses_a_live_owner_dry_runs_forces_and_collects(tmp_path):
    root = tmp_path / "run"
    losses = {1: 0.1, 2: 0.9, 3: 0.8, 4: 0.3, 5: 0.7, 6: 0.5, 7: 0.6}
    mgr = CheckpointManager(root)
    try:
        for step in range(1, 7):
            mgr.save(step, Tiny(), metrics={"val_loss": losses[step]})
        (root / step_dirname(6) / "manifest.json").unlink()  # an incomplete leftover
        marker = (root / OWNER_MARKER).read_bytes()

        r = cli("gc", root, "--keep-last", "2", "--json")
        assert r.returncode == 1
        assert doc(r)["error"]["type"] == "CheckpointExistsError"
        assert f"pid {os.getpid()}" in r.stderr and socket.gethostname() in r.stderr
        assert _steps(root) == [1, 2, 3, 4, 5, 6]

        r = cli("gc", root, "--keep-last", "2", "--keep-best", "val_loss:min", "--dry-run", "--json")
        assert r.returncode == 0, r.stderr
        d = doc(r)
        assert [c["step"] for c in d["delete"]] == [2, 3] and d["owner"]["live"] and d["dry_run"]
        why = {c["step"]: c["why"] for c in d["keep"]}
        assert why[1] == ["keep-best val_loss:min:1"] and "newest valid" in why[5] and "incomplete" in why[6][0]
        assert _steps(root) == [1, 2, 3, 4, 5, 6] and (root / OWNER_MARKER).read_bytes() == marker

        r = cli("gc", root, "--keep-last", "2", "--force", "--json")
        assert r.returncode == 0, r.stderr
        assert [c["step"] for c in doc(r)["delete"]] == [1, 2, 3] and doc(r)["forced"]
        assert "--force" in r.stderr and _steps(root) == [4, 5, 6]
        assert (root / OWNER_MARKER).read_bytes() == marker  # the manager still owns its root...
        mgr.save(7, Tiny(), metrics={"val_loss": losses[7]})  # ...and keeps saving (its retention
    finally:                                                  # removes the incomplete step 6)
        mgr.close()
    (root / step_dirname(6) / "data").mkdir(parents=True)  # a crashed save's leftover

    # Retention that keeps only the best (step 4) still keeps the newest valid (7).
    r = cli("gc", root, "--keep-best", "val_loss:min:1", "--incomplete", "--json")
    assert r.returncode == 0, r.stderr
    d = doc(r)
    assert [(c["step"], c["status"]) for c in d["delete"]] == [(5, "valid"), (6, "incomplete")]
    assert _steps(root) == [4, 7] and not (root / OWNER_MARKER).exists()  # marker taken, then released
    assert d["freed_bytes"] == d["delete"][0]["size_bytes"]
    with CheckpointManager(root) as mgr:
        assert mgr.restore(Tiny()) == 7


# --------------------------------------------------------------------------- usage


@pytest.mark.parametrize("args", [
    ["gc", "ROOT"],  # no policy and no --incomplete: nothing to do
    ["gc", "ROOT", "--keep-best", "loss:median"],
    ["ls", "ROOT", "--storage-option", "novalue"],
    ["convert", "SRC", "DST", "--max-shard-size", "12XB"],  # shardckpt.convert's own size parser
    ["convert", "SRC", "DST", "--to", "onnx"],
])
def test_usage_errors_exit_2(args):
    r = cli(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert "usage:" in r.stderr


def test_option_parsers():
    pairs = [(["anon"], True), (["client_kwargs", "endpoint_url"], "http://h:9000"),
             (["client_kwargs", "region_name"], "eu-1"), (["config_kwargs", "retries"], {"max_attempts": 2})]
    assert parse_storage_options(pairs) == {
        "anon": True, "client_kwargs": {"endpoint_url": "http://h:9000", "region_name": "eu-1"},
        "config_kwargs": {"retries": {"max_attempts": 2}}}
    with pytest.raises(ValueError, match="already a value"):
        parse_storage_options([(["a"], 1), (["a", "b"], 2)])
    with pytest.raises(ValueError, match="twice"):
        parse_storage_options([(["a"], 1), (["a"], 2)])


# ------------------------------------------------------------------------- convert


def test_convert_is_shardckpt_convert_with_a_json_report(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    shardckpt.save(state(), src)
    r = cli("convert", src, dst, "--only", "model", "--dtype", "bf16", "--json")
    assert r.returncode == 0, r.stderr
    d = doc(r)
    assert (d["src_format"], d["dst_format"]) == ("shardckpt", "shardckpt")
    assert sorted(d["keys"]) == ["b", "layers.0.idx", "w"] and d["bytes_written"] > 0
    assert isinstance(d["dropped"], list) and d["seconds"] >= 0
    out = {"w": torch.zeros(64, 16, dtype=torch.bfloat16), "b": torch.zeros(16, dtype=torch.bfloat16),
           "layers": [{"idx": torch.zeros(40, dtype=torch.int64)}]}
    shardckpt.load(out, dst)
    want = state()["model"]
    assert torch.equal(out["w"], want["w"].bfloat16()) and torch.equal(out["layers"][0]["idx"], want["layers"][0]["idx"])


# ------------------------------------------------------------------------------ S3


@pytest.mark.s3
def test_s3_root_with_nested_storage_options(s3_bucket):
    opts = s3_bucket.storage_options
    shardckpt.save(state(), s3_bucket.url("run/step_0000000001"), storage_options=opts)
    r = cli("ls", s3_bucket.url("run"), "--verify", "--json",
            "-o", f"key={opts['key']}", "-o", f"secret={opts['secret']}",
            "-o", f"client_kwargs.endpoint_url={opts['client_kwargs']['endpoint_url']}",
            "-o", f"client_kwargs.region_name={opts['client_kwargs']['region_name']}",
            env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": ""})
    assert r.returncode == 0, r.stderr
    assert [(c["step"], c["status"]) for c in doc(r)["checkpoints"]] == [(1, "valid")]
