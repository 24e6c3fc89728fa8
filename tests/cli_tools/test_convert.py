"""shardckpt.convert: exports to safetensors / HF / torch.save / DCP, imports from
them, key selection and casts, hostile and damaged inputs, and bounded memory.

Real files throughout, written by the real libraries (safetensors, torch.save,
DCP's FileSystemWriter at 2 gloo ranks) and read back by them. The 2-rank save
and the 3-rank loads are launched once per session and shared by the xdist
workers (a file lock per launch, as in test_reshard).
"""

from __future__ import annotations

import argparse
import builtins
import fcntl
import json
import os
import pickle
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from tests.helpers import det_tensor
from tests.multiproc import run_multiprocess

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# key -> (global shape, dtype, placement when saved at 2 ranks / loaded at 3)
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {
    "model.embed.weight": ((37, 16), torch.float32, "s0"),  # uneven row blocks: streamed as a concatenation
    "model.proj.weight": ((12, 10), torch.float32, "s1"),  # column blocks: assembled per tensor
    "model.norm.weight": ((16,), torch.bfloat16, "r"),
    "model.head.bias": ((5,), torch.float32, "plain"),
    "model.table": ((9, 4), torch.int64, "s0"),
    "optim.state.0.exp_avg": ((37, 16), torch.float32, "s0"),
    "scalar": ((), torch.float32, "plain"),
    "empty": ((0, 3), torch.float32, "plain"),
}
OBJECTS = {"step": 7, "meta": {"name": "run-α", "lr": 0.1}, "raw": b"\x00\xff", "tup": (1, "a")}
# DCP and shardckpt flatten nested dicts: "meta" is stored as "meta.name" and "meta.lr"
FLAT_OBJECTS = {"step": 7, "meta.name": "run-α", "meta.lr": 0.1, "raw": b"\x00\xff", "tup": (1, "a")}
CHUNK = 192  # tiny chunks: every tensor spans several, reads cross chunk boundaries


def _full(key: str) -> torch.Tensor:
    shape, dtype, _ = TENSORS[key]
    return det_tensor(shape, dtype, sum(key.encode()) * 31 + len(key))


def _nest(flat: dict) -> dict:
    """``{"a.b": v}`` -> ``{"a": {"b": v}}`` at the first dot (the layout the tests save)."""
    out: dict = {}
    for key, v in flat.items():
        head, _, rest = key.partition(".")
        if key.startswith("optim."):
            out.setdefault("optim", {}).setdefault("state", {}).setdefault("0", {})[key.rsplit(".", 1)[1]] = v
        elif rest:
            out.setdefault(head, {})[rest] = v
        else:
            out[key] = v
    return out


def _tensor_state(fill, world: int | None = None) -> dict:
    """Nested state of every tensor; placed as DTensors when ``world`` is given."""
    flat = {}
    if world is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        place = {"s0": [Shard(0)], "s1": [Shard(1)], "r": [Replicate()]}
    for key, (_, _, kind) in TENSORS.items():
        t = fill(key)
        flat[key] = distribute_tensor(t, mesh, place[kind]) if world is not None and kind in place else t
    return _nest(flat)


def _full_state() -> dict:
    sd = _tensor_state(_full)
    sd.update({k: v for k, v in OBJECTS.items()})
    return sd


def _zeros(key: str) -> torch.Tensor:
    shape, dtype, _ = TENSORS[key]
    return torch.zeros(shape, dtype=dtype)


def _flat_tensors(sd: dict) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    out = {}
    for key in TENSORS:
        node = sd
        parts = ["optim", "state", "0", key.rsplit(".", 1)[1]] if key.startswith("optim.") else key.split(".", 1)
        for p in parts:
            node = node[p]
        out[key] = full(node)
    return out


def _problems(got: dict[str, torch.Tensor], keys=None) -> list[str]:
    out = []
    for key in keys or TENSORS:
        want, have = _full(key), got.get(key)
        if have is None:
            out.append(f"{key}: missing")
        elif have.dtype != want.dtype or have.shape != want.shape:
            out.append(f"{key}: {have.dtype} {list(have.shape)}, want {want.dtype} {list(want.shape)}")
        elif not torch.equal(have.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):  # bitwise
            out.append(f"{key}: values differ")
    return out


# ---------------------------------------------------------------- shared launches


