#!/usr/bin/env python
"""Planning and metadata at thousands of ranks, by simulation (no processes).

    python benchmarks/bench_scale.py [--ranks 8,64,512,4096] [--dcp-max 1024] [--json out.json]

State: a Llama-7B-shaped model with Adam (32 layers x 9 parameters, embeddings,
head, final norm: 291 parameters, 873 tensors with the two moments), every
tensor FSDP-sharded along dim 0 over N ranks (``torch.chunk`` rows, as FSDP2's
``Shard(0)``; ranks past the last row hold empty shards). The local plans of the
N simulated ranks are built first (not timed: each rank builds its own, in
parallel), as DCP's own planner tests do, then each phase is timed on one core:

  plan+commit   shardckpt: ``_plan.plan_globally`` + building, encoding the manifest
                (the coordinator's work). DCP: ``DefaultSavePlanner.create_global_plan``
                (dedup, metadata, ``_validate_global_plan``) + pickling ``Metadata``.
  read+validate what a loading rank does to learn what is stored: shardckpt: decode
                and validate the manifest plus its own rank's index; DCP: unpickle
                ``.metadata`` (no validation exists to time).
  load plan     one rank (rank 1) plans its reads for its local chunks: shardckpt's
                ``_load.tensor_reads`` (grid arithmetic); DCP's
                ``create_read_items_for_chunk_list`` over the stored chunks.
  cached plan   shardckpt: what a save whose structure did not change costs the
                coordinator: nothing but the digest check (``Summary.digest``, one rank).

Metadata size: bytes of the manifest plus every rank's index (indexes are
encoded for every rank up to 1024 ranks; beyond, for 64 ranks spread over the
world and scaled), per (tensor, shard) entry; DCP: the pickled ``Metadata``.
DCP runs up to ``--dcp-max`` ranks (its per-item objects need ~1 KB each of
RAM). Targets (printed, never asserted): slope <= 1.15 per phase; at 4096
ranks plan+commit <= 3 s, load plan <= 0.5 s, read+validate <= 2 s, <= 64 B/entry.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import pickle
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks._common import write_json  # noqa: E402


def llama7b_shapes() -> dict[str, tuple[int, ...]]:
    d, ff, vocab = 4096, 11008, 32000
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (vocab, d)}
    for i in range(32):
        p = f"layers.{i}."
        for n in ("wq", "wk", "wv", "wo"):
            shapes[p + f"attention.{n}.weight"] = (d, d)
        shapes[p + "feed_forward.w1.weight"] = (ff, d)
        shapes[p + "feed_forward.w2.weight"] = (d, ff)
        shapes[p + "feed_forward.w3.weight"] = (ff, d)
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (vocab, d)
    out = {}
    for k, s in shapes.items():
        out[f"model.{k}"] = s
        out[f"optim.state.{k}.exp_avg"] = s
        out[f"optim.state.{k}.exp_avg_sq"] = s
    return out


def rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """torch.chunk's rows of dim 0 for ``rank`` (start, count); empty past the last chunk."""
    step = -(-n // world)
    start = min(rank * step, n)
    return start, max(0, min(step, n - start))


def shard_boxes(shapes: dict[str, tuple[int, ...]], world: int, rank: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    out = []
    for s in shapes.values():
        start, count = rows(s[0], world, rank)
        out.append(((start,) + (0,) * (len(s) - 1), (count,) + tuple(s[1:])))
    return out


def simulate_ours(shapes: dict[str, tuple[int, ...]], world: int, repeats: int) -> dict[str, Any]:
    from shardckpt.engine.load import tensor_reads
    from shardckpt.engine.planning import Summary, plan_globally, structure_hash
    from shardckpt.format.index import encode_index, index_name
    from shardckpt.format.manifest import BlobRef, ChunkInfo, decode_manifest, encode_manifest
    from shardckpt.io.manifest_builder import RankWritten, build_manifest
    from shardckpt.native.crc32c import crc32c

    keys = tuple(shapes)
    specs = tuple(("t", "float32", s, (k,)) for k, s in shapes.items())
    h = structure_hash(keys, specs)
    summaries = []
    for r in range(world):
        b = shard_boxes(shapes, world, r)
        off = np.zeros((len(b), 2), dtype=np.int64)
        siz = np.zeros((len(b), 2), dtype=np.int64)
        for i, (o, z) in enumerate(b):
            off[i, :len(o)], siz[i, :len(z)] = o, z
        summaries.append(Summary(keys, specs, off, siz, h))
    save_id = "0123456789abcdef"

    def index_of(rank: int, assignment: Any) -> tuple[bytes, int]:
        items, pos = [], 0
        for p, k, j in zip(assignment.positions, assignment.key_nos, assignment.boxes):
            if j < 0:
                continue
            _, z = shard_boxes_one(shapes, keys[int(p)], world, rank)
            n = math.prod(z) * 4
            chunks = tuple(ChunkInfo("raw", min(4 << 20, n - c), min(4 << 20, n - c), 0x9E3779B1)
                           for c in range(0, n, 4 << 20))
            items.append((int(k), int(j), BlobRef(f"data/{save_id}-r{rank:05d}.bin", pos, chunks)))
            pos += n
        return encode_index(save_id, rank, items), pos

    times: dict[str, list[float]] = {"plan+commit": [], "read+validate": [], "load plan": [], "cached plan": []}
    sizes: dict[str, float] = {}
    for rep in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        assignments, skel = plan_globally(summaries)
        sample = range(world) if world <= 1024 else sorted({int(x) for x in np.linspace(0, world - 1, 64)} | {1})
        written = []
        idx_bytes: dict[int, bytes] = {}
        ends: dict[int, int] = {}
        t_plan = time.perf_counter() - t0
        for r in sample:  # each rank encodes its own index (in parallel): not coordinator time
            idx_bytes[r], ends[r] = index_of(r, assignments[r])
        t1 = time.perf_counter()
        for r in range(world):
            near = r if r in idx_bytes else min(idx_bytes, key=lambda x: abs(x - r))
            data, end = idx_bytes[near], ends[near]
            written.append(RankWritten([], (index_name(save_id, r), len(data), crc32c(data)),
                                       {f"data/{save_id}-r{r:05d}.bin": end, index_name(save_id, r): len(data)}, 4 << 20))
        manifest = build_manifest(skel, written, save_id, {}, 4 << 20)
        top = encode_manifest(manifest)
        t_commit = time.perf_counter() - t1
        times["plan+commit"].append(t_plan + t_commit)
        # a loading rank: the manifest, then its own index (rank 1)
        me = 1 if world > 1 else 0
        t0 = time.perf_counter()
        mine = idx_bytes[me]
        m = decode_manifest(top, read_index=lambda rel, mine=mine: mine)
        entry = m.entries[keys[0]]
        entry.shards[me]  # reads and checks rank 1's index
        times["read+validate"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reads = 0
        for k in keys:
            o, z = shard_boxes_one(shapes, k, world, me)
            reads += len(tensor_reads(k, m.entries[k], [(o, z)]))
        times["load plan"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        summaries[me].digest()
        times["cached plan"].append(time.perf_counter() - t0)
        if rep == 0:
            idx_total = statistics.mean(len(v) for v in idx_bytes.values()) * world
            entries = _entries(shapes, world)
            sizes = {"manifest_bytes": len(top), "index_bytes": idx_total, "entries": entries,
                     "bytes_per_entry": (len(top) + idx_total) / entries, "reads": reads}
    return {"times": {k: statistics.median(v) for k, v in times.items()}, **sizes}


def shard_boxes_one(shapes: dict[str, tuple[int, ...]], key: str, world: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    s = shapes[key]
    start, count = rows(s[0], world, rank)
    return (start,) + (0,) * (len(s) - 1), (count,) + tuple(s[1:])


def simulate_dcp(shapes: dict[str, tuple[int, ...]], world: int, repeats: int) -> dict[str, Any]:
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    props = TensorProperties(dtype=torch.float32)
    plans = []
    for r in range(world):
        items = []
        for k, s in shapes.items():
            o, z = shard_boxes_one(shapes, k, world, r)
            items.append(WriteItem(index=MetadataIndex(k, torch.Size(o)), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(ChunkStorageMetadata(torch.Size(o), torch.Size(z)),
                                                               props, torch.Size(s))))
        plans.append(SavePlan(items, planner_data={k: (k,) for k in shapes}))
    times: dict[str, list[float]] = {"plan+commit": [], "read+validate": [], "load plan": []}
    size = 0
    me = 1 if world > 1 else 0
    for _ in range(repeats):
        gc.collect()
        planner = DefaultSavePlanner()
        planner.set_up_planner({}, is_coordinator=True)
        t0 = time.perf_counter()
        _, md = planner.create_global_plan(plans)
        blob = pickle.dumps(md)
        times["plan+commit"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        md2 = pickle.loads(blob)
        times["read+validate"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for k in shapes:
            o, z = shard_boxes_one(shapes, k, world, me)
            create_read_items_for_chunk_list(k, md2.state_dict_metadata[k],
                                             [ChunkStorageMetadata(torch.Size(o), torch.Size(z))])
        times["load plan"].append(time.perf_counter() - t0)
        size = len(blob)
        del md, md2, blob
    entries = _entries(shapes, world)
    return {"times": {k: statistics.median(v) for k, v in times.items()}, "manifest_bytes": size,
            "entries": entries, "bytes_per_entry": size / entries}


def _entries(shapes: dict[str, tuple[int, ...]], world: int) -> int:
    """(tensor, shard) pairs that hold data: torch.chunk makes ceil(n / ceil(n / world)) of them."""
    return sum(-(-s[0] // -(-s[0] // world)) for s in shapes.values())


def slope(xs: list[int], ys: list[float]) -> float:
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.maximum(np.asarray(ys, float), 1e-9))
    return float(np.polyfit(lx, ly, 1)[0]) if len(xs) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="8,64,512,1024,4096,8192")
    ap.add_argument("--dcp-max", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    shapes = llama7b_shapes()
    rows_out: list[dict[str, Any]] = []
    bpe: dict[str, dict[str, float]] = {"shardckpt": {}, "dcp": {}}
    for n in ranks:  # interleaved per world size: ours, then DCP's
        ours = simulate_ours(shapes, n, args.repeats)
        for phase, t in ours["times"].items():
            rows_out.append({"ranks": n, "phase": phase, "lib": "shardckpt", "seconds": t})
        bpe["shardckpt"][str(n)] = ours["bytes_per_entry"]
        line = f"N={n:>5}  shardckpt " + "  ".join(f"{p} {t:.3f}s" for p, t in ours["times"].items())
        line += f"  {ours['bytes_per_entry']:.1f} B/entry"
        if n <= args.dcp_max:
            theirs = simulate_dcp(shapes, n, args.repeats)
            for phase, t in theirs["times"].items():
                rows_out.append({"ranks": n, "phase": phase, "lib": "dcp", "seconds": t})
            bpe["dcp"][str(n)] = theirs["bytes_per_entry"]
            line += "\n         dcp       " + "  ".join(f"{p} {t:.3f}s" for p, t in theirs["times"].items())
            line += f"  {theirs['bytes_per_entry']:.1f} B/entry"
        print(line, flush=True)
    slopes: dict[str, float] = {}
    for lib in ("shardckpt", "dcp"):
        for phase in ("plan+commit", "read+validate", "load plan"):
            pts = [(r["ranks"], r["seconds"]) for r in rows_out if r["lib"] == lib and r["phase"] == phase]
            if len(pts) > 1:
                slopes[f"{lib}/{phase}"] = slope([p[0] for p in pts], [p[1] for p in pts])
    print(f"\n{len(shapes)} tensors (Llama-7B + Adam), FSDP Shard(0); {time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, one core; medians of {args.repeats}")
    print("log-log slope vs ranks (target <= 1.15 for shardckpt):")
    for k, v in slopes.items():
        print(f"  {k:<28} {v:.2f}")
    at = [r for r in rows_out if r["lib"] == "shardckpt" and r["ranks"] == 4096]
    if at:
        got = {r["phase"]: r["seconds"] for r in at}
        print(f"at 4096 ranks: plan+commit {got['plan+commit']:.2f}s (<= 3), load plan {got['load plan']:.3f}s "
              f"(<= 0.5), read+validate {got['read+validate']:.3f}s (<= 2), "
              f"{bpe['shardckpt']['4096']:.1f} B/entry (<= 64)")
    write_json({"rows": rows_out, "bytes_per_entry": bpe, "slopes": slopes, "tensors": len(shapes),
                "date": time.strftime("%Y-%m-%d")}, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
