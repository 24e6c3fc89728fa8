import json

import pytest

from shardckpt.errors import CorruptCheckpointError
from shardckpt.format.manifest import (
    BlobRef,
    ChunkInfo,
    Manifest,
    ObjectEntry,
    TensorEntry,
    TensorShard,
    decode_manifest,
    encode_manifest,
)

F = "data/abc-r00000.bin"


def _manifest(**over):
    blob = BlobRef(F, 0, (ChunkInfo("raw", 16, 16, 123), ChunkInfo("raw", 8, 8, 0xFFFFFFFF)))
    entries = {
        "w": TensorEntry("float32", (3, 2), (TensorShard((0, 0), (3, 2), blob),), ("model", "w")),
        "step": ObjectEntry("json", ("step",), value=7),
        "blob": ObjectEntry("bytes", ("blob",), blob=BlobRef(F, 24, (ChunkInfo("raw", 2, 2, 5),))),
    }
    kw = dict(save_id="abc", world_size=2, created_unix=1.5, chunk_bytes=64, files={F: 26}, entries=entries,
              library={"torch": "x"}, metadata={"note": "hi"})
    kw.update(over)
    return Manifest(**kw)


def test_round_trip():
    m = _manifest()
    assert decode_manifest(encode_manifest(m)) == m


def _tamper(fn):
    doc = json.loads(encode_manifest(_manifest()))
    fn(doc)
    # re-seal the CRC so that validation, not the checksum, must catch the problem
    from shardckpt.format.jsoncodec import encode as _canonical
    from shardckpt.native.crc32c import crc32c

    body = {k: v for k, v in doc.items() if k != "crc32c"}
    doc["crc32c"] = f"{crc32c(_canonical(body)):08x}"
    return _canonical(doc)


def test_crc_detects_any_edit():
    data = encode_manifest(_manifest())
    edited = data.replace(b'"note":"hi"', b'"note":"ho"')
    assert edited != data
    with pytest.raises(CorruptCheckpointError, match="CRC32C mismatch"):
        decode_manifest(edited)


@pytest.mark.parametrize(
    "path",
    ["../evil.bin", "data/../../evil.bin", "/etc/passwd", "data//x", "data/./x", "other/x.bin", "data",
     "data\\x", "C:/x", "s3://bucket/x", "data/x\x00"],
)
def test_paths_escaping_the_checkpoint_are_rejected(path):
    def edit(doc):
        body = doc["body"]
        body["files"] = {path: {"size": 26}}
        body["entries"]["w"]["shards"][0]["file"] = path
        body["entries"]["blob"]["file"] = path

    with pytest.raises(CorruptCheckpointError):
        decode_manifest(_tamper(edit))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d["body"]["entries"]["w"].update(dtype="object"), "unsupported dtype"),
        (lambda d: d["body"]["entries"]["w"].update(shape=[2, 2]), "exceeds shape"),
        (lambda d: d["body"]["entries"]["w"]["shards"][0].update(sizes=[3, 3]), "exceeds shape|chunks hold"),
        (lambda d: d["body"]["entries"]["w"]["shards"][0]["chunks"][0].__setitem__(0, "lz77"), "unknown codec"),
        (lambda d: d["body"]["entries"]["w"]["shards"][0]["chunks"][0].__setitem__(1, -1), "non-negative"),
        (lambda d: d["body"]["entries"]["w"]["shards"][0]["chunks"][0].__setitem__(2, 17), "raw_len"),
        (lambda d: d["body"]["entries"]["w"]["shards"][0]["chunks"][1].__setitem__(3, 2**32), "out of range"),
        (lambda d: d["body"]["entries"]["w"]["shards"][0]["chunks"][0].__setitem__(1, True), "non-negative"),
        (lambda d: d["body"]["entries"]["w"]["shards"][0].update(file="data/other.bin"), "not listed"),
        (lambda d: d["body"]["files"][F].update(size=10), "exceed"),
        (lambda d: d["body"]["entries"]["w"].update(kind="pickle"), "unknown kind"),
        (lambda d: d["body"]["entries"]["step"].update(encoding="pickle"), "unknown object encoding"),
        (lambda d: d["body"]["entries"]["step"].update(key_path=[]), "key_path"),
        (lambda d: d["body"].pop("entries"), "missing field"),
        (lambda d: d.update(version=99), "newer"),
        (lambda d: d["body"]["entries"]["w"]["shards"][0]["chunks"].__setitem__(0, ["raw", 14, 14, 1]), "splits|chunks hold"),
    ],
)
def test_schema_violations_are_named(edit, match):
    with pytest.raises(CorruptCheckpointError, match=match):
        decode_manifest(_tamper(edit))


def test_garbage_and_non_finite_numbers_are_corruption():
    for data in (b"", b"\xff\xfe", b"[]", b'{"format": "x"}', b'{"format":"shardckpt","version":NaN}'):
        with pytest.raises(CorruptCheckpointError):
            decode_manifest(data)


def test_error_names_the_source():
    with pytest.raises(CorruptCheckpointError, match="somewhere/manifest.json") as ei:
        decode_manifest(b"{}", source="somewhere/manifest.json")
    assert ei.value.file == "somewhere/manifest.json"


# Regression tests (issue 11, part 3/4): the CRC covered the parsed document only, so
# edits that parse the same went unnoticed; duplicate keys were resolved silently.
@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b.replace(b"\\u00e9", b"\\u00E9"),  # an escape's hex case
        lambda b: b.replace(b"1e-07", b"1E-07"),  # an exponent's case
        lambda b: b.replace(b"1.5,", b"1.50,"),  # a redundant digit
        lambda b: b.replace(b'{"body":', b'{ "body":'),  # whitespace
    ],
)
def test_edits_that_parse_the_same_are_corruption(edit):
    data = encode_manifest(_manifest(metadata={"note": "caf\u00e9", "lr": 1e-7}))
    edited = edit(data)
    assert edited != data and json.loads(edited) == json.loads(data)
    with pytest.raises(CorruptCheckpointError, match="canonical"):
        decode_manifest(edited)


def test_duplicate_keys_are_corruption():
    data = encode_manifest(_manifest())
    edited = data.replace(b'"metadata":{"note":"hi"}', b'"metadata":{"note":"x","note":"hi"}')
    assert json.loads(edited) == json.loads(data)
    with pytest.raises(CorruptCheckpointError, match="duplicate key"):
        decode_manifest(edited)


def test_deep_nesting_and_huge_numbers_are_corruption():
    for nested in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        with pytest.raises(CorruptCheckpointError):
            decode_manifest(nested)
    with pytest.raises(CorruptCheckpointError, match="created_unix"):
        decode_manifest(_tamper(lambda d: d["body"].update(created_unix=10**400)))


@pytest.mark.parametrize("path", ["data/" + "a" * 256, "data/" + "/".join(["d" * 200] * 6), "data/" + "\u00e9" * 128])
def test_paths_too_long_for_any_backend_are_rejected(path):
    """Regression: a 300-byte name reached os.stat and raised ENAMETOOLONG (an untyped OSError)."""
    def edit(doc):
        doc["body"]["files"] = {path: {"size": 26}}
        doc["body"]["entries"]["w"]["shards"][0]["file"] = path
        doc["body"]["entries"]["blob"]["file"] = path

    with pytest.raises(CorruptCheckpointError, match="longer than"):
        decode_manifest(_tamper(edit))