def _save_worker(rank: int, world: int, ck: str, dcp_dir: str) -> None:
    import torch.distributed.checkpoint as dcp

    import shardckpt

    sd = _tensor_state(_full, world)
    sd.update(OBJECTS)
    with shardckpt.knobs.override(chunk_bytes=CHUNK):
        shardckpt.save(sd, ck)
    sd = _tensor_state(_full, world)
    sd.update(OBJECTS)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(dcp_dir))


def _load_worker(rank: int, world: int, paths: dict[str, list], out_dir: str) -> None:
    import shardckpt

    report = {}
    with shardckpt.knobs.override(max_read_bytes=256):
        for name, (path, with_objects) in sorted(paths.items()):
            sd = _tensor_state(_zeros, world)
            if with_objects:
                sd.update({"step": 0, "meta": {"name": "", "lr": 0.0}, "raw": None, "tup": None})
            try:
                shardckpt.load(sd, path)
            except shardckpt.ShardckptError as e:
                report[name] = [f"load raised {type(e).__name__}: {e}"]
                continue
            problems = _problems(_flat_tensors(sd))
            if with_objects:
                problems += [f"{k}: {sd[k]!r}" for k, v in OBJECTS.items() if type(sd[k]) is not type(v) or sd[k] != v]
            report[name] = problems
    with open(os.path.join(out_dir, f"load3-r{rank}.json"), "w") as f:
        json.dump(report, f)


def _once(root: Path, name: str, job) -> None:
    """Run ``job`` once per session (the other xdist worker waits for it); fail if it failed."""
    marker = root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not marker.exists():
                try:
                    job()
                    outcome = ""
                except Exception:  # noqa: BLE001 - reported by every test that needs it
                    outcome = traceback.format_exc()
                marker.write_text(outcome)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if marker.read_text():
        pytest.fail(f"shared step {name} failed:\n{marker.read_text()}")


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "convert_shared"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def saved2(shared) -> tuple[Path, Path]:
    """The test state saved at 2 ranks by shardckpt and by DCP's FileSystemWriter."""
    ck, dc = shared / "ck2", shared / "dcp2"
    _once(shared, "save2", lambda: run_multiprocess(_save_worker, 2, str(ck), str(dc), timeout=180))
    return ck, dc


