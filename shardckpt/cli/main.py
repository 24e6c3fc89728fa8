"""``python -m shardckpt`` (console script ``shardckpt``): a thin shell over ``shardckpt.tools.inspection``.

Verbs: ``ls``, ``inspect``, ``verify``, ``diff``, ``gc``, ``convert``. Each one
computes its answer with the matching ``shardckpt.tools.inspection`` function and prints it,
for people (tables on stdout) or, with ``--json``, as exactly one JSON document on
stdout: the function's return value, or ``{"error": {...}}`` when it failed.

Exit codes, so scripts can branch without parsing:

- 0: it worked (``verify``: every checkpoint is valid);
- 1: a checkpoint problem: corrupt, incomplete, not found, mismatched, owned by
  a live manager, hostile (any ``ShardckptError``), or storage that failed
  (``OSError``, a backend that is not installed); the message goes to stderr;
- 2: a usage error (argparse's own code; usage on stderr, nothing on stdout).

Progress of long work (verify, ls --verify, diff reading data, gc deleting) goes
to stderr: a tqdm bar on a terminal, one plain line per step otherwise (logs
stay readable), nothing with ``--quiet``. stdout never carries progress, so
``--json`` output can be piped as is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .. import __version__
from ..errors import CheckpointNotFoundError, IncompleteCheckpointError, ShardckptError
from ..format import jsoncodec
from ..manager import tiers
from ..tools import inspection as tools
from .convert import add_convert_verb
from .progress import Progress
from .text import format_age as _age
from .text import format_bytes as _bytes
from .text import format_metadata
from .text import format_metrics as _metrics
from .text import format_when as _when
from .text import print_table as _table

__all__ = ["main", "build_parser", "parse_storage_options"]

# ------------------------------------------------------------------ argument types


def _storage_option(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    parts = key.split(".")
    if not sep or not all(p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (nested keys with dots), got {text!r}")
    try:  # JSON when it parses (numbers, true/false/null, lists, objects), else the string
        value = json.loads(raw, parse_constant=_no_constant)
    except ValueError:
        value = raw
    return parts, value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")  # NaN/Infinity stay strings


def parse_storage_options(pairs: Sequence[tuple[list[str], Any]]) -> dict[str, Any] | None:
    """``[(["client_kwargs", "endpoint_url"], "http://...")]`` -> nested dict; ValueError on conflicts."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for parts, value in pairs:
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--storage-option {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is already a value")
        if parts[-1] in node:
            raise ValueError(f"--storage-option {'.'.join(parts)} given twice (or as a value and as a prefix)")
        node[parts[-1]] = value
    return out


def _keep_best(text: str) -> tuple[str, str, int]:
    parts = text.rsplit(":", 2)
    if len(parts) == 3 and parts[2].isdigit():
        metric, mode, k = parts
    else:  # K omitted: 1 (a metric name may itself hold colons)
        metric, _, mode = text.rpartition(":")
        k = "1"
    if not metric or mode not in ("min", "max") or not k.isdigit() or int(k) < 1:
        raise argparse.ArgumentTypeError(f"expected METRIC:min|max[:K] with K >= 1, got {text!r}")
    return metric, mode, int(k)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


# ------------------------------------------------------------------------ progress


# ---------------------------------------------------------------------- formatting


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------- verbs
# Each returns (JSON document, exit code, human renderer).

Result = tuple[Any, int, Callable[[TextIO], None]]


def _cmd_ls(a: argparse.Namespace, opts: dict[str, Any] | None, progress: Progress) -> Result:
    # A manager's local tier (its root given, or --local-root beside the durable root):
    # steps are rank directories plus a commit marker, listed by shardckpt.manager.tiers.
    local_root = a.local_root or (a.root if tiers.is_local_root(a.root, opts) else None)
    # Without --verify a listing is quick (manifests and sizes): no progress to show.
    found = [] if local_root == a.root else tools.list_checkpoints(
        a.root, verify=a.verify, storage_options=opts, progress=progress if a.verify else None)
    owner = tools.read_owner(a.root, storage_options=opts)
    now = time.time()
    doc = {"root": a.root, "verified": a.verify, "owner": owner, "checkpoints": [c.to_json(now) for c in found]}
    if local_root is not None:
        doc["local_root"] = local_root
        doc["checkpoints"] = tiers.tier_rows(doc["checkpoints"], local_root, now)

    def human(out: TextIO) -> None:
        if owner is not None:
            state = "live" if owner["live"] else f"stale: {owner['stale_reason']}"
            print(f"owner: {tools.describe_owner(owner)} ({state})", file=out)
        if not doc["checkpoints"]:
            print(f"no checkpoints under {a.root}", file=out)
            return
        named = any(c["name"] and not c["name"].startswith("step_") for c in doc["checkpoints"])
        tiered = local_root is not None
        rows = [["STEP", "STATUS"] + (["TIERS"] if tiered else []) + ["SIZE", "SAVED", "AGE", "METRICS"]
                + (["NAME"] if named else [])]
        for c in doc["checkpoints"]:
            rows.append([str(c["step"]) if c["step"] is not None else "-", c["status"]]
                        + ([",".join(c["tiers"]) or "-"] if tiered else [])
                        + [_bytes(c["size_bytes"]), _when(c["created_unix"]), _age(c["age_seconds"]),
                           _metrics(c["metrics"])] + ([c["name"]] if named else []))
        _table(rows, out)
        for c in doc["checkpoints"]:
            if c["status"] != "valid":
                print(f"  {c['name'] or c['path']}: {c['reason']}", file=out)
        if tiered:
            print(f"(local tier {local_root}: what this node holds)", file=out)
        if not a.verify:
            print("(status from manifests and shard sizes; --verify checks every chunk)", file=out)

    return doc, 0, human


def _cmd_inspect(a: argparse.Namespace, opts: dict[str, Any] | None, progress: Progress) -> Result:
    try:
        doc = tools.inspect(a.path, keys=a.keys, storage_options=opts)
    except (IncompleteCheckpointError, CheckpointNotFoundError) as e:
        # The usual slip: a manager's root instead of one of its checkpoints.
        if tools.list_checkpoints(a.path, storage_options=opts):
            raise type(e)(f"{e}; it holds checkpoints: see `shardckpt ls {a.path}`",
                          path=getattr(e, "path", None)) from None
        raise

    def human(out: TextIO) -> None:
        t = doc["totals"]
        lib = ", ".join(f"{k} {v}" for k, v in doc["library"].items())
        ratio = t["raw_bytes"] / t["stored_bytes"] if t["stored_bytes"] else 1.0
        for label, value in (
            ("checkpoint", doc["path"]),
            ("created", f"{_when(doc['created_unix'])} ({_age(time.time() - doc['created_unix'])} ago)"),
            ("world size", str(doc["world_size"])),
            ("library", lib or "-"),
            ("metadata", format_metadata(doc["metadata"])),
            ("files", f"{t['files']} ({_bytes(t['file_bytes'])})"),
            ("keys", f"{t['keys']} ({t['tensors']} tensors, {t['objects']} objects); raw {_bytes(t['raw_bytes'])}, "
                     f"stored {_bytes(t['stored_bytes'])} ({ratio:.2f}x)"),
        ):
            print(f"{label:<11} {value}", file=out)
        print(file=out)
        if not doc["keys"]:
            print(f"no key matches {' '.join(doc['patterns'])}", file=out)
            return
        rows = [["KEY", "DTYPE", "SHAPE", "RAW", "STORED", "CODEC", "SHARDS"]]
        for k, e in doc["keys"].items():
            if e["kind"] == "tensor":
                rows.append([k, e["dtype"], str(e["shape"]), _bytes(e["raw_bytes"]), _bytes(e["stored_bytes"]),
                             ",".join(e["codecs"]), str(e["shards"])])
            else:
                what = _short(e["value"]) if "value" in e else f"({e['encoding']})"
                rows.append([k, "object", what, _bytes(e["raw_bytes"]), _bytes(e["stored_bytes"]),
                             ",".join(e["codecs"]), str(e["shards"])])
        _table(rows, out)

    return doc, 0, human


def _cmd_verify(a: argparse.Namespace, opts: dict[str, Any] | None, progress: Progress) -> Result:
    results = tools.verify_checkpoints(a.paths, storage_options=opts, progress=progress)
    bad = [r for r in results if r["status"] != "valid"]
    doc = {"ok": not bad, "checkpoints": results}

    def human(out: TextIO) -> None:
        for r in results:
            if r["status"] == "valid":
                print(f"valid       {r['path']}: {r['files']} file(s), {r['chunks']} chunks, "
                      f"{_bytes(r['bytes_checked'])} in {r['seconds']:.2f} s", file=out)
                continue
            print(f"{r['status']:<11} {r['path']}" + ("" if r["damaged"] else f": {r['message']}"), file=out)
            for d in r["damaged"]:  # the message names file, key and chunk
                print(f"  {d['message']}", file=out)
        if bad:
            print(f"{len(bad)} of {len(results)} checkpoint(s) failed verification", file=out)

    if bad and a.json and not a.quiet:
        print(f"shardckpt verify: {len(bad)} of {len(results)} checkpoint(s) failed verification", file=sys.stderr)
    return doc, 1 if bad else 0, human


def _cmd_diff(a: argparse.Namespace, opts: dict[str, Any] | None, progress: Progress) -> Result:
    doc = tools.diff(a.a, a.b, values=a.values, storage_options=opts, progress=progress)
    code = 1 if a.exit_code and not doc["identical"] else 0

    def human(out: TextIO) -> None:
        for side in ("a", "b"):
            s = doc[side]
            print(f"{side.upper()}: {s['path']} (world size {s['world_size']}, {s['keys']} keys)", file=out)
        for label, keys in (("only in A", doc["only_in_a"]), ("only in B", doc["only_in_b"])):
            for k in keys:
                print(f"{label:<16} {k}", file=out)
        for k, t in doc["type_changed"].items():
            print(f"{'type changed':<16} {k}: {t['a']} -> {t['b']}", file=out)
        stats = doc["values"] or {}
        for k in doc["content_changed"]:
            v = stats.get(k)
            extra = "" if v is None else (
                f" (max abs diff {'-' if v['max_abs_diff'] is None else format(v['max_abs_diff'], '.6g')}; "
                f"{v['differing']} of {v['elements']} elements differ)")
            print(f"{'content changed':<16} {k}{extra}", file=out)
        for k, v in doc["metadata_changed"].items():
            print(f"{'metadata':<16} {k}: {_short(v['a'])} -> {_short(v['b'])}", file=out)
        n = doc["compared"]
        print(f"{'unchanged':<16} {len(doc['unchanged'])} key(s); tensors compared: {n['by_crc']} by chunk "
              f"CRC32C, {n['by_reading']} by reading", file=out)
        if stats:
            worst = max((v["max_abs_diff"] or 0.0 for v in stats.values()), default=0.0)
            print(f"{'max abs diff':<16} {worst:.6g} over {len(stats)} tensor(s)", file=out)
        print("identical" if doc["identical"] else "different", file=out)

    return doc, code, human


def _cmd_gc(a: argparse.Namespace, opts: dict[str, Any] | None, progress: Progress) -> Result:
    owner = tools.read_owner(a.root, storage_options=opts) if a.force and not a.dry_run else None
    if owner is not None and owner["live"] and not a.quiet:
        print(f"shardckpt gc: --force: deleting although a live manager owns {a.root} "
              f"({tools.describe_owner(owner)}); its owner marker is left in place", file=sys.stderr)
    doc = tools.gc(a.root, keep_last=a.keep_last, keep_every=a.keep_every, keep_best=a.keep_best,
                   incomplete=a.incomplete, dry_run=a.dry_run, force=a.force, storage_options=opts,
                   progress=progress)

    def human(out: TextIO) -> None:
        policy = ", ".join(doc["policies"]) or "no policy"
        leftovers = "incomplete leftovers removed" if doc["incomplete"] else "incomplete leftovers kept"
        print(f"gc {doc['root']} ({policy}; {leftovers}){' [dry run]' if doc['dry_run'] else ''}", file=out)
        if doc["owner"] is not None and doc["dry_run"] and doc["owner"]["live"]:
            print(f"note: owned by a live manager ({tools.describe_owner(doc['owner'])}): "
                  "a real run is refused without --force", file=out)
        rows = [["", "STEP", "STATUS", "SIZE", "WHY"]]
        verb = "would delete" if doc["dry_run"] else "deleted"
        rows += [[verb, str(c["step"]), c["status"], _bytes(c["size_bytes"]), ""] for c in doc["delete"]]
        rows += [["FAILED", str(c["step"]), c["status"], _bytes(c["size_bytes"]), c["error"]] for c in doc["failed"]]
        rows += [["keep", str(c["step"]), c["status"], _bytes(c["size_bytes"]), ", ".join(c["why"])]
                 for c in doc["keep"]]
        rows.sort(key=lambda r: int(r[1]) if r[1].isdigit() else -1)
        _table(rows, out)
        print(f"{len(doc['delete'])} checkpoint(s) {'would be deleted' if doc['dry_run'] else 'deleted'}, "
              f"{_bytes(doc['freed_bytes'])}", file=out)

    return doc, 1 if doc["failed"] else 0, human


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-option", "-o", dest="storage_option", action="append", default=[],
                        type=_storage_option, metavar="KEY=VALUE",
                        help="backend option (s3fs arguments for s3://); VALUE is JSON when it parses; "
                             "nested keys with dots: client_kwargs.endpoint_url=http://...; repeatable")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress or notes on stderr")
    common.add_argument("--json", action="store_true",
                        help="print exactly one JSON document on stdout (errors as {\"error\": {...}})")
    p = argparse.ArgumentParser(
        prog="shardckpt", description="Inspect, verify, compare, list and clean up shardckpt checkpoints.",
        epilog="Exit codes: 0 ok; 1 checkpoint problem (corrupt, incomplete, not found, owned, I/O); "
               "2 usage error. Paths are local paths or URLs (s3://bucket/prefix, file://, fsspec).")
    p.add_argument("--version", action="version", version=f"shardckpt {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("ls", parents=[common], help="list the checkpoints under a root")
    s.add_argument("root", help="a manager's root, any directory of checkpoints, or one checkpoint")
    s.add_argument("--verify", action="store_true", help="check every chunk (reads all data)")
    s.add_argument("--local-root", metavar="DIR", help="a manager's local tier: add its steps and a TIERS column")
    s.set_defaults(run=_cmd_ls, parser=s)

    s = sub.add_parser("inspect", parents=[common], help="what a checkpoint holds (from its manifest)")
    s.add_argument("path", help="one checkpoint")
    s.add_argument("--keys", action="append", metavar="GLOB", help="only keys matching (repeatable)")
    s.set_defaults(run=_cmd_inspect, parser=s)

    s = sub.add_parser("verify", parents=[common], help="check every chunk's CRC32C and decoding")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.set_defaults(run=_cmd_verify, parser=s)

    s = sub.add_parser("diff", parents=[common], help="compare two checkpoints key by key")
    s.add_argument("a", metavar="A", help="a checkpoint")
    s.add_argument("b", metavar="B", help="another checkpoint")
    s.add_argument("--values", action="store_true",
                   help="read every tensor both hold: max abs difference and differing elements per key")
    s.add_argument("--exit-code", action="store_true", help="exit 1 if the checkpoints differ")
    s.set_defaults(run=_cmd_diff, parser=s)

    s = sub.add_parser("gc", parents=[common], help="delete checkpoints by retention policy",
                       description="Apply CheckpointManager's retention policies to ROOT. The newest valid "
                                   "checkpoint is never deleted; incomplete ones only with --incomplete.")
    s.add_argument("root", help="a CheckpointManager root (step_N directories)")
    s.add_argument("--keep-last", type=_positive, metavar="K", help="keep the K newest valid checkpoints")
    s.add_argument("--keep-every", type=_positive, metavar="N", help="keep steps divisible by N")
    s.add_argument("--keep-best", type=_keep_best, metavar="METRIC:min|max[:K]",
                   help="keep the K (default 1) best by a saved metric")
    s.add_argument("--incomplete", action="store_true", help="also delete incomplete checkpoints")
    s.add_argument("--dry-run", "-n", action="store_true", help="delete nothing; list what would go")
    s.add_argument("--force", action="store_true", help="delete even while a live manager owns ROOT")
    s.set_defaults(run=_cmd_gc, parser=s)

    add_convert_verb(sub, common)
    return p


# ----------------------------------------------------------------------------- main


def _error_doc(e: BaseException) -> dict[str, Any]:
    err: dict[str, Any] = {"type": type(e).__name__, "message": str(e)}
    for attr in ("path", "file", "key", "chunk", "owner"):
        if getattr(e, attr, None) is not None:
            err[attr] = getattr(e, attr)
    if getattr(e, "damaged", None):
        err["damaged"] = [tools.describe_error(d) for d in e.damaged]  # type: ignore[attr-defined]
    return {"error": err}


def _emit_json(doc: Any, out: TextIO) -> None:
    # allow_nan=False: never print a document a strict JSON parser rejects; non-finite
    # floats (a NaN loss) appear in the JSON codec's safe form, as they are stored.
    print(json.dumps(_printable(doc), indent=2, ensure_ascii=False, allow_nan=False), file=out)


def _printable(v: Any) -> Any:
    if isinstance(v, float):
        return jsoncodec.float_form(v)
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _printable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_printable(x) for x in v]
    return str(v)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 checkpoint problem, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts = parse_storage_options(args.storage_option)
    except ValueError as e:
        args.parser.error(str(e))
    if args.verb == "gc" and not (args.keep_last or args.keep_every or args.keep_best or args.incomplete):
        args.parser.error("nothing to do: give --keep-last, --keep-every and/or --keep-best, and/or --incomplete")
    progress = Progress(args.verb, not args.quiet, sys.stderr)
    try:
        doc, code, human = args.run(args, opts, progress)
    except KeyboardInterrupt:
        progress.close()
        print("shardckpt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure: a message, and one JSON document
        progress.close()
        if isinstance(e, ShardckptError):
            print(f"shardckpt {args.verb}: error: {e}", file=sys.stderr)
        elif isinstance(e, (OSError, ImportError, ValueError)):
            # Environment trouble (I/O, a backend that is not installed, a URL no backend
            # takes): the message says it all.
            print(f"shardckpt {args.verb}: error: {type(e).__name__}: {e}", file=sys.stderr)
        else:  # a bug: the traceback is what a report needs
            traceback.print_exc()
        if args.json:
            _emit_json(_error_doc(e), sys.stdout)
        return 1
    finally:
        progress.close()
    try:
        if args.json:
            _emit_json(doc, sys.stdout)
        else:
            human(sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # `shardckpt ls ROOT | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code