def _sources(root: Path, dcp_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Write each importable source (real files by the real libraries); name -> (file, has objects)."""
    flat = {k: _full(k) for k in TENSORS}
    torch.save(_full_state(), root / "src.pth")
    save_file({k: v for k, v in flat.items()}, str(root / "src.safetensors"))
    hf = root / "hf"
    hf.mkdir(exist_ok=True)
    keys = list(flat)
    parts = [keys[:3], keys[3:6], keys[6:]]
    wm = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: flat[k] for k in part}, str(hf / name), metadata={"format": "pt"})
        wm.update((k, name) for k in part)
    total = sum(v.numel() * v.element_size() for v in flat.values())
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return {"pth": (root / "src.pth", True), "safetensors": (root / "src.safetensors", False),
            "hf": (hf, False), "dcp": (dcp_dir, True)}


_IMPORTS = {"pth": True, "safetensors": False, "hf": False, "dcp": True}  # name -> has non-tensor values


@pytest.fixture(scope="session")
def imported(shared, saved2) -> dict[str, tuple[Path, bool]]:
    """Every source converted to a shardckpt checkpoint: name -> (checkpoint, has objects)."""
    from shardckpt.converters import convert

    def job() -> None:
        for name, (src, _) in _sources(shared, saved2[1]).items():
            convert(src, shared / f"imported-{name}")

    _once(shared, "import", job)
    return {name: (shared / f"imported-{name}", objs) for name, objs in _IMPORTS.items()}


@pytest.fixture(scope="session")
def loaded3(shared, imported) -> Path:
    paths = {name: [str(p), objs] for name, (p, objs) in imported.items()}
    _once(shared, "load3", lambda: run_multiprocess(_load_worker, 3, paths, str(shared), timeout=180))
    return shared


# ---------------------------------------------------------------- exports


def test_export_one_safetensors_file(saved2, tmp_path):
    import shardckpt
    from shardckpt.converters import convert

    out = tmp_path / "model.safetensors"
    with shardckpt.knobs.override(max_read_bytes=256):  # many pieces per tensor
        report = convert(saved2[0], out)
    assert report.src_format == "shardckpt" and report.dst_format == "safetensors"
    got = load_file(str(out))
    assert not _problems(got), _problems(got)
    assert set(got) == set(TENSORS)
    assert report.files == (str(out),) and report.bytes_written == out.stat().st_size
    # the library's layout: 8-byte aligned header, tensors by element size then name
    n = struct.unpack("<Q", out.read_bytes()[:8])[0]
    assert n % 8 == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert {k: json.loads(v) for k, v in meta.items() if k != "format"} == {
        "step": 7, "meta.name": "run-α", "meta.lr": 0.1}
    assert {d.key for d in report.dropped} == {"raw", "tup"}  # no exact JSON form: listed, not lost
    assert all("JSON" in d.reason for d in report.dropped)


def test_safetensors_bytes_match_the_library(tmp_path):
    from shardckpt.converters import convert

    tensors = {"b": torch.arange(6, dtype=torch.bfloat16), "a": torch.randn(3, 5), "c": torch.arange(4),
               "z": torch.zeros(0), "s": torch.tensor(True), "h": torch.randn(7).half()}
    torch.save(tensors, tmp_path / "t.pt")
    convert(tmp_path / "t.pt", tmp_path / "ours.safetensors")
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    ours, lib = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "lib.safetensors").read_bytes()
    n1, n2 = struct.unpack("<Q", ours[:8])[0], struct.unpack("<Q", lib[:8])[0]
    assert json.loads(ours[8:8 + n1]) == json.loads(lib[8:8 + n2])  # same offsets, dtypes, shapes
    assert ours[8 + n1:] == lib[8 + n2:]  # same data bytes in the same order


def test_export_hf_sharded_directory(saved2, tmp_path):
    from shardckpt.converters import convert

    out = tmp_path / "hf"
    report = convert(saved2[0], out, max_shard_size="2KB")  # 2000 bytes: several files
    assert report.dst_format == "hf-safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert sorted(os.listdir(out)) == sorted(files + ["model.safetensors.index.json"])
    assert set(index["weight_map"]) == set(TENSORS)
    loaded: dict = {}
    for f in files:
        part = load_file(str(out / f))
        assert all(index["weight_map"][k] == f for k in part)
        size = sum(v.numel() * v.element_size() for v in part.values())
        assert size <= 2000 or len(part) == 1  # a tensor above the limit gets a file of its own
        loaded.update(part)
    assert not _problems(loaded)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in loaded.values())
    # and it comes back in through the HF importer, bitwise
    convert(out, tmp_path / "back")
    back = _load_plain(tmp_path / "back", with_objects=False)
    assert not _problems(back)


def test_hf_directory_that_fits_is_one_model_safetensors(saved2, tmp_path):
    from shardckpt.converters import convert

    convert(saved2[0], tmp_path / "hf", max_shard_size="5GB", only="model")
    assert os.listdir(tmp_path / "hf") == ["model.safetensors"]  # as save_pretrained writes it
    assert set(load_file(str(tmp_path / "hf" / "model.safetensors"))) == {
        k.split(".", 1)[1] for k in TENSORS if k.startswith("model.")}


def test_export_torch_save(saved2, tmp_path):
    from shardckpt.converters import convert

    report = convert(saved2[0], tmp_path / "out.pt")
    assert report.dst_format == "torch" and not report.dropped
    sd = torch.load(tmp_path / "out.pt", weights_only=True)
    assert not _problems(_flat_tensors(sd))
    assert sd["step"] == 7 and sd["meta"] == {"name": "run-α", "lr": 0.1}
    assert sd["raw"] == b"\x00\xff" and sd["tup"] == (1, "a")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_dcp(saved2, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from shardckpt.converters import convert

    convert(saved2[0], tmp_path / "dcp", to="dcp")
    sd = _tensor_state(_zeros)
    sd.update({"step": 0, "meta": {"name": "", "lr": 0.0}, "raw": None, "tup": None})
    dcp.load(sd, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert not _problems(_flat_tensors(sd))
    assert {k: sd[k] for k in OBJECTS} == OBJECTS
    dcp_to_torch_save(str(tmp_path / "dcp"), str(tmp_path / "via_dcp.pt"))  # DCP's own tool reads it
    assert not _problems(_flat_tensors(torch.load(tmp_path / "via_dcp.pt", weights_only=True)))


# ---------------------------------------------------------------- imports


def _load_plain(path, with_objects: bool) -> dict[str, torch.Tensor]:
    import shardckpt

    sd = _tensor_state(_zeros)
    if with_objects:
        sd.update({"step": 0, "meta": {"name": "", "lr": 0.0}, "raw": None, "tup": None})
    shardckpt.load(sd, path)
    if with_objects:
        assert {k: sd[k] for k in OBJECTS} == OBJECTS
    return _flat_tensors(sd)


@pytest.mark.parametrize("name", ["pth", "safetensors", "hf", "dcp"])
def test_import_loads_bitwise_at_one_rank(imported, name):
    import shardckpt

    path, objs = imported[name]
    shardckpt.verify(path)
    assert not _problems(_load_plain(path, objs))


@pytest.mark.parametrize("name", ["pth", "safetensors", "hf", "dcp"])
def test_import_loads_bitwise_at_three_ranks(loaded3, name):
    problems = []
    for rank in range(3):
        report = json.loads((loaded3 / f"load3-r{rank}.json").read_text())
        problems += [f"rank {rank}: {p}" for p in report[name]]
    assert not problems, "\n".join(problems)


def test_import_records_source_metadata(imported):
    import shardckpt

    m = shardckpt.verify(imported["hf"][0]).manifest
    assert m.metadata["converted_from"]["format"] == "hf-safetensors"
    assert m.metadata["safetensors_metadata"] == {"format": "pt"}
    assert m.metadata["hf_index_metadata"]["total_size"] > 0


# ---------------------------------------------------------------- selection and casts


def test_only_turns_a_train_state_checkpoint_into_parameter_names(tmp_path):
    import shardckpt
    from shardckpt.converters import convert

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    shardckpt.save({"state": shardckpt.TrainState(model=model, optimizer=opt)}, tmp_path / "ck")
    report = convert(tmp_path / "ck", tmp_path / "m.safetensors", only="state.model")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))  # strict: exactly the parameter names
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert set(report.keys) == set(model.state_dict())
    with pytest.raises(ValueError, match="no key starts with 'state.nope.'"):
        convert(tmp_path / "ck", tmp_path / "x.safetensors", only="state.nope")


def test_only_strips_the_prefix_in_every_target(saved2, tmp_path):
    from shardckpt.converters import convert

    convert(saved2[0], tmp_path / "m.pt", only="model")
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(sd) == {"embed.weight", "proj.weight", "norm.weight", "head.bias", "table"}
    assert torch.equal(sd["proj.weight"], _full("model.proj.weight"))
    convert(saved2[0], tmp_path / "opt.safetensors", only="optim.state")
    assert set(load_file(str(tmp_path / "opt.safetensors"))) == {"0.exp_avg"}


def test_dtype_casts_floating_tensors_only(saved2, tmp_path):
    from shardckpt.converters import convert

    convert(saved2[0], tmp_path / "bf16.safetensors", dtype="bf16")
    got = load_file(str(tmp_path / "bf16.safetensors"))
    for key, (_, dtype, _) in TENSORS.items():
        want = _full(key).to(torch.bfloat16) if dtype.is_floating_point else _full(key)
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
    with pytest.raises(ValueError, match="bf16"):
        convert(saved2[0], tmp_path / "x.safetensors", dtype="int8")


def test_non_tensor_values_and_the_dropped_list(tmp_path):
    from shardckpt.converters import convert

    src = {"w": torch.ones(2), "epoch": 3, "cfg": {"depth": 2, "act": "gelu"}, "name": "x",
           "blob": b"\x01", "pair": (1, 2), "format": "mine"}
    torch.save(src, tmp_path / "s.pt")
    report = convert(tmp_path / "s.pt", tmp_path / "o.safetensors")
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta.pop("format") == "pt"
    assert {k: json.loads(v) for k, v in meta.items()} == {"epoch": 3, "cfg.depth": 2, "cfg.act": "gelu", "name": "x"}
    reasons = {d.key: d.reason for d in report.dropped}
    assert set(reasons) == {"blob", "pair", "format"}
    assert "reserved" in reasons["format"] and "bytes" in reasons["blob"] and "tuple" in reasons["pair"]
    # a shardckpt target keeps all of them
    convert(tmp_path / "s.pt", tmp_path / "ck")
    import shardckpt

    back = {"w": torch.zeros(2), "epoch": 0, "cfg": {"depth": 0, "act": ""}, "name": "", "blob": None,
            "pair": None, "format": None}
    shardckpt.load(back, tmp_path / "ck")
    assert {k: v for k, v in back.items() if k != "w"} == {k: v for k, v in src.items() if k != "w"}


# ---------------------------------------------------------------- hostile and damaged sources


class _Payload:
    """Unpickling this creates ``path`` (it would run ``open(path, "w")``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def _payload_is_live(tmp_path: Path, data: bytes) -> None:
    """The payload does create its marker under a plain unpickler (so the tests can fail)."""
    probe = tmp_path / "probe.pkl"
    probe.write_bytes(data.replace(b"MARKER", b"PROBED"))
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(probe)!r}, 'rb'))"],
                   check=False, capture_output=True, cwd=tmp_path)
    assert (tmp_path / "PROBED").exists()


def test_hostile_dcp_metadata_runs_nothing(tmp_path, monkeypatch):
    from shardckpt.converters import convert
    from shardckpt.errors import UnsupportedFormatError

    d = tmp_path / "evil_dcp"
    d.mkdir()
    data = pickle.dumps(_Payload("MARKER"))
    _payload_is_live(tmp_path, data)
    (d / ".metadata").write_bytes(data)
    monkeypatch.chdir(tmp_path)  # where the payload would create its file
    with pytest.raises(UnsupportedFormatError, match="refusing to unpickle global io.open") as e:
        convert(d, tmp_path / "out")
    assert e.value.refused_global == "io.open" and e.value.path.endswith(".metadata")  # builtins.open pickles so
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "out").exists()


def test_dcp_metadata_pointing_outside_is_corrupt(saved2, tmp_path):
    import shutil

    from shardckpt.converters import convert
    from shardckpt.errors import CorruptCheckpointError

    d = tmp_path / "dcp"
    shutil.copytree(saved2[1], d)
    md = pickle.loads((d / ".metadata").read_bytes())  # our own file: fine to unpickle here
    idx = next(iter(md.storage_data))
    md.storage_data[idx].relative_path = "../../outside.distcp"
    (d / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CorruptCheckpointError, match="escapes the checkpoint"):
        convert(d, tmp_path / "out")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["zip", "raw-pickle"])
def test_hostile_pt_runs_nothing(tmp_path, monkeypatch, kind):
    from shardckpt.converters import convert
    from shardckpt.errors import UnsupportedFormatError

    src = tmp_path / "evil.pt"
    if kind == "zip":
        torch.save({"w": torch.ones(1), "x": _Payload("MARKER")}, src)
    else:
        data = pickle.dumps({"x": _Payload("MARKER")})
        _payload_is_live(tmp_path, data)
        src.write_bytes(data)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsupportedFormatError, match="refusing to unpickle") as e:
        convert(src, tmp_path / "out.safetensors")
    assert "trust_pickle=True" in str(e.value)
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_legacy_pickled_object_pt_needs_trust_pickle(tmp_path):
    from shardckpt.converters import convert
    from shardckpt.errors import UnsupportedFormatError

    src = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.arange(6.0)}, "args": argparse.Namespace(lr=0.1)}, src)
    with pytest.raises(UnsupportedFormatError, match="argparse.Namespace") as e:
        convert(src, tmp_path / "a.safetensors")
    assert e.value.refused_global == "argparse.Namespace"
    assert "trust_pickle=True" in str(e.value) and "--trust-pickle" in str(e.value)
    with pytest.warns(UserWarning, match="trust_pickle=True"):
        report = convert(src, tmp_path / "a.safetensors", trust_pickle=True)
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["model.w"], torch.arange(6.0))
    assert [d.key for d in report.dropped] == ["args"]
    assert "pickled code" in report.dropped[0].reason


def test_corrupt_shard_names_the_key_and_writes_nothing(tmp_path):
    import shardckpt
    from shardckpt.converters import convert
    from shardckpt.errors import CorruptCheckpointError

    sd = {"a": torch.randn(50), "b": torch.randn(64, 8), "c": torch.randn(50)}
    with shardckpt.knobs.override(chunk_bytes=256):
        shardckpt.save(sd, tmp_path / "ck")
    blob = shardckpt.verify(tmp_path / "ck").manifest.entries["b"].shards[0].blob
    shard = tmp_path / "ck" / blob.file
    data = bytearray(shard.read_bytes())
    data[blob.offset + 700] ^= 0x10  # one bit, inside chunk 2 of "b"
    shard.write_bytes(bytes(data))
    for dst in ("o.safetensors", "o.pt", "o_ck"):
        with pytest.raises(CorruptCheckpointError) as e:
            convert(tmp_path / "ck", tmp_path / dst)
        assert e.value.key == "b" and e.value.chunk == 2, str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["ck", "o_ck"]  # no file, no temporary left
    assert not (tmp_path / "o_ck" / "manifest.json").exists()  # never committed


def test_damaged_safetensors_source(tmp_path):
    from shardckpt.converters import convert
    from shardckpt.errors import CorruptCheckpointError

    save_file({"a": torch.ones(4), "b": torch.zeros(4)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["b"]["data_offsets"] = [8, 24]  # overlaps "a"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "overlap.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(CorruptCheckpointError, match="gap or overlap"):
        convert(tmp_path / "overlap.safetensors", tmp_path / "o1")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(CorruptCheckpointError, match="header length"):
        convert(tmp_path / "huge.safetensors", tmp_path / "o2")


def test_unknown_missing_and_incomplete_sources(tmp_path):
    from shardckpt.converters import convert
    from shardckpt.errors import (
        CheckpointNotFoundError,
        IncompleteCheckpointError,
        UnsupportedFormatError,
    )

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "weights.npz").write_bytes(b"x")
    with pytest.raises(UnsupportedFormatError, match="not a checkpoint convert knows"):
        convert(tmp_path / "d", tmp_path / "o")
    (tmp_path / "f.txt").write_text("hi")
    with pytest.raises(UnsupportedFormatError, match="unknown file type"):
        convert(tmp_path / "f.txt", tmp_path / "o")
    with pytest.raises(CheckpointNotFoundError):
        convert(tmp_path / "nothing.pt", tmp_path / "o")
    (tmp_path / "torn" / "data").mkdir(parents=True)
    with pytest.raises(IncompleteCheckpointError):
        convert(tmp_path / "torn", tmp_path / "o")


def test_destinations_fail_closed(saved2, tmp_path):
    from shardckpt.converters import convert
    from shardckpt.errors import CheckpointExistsError

    (tmp_path / "x.safetensors").write_bytes(b"keep")
    with pytest.raises(CheckpointExistsError):
        convert(saved2[0], tmp_path / "x.safetensors")
    assert (tmp_path / "x.safetensors").read_bytes() == b"keep"
    convert(saved2[0], tmp_path / "ck")
    with pytest.raises(CheckpointExistsError, match="already exists"):
        convert(saved2[0], tmp_path / "ck")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "README.md").write_text("mine")
    with pytest.raises(CheckpointExistsError, match="not empty"):
        convert(saved2[0], tmp_path / "hf", max_shard_size="1GB")


# ---------------------------------------------------------------- progress, CLI


def test_progress_plain_lines_when_not_a_terminal(saved2, tmp_path, capsys):
    from shardckpt.converters import convert

    convert(saved2[0], tmp_path / "o.safetensors", progress=True)
    err = capsys.readouterr().err
    assert "convert ck2 -> o.safetensors: started" in err and ": done," in err and "\r" not in err


def test_cli(saved2, tmp_path, capsys):
    from shardckpt.cli import main

    assert main(["convert", str(saved2[0]), str(tmp_path / "m.safetensors"), "--only", "model", "--dtype", "fp16",
                 "--quiet"]) == 0
    assert "(shardckpt) ->" in capsys.readouterr().out
    assert load_file(str(tmp_path / "m.safetensors"))["embed.weight"].dtype == torch.float16
    assert main(["convert", str(saved2[0]), str(tmp_path / "m.safetensors")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_python_m_converters_is_the_same_command(saved2, tmp_path):
    """``python -m shardckpt.converters`` runs ``shardckpt convert``: same options
    (--compression, --quiet, binary and decimal sizes), same report."""
    out = subprocess.run([sys.executable, "-m", "shardckpt.converters", str(saved2[0]), str(tmp_path / "hf"),
                          "--only", "model", "--max-shard-size", "1MiB", "--quiet", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["dst_format"] == "hf-safetensors" and out.stderr == ""
    bad = subprocess.run([sys.executable, "-m", "shardckpt.converters", str(saved2[0]), str(tmp_path / "x"),
                          "--compression", "lz4"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--compression" in bad.stderr


# ---------------------------------------------------------------- bounded memory

_RSS_SCRIPT = r"""
import json, resource, sys
import torch, safetensors
from shardckpt.converters import convert
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = convert(sys.argv[1], sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mib": (peak - base) / 1024, "bytes": report.bytes_written}))
"""


def test_export_memory_is_bounded(tmp_path):
    """384 MiB of 32 MiB tensors: peak RSS growth stays under 256 MiB + one tensor
    (a convert that held the checkpoint would grow by >= 384 MiB)."""
    import shardckpt

    torch.manual_seed(0)
    shardckpt.save({f"layers.{i}.weight": torch.randn(8 << 20) for i in range(12)}, tmp_path / "ck")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "ck"), str(tmp_path / "o.safetensors")],
                         check=True, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["bytes"] == (tmp_path / "o.safetensors").stat().st_size > 384 << 20
    assert res["growth_mib"] < 256 + 32, res
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        torch.manual_seed(0)
        assert torch.equal(f.get_tensor("layers.0.weight"), torch.randn(8 << 20))


# ---------------------------------------------------------------- other backends, DCP extensions


def test_object_store_urls_both_ways():
    """memory:// (an fsspec backend: no rename, no local path): export, and import a
    torch.save file through ranged reads instead of mmap."""
    import io

    import fsspec

    import shardckpt
    from shardckpt.converters import convert

    fs = fsspec.filesystem("memory")
    sd = {"model": {"w": torch.randn(40, 30), "b": torch.arange(5)}, "step": 3}
    shardckpt.save(sd, "memory://conv/ck")
    convert("memory://conv/ck", "memory://conv/out/model.safetensors")
    got = safetensors.torch.load(fs.cat_file("/conv/out/model.safetensors"))
    assert torch.equal(got["model.w"], sd["model"]["w"]) and torch.equal(got["model.b"], sd["model"]["b"])
    assert fs.ls("/conv/out", detail=False) == ["/conv/out/model.safetensors"]  # nothing temporary left
    buf = io.BytesIO()
    torch.save(sd, buf)
    fs.pipe_file("/conv/src.pt", buf.getvalue())
    report = convert("memory://conv/src.pt", "memory://conv/imported")
    assert report.src_format == "torch"
    back = {"model": {"w": torch.zeros(40, 30), "b": torch.zeros(5, dtype=torch.int64)}, "step": 0}
    shardckpt.load(back, "memory://conv/imported")
    assert torch.equal(back["model"]["w"], sd["model"]["w"]) and back["step"] == 3
    fs.rm("/conv", recursive=True)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_with_extensions_is_refused_by_name(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard

    from shardckpt.converters import convert
    from shardckpt.errors import UnsupportedFormatError

    dcp.save({"w": torch.randn(64)}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "z"), _extensions=[ZStandard()]),
             no_dist=True)
    with pytest.raises(UnsupportedFormatError, match="DCP extensions"):
        convert(tmp_path / "z", tmp_path / "o")


@pytest.mark.parametrize("budget_mib, overlap", [(1.5, False), (4, True)])
def test_steps_holding_tensors_run_ahead_only_within_the_budget(budget_mib, overlap):
    """An assembled tensor (or a DCP chunk) is read one ahead only when it and the
    one being written fit the budget together; otherwise one at a time."""
    import threading
    import weakref

    from shardckpt.converters.items import Step, TensorItem, flat_pieces, run_jobs

    alive: set[int] = set()
    seen_alive: list[set[int]] = []  # what was alive when each step started
    started = [threading.Event() for _ in range(6)]

    def make(i: int):
        def run(bufs):
            seen_alive.append(set(alive))
            started[i].set()
            t = torch.full((1 << 18,), float(i))  # 1 MiB, held beyond the slot buffers
            alive.add(i)
            weakref.finalize(t, alive.discard, i)
            return flat_pieces(t, 1 << 20)  # two 512 KiB views of it
        return run

    item = TensorItem("k", ("k",), torch.float32, (1 << 18,))
    steps = [Step(item, make(i), torch.float32, 1 << 20) for i in range(6)]
    got = []
    for n, (_, p) in enumerate(run_jobs(steps, int(budget_mib * (1 << 20)))):
        got.append(float(p[0]))
        k = n // 2
        if overlap and n % 2 == 0 and k < 5:
            # within the budget the next step starts while this one is being consumed
            assert started[k + 1].wait(timeout=30), f"step {k + 1} did not run ahead"
    assert got == [float(i) for i in range(6) for _ in range(2)]
    if overlap:
        assert any(seen_alive[1:]), seen_alive
    else:
        assert seen_alive == [set()] * 6, seen_alive  # never two held tensors at once
