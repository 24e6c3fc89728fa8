"""Global save planning that stays linear in world size: compact local summaries,
hash-based dedup and grid layouts, vectorized over ranks.

DCP's global planning builds, dedups and validates one Python object per
(tensor, rank) item on the coordinator, and its metadata lists every one. Here
each rank sends a ``Summary``: its items' structure (key, kind, dtype, global
shape, key path) and their boxes as two int64 arrays. The coordinator groups
ranks by structure (an FSDP job has one), handles each key's boxes across all
ranks as arrays (``np.unique`` dedups replicas, ``detect_layout`` finds the
grid), and answers each rank with an ``Assignment``: which of its items it
writes and, per item, the key number and box ordinal its index records (or
-1: the item's place is listed in the manifest itself, as for a whole tensor
or an object). The manifest's structure (``Skeleton``) is built in the same
pass. ``bench_scale.py`` drives these functions with simulated ranks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType

from ..errors import CheckpointWriteError
from ..format.grid import Layout, detect_layout
from ..format.layout import DTYPES, dtype_name
from ..io.manifest_builder import KeySpec, Skeleton

__all__ = ["Summary", "Assignment", "Skeleton", "KeySpec", "summarize", "make_summary", "structure_hash", "plan_globally"]

_GREEDY_MAX = 1024  # replicated boxes of one key balanced greedily by bytes; beyond, round-robin


@dataclass(frozen=True)
class Summary:
    """One rank's local plan, compact: ``keys[i]`` / ``specs[i]`` and the box of item ``i``."""

    keys: tuple[str, ...]
    specs: tuple[KeySpec, ...]
    offsets: np.ndarray  # (items, D) int64, zero-padded past a tensor's ndim
    sizes: np.ndarray  # (items, D)
    #: of ``keys`` and ``specs``: computed by the rank (in parallel), so the coordinator
    #: groups ranks by structure without hashing every rank's
    structure_hash: bytes

    def digest(self) -> bytes:
        """Structure and boxes: equal digests mean the same local plan (plan caching)."""
        h = hashlib.blake2b(self.structure_hash, digest_size=16)
        h.update(np.ascontiguousarray(self.offsets).tobytes())
        h.update(np.ascontiguousarray(self.sizes).tobytes())
        return h.digest()


@dataclass(frozen=True)
class Assignment:
    """The coordinator's answer to one rank: the positions (in its local plan) of the
    items it writes, with each one's key number and box ordinal (-1: listed inline)."""

    positions: np.ndarray
    key_nos: np.ndarray
    boxes: np.ndarray
    replicated: tuple[int, ...]  # positions of items other ranks hold too (replica check)


def summarize(plan: SavePlan) -> Summary:
    """A rank's DCP local plan as a ``Summary``."""
    mappings = plan.planner_data if isinstance(plan.planner_data, dict) else {}
    keys, specs, boxes = [], [], []
    for item in plan.items:
        fqn = item.index.fqn
        kp = tuple(mappings.get(fqn, (fqn,)))
        keys.append(fqn)
        if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
            specs.append(("o", "", (), kp))
            boxes.append(((), ()))
            continue
        td = item.tensor_data
        try:
            dtype = dtype_name(td.properties.dtype)
        except TypeError as e:
            raise CheckpointWriteError(f"key {fqn!r}: {e}", key=fqn) from None
        specs.append(("t", dtype, tuple(td.size), kp))
        boxes.append((tuple(td.chunk.offsets), tuple(td.chunk.sizes)))
    return make_summary(keys, specs, boxes)


def make_summary(keys: Sequence[str], specs: Sequence[KeySpec],
                 boxes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Summary:
    d = max((len(o) for o, _ in boxes), default=0)
    off = np.zeros((len(boxes), d), dtype=np.int64)
    siz = np.zeros((len(boxes), d), dtype=np.int64)
    for i, (o, s) in enumerate(boxes):
        off[i, :len(o)] = o
        siz[i, :len(s)] = s
    keys, specs = tuple(keys), tuple(specs)
    return Summary(keys, specs, off, siz, structure_hash(keys, specs))


def structure_hash(keys: tuple[str, ...], specs: tuple[KeySpec, ...]) -> bytes:
    return hashlib.blake2b(repr((keys, specs)).encode(), digest_size=16).digest()


def plan_globally(summaries: Sequence[Summary]) -> tuple[list[Assignment], Skeleton]:
    """[coordinator] Dedup, lay out and validate; one ``Assignment`` per rank."""
    world = len(summaries)
    # 1. ranks with the same structure are handled together (one group for FSDP/DDP)
    groups: dict[bytes, list[int]] = {}
    for r, s in enumerate(summaries):
        groups.setdefault(s.structure_hash, []).append(r)
    # per key: (spec, first rank, [(ranks, positions, offsets, sizes)])
    per_key: dict[str, tuple[KeySpec, int, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]] = {}
    for ranks in groups.values():
        s0 = summaries[ranks[0]]
        rk = np.asarray(ranks, dtype=np.int64)
        off = np.stack([summaries[r].offsets for r in ranks])  # (R, items, D)
        siz = np.stack([summaries[r].sizes for r in ranks])
        seen_here: set[str] = set()
        for i, (key, spec) in enumerate(zip(s0.keys, s0.specs)):
            if key in seen_here and spec[0] == "o":
                raise CheckpointWriteError(f"rank {ranks[0]} saves key {key!r} twice", key=key)
            seen_here.add(key)
            known = per_key.get(key)
            if known is None:
                known = per_key[key] = (spec, ranks[0], [])
            elif known[0] != spec:
                raise CheckpointWriteError(
                    f"key {key!r} differs between ranks: rank {known[1]} saves {_spec_text(known[0])}, "
                    f"rank {ranks[0]} {_spec_text(spec)}", key=key)
            nd = len(spec[2])
            known[2].append((rk, np.full(len(rk), i, dtype=np.int64), off[:, i, :nd], siz[:, i, :nd]))
    keys = tuple(sorted(per_key))
    loads = np.zeros(world, dtype=np.int64)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # ranks, pos, key_no, box
    replicated: list[tuple[np.ndarray, np.ndarray]] = []
    layouts: list[Layout | None] = []
    for key_no, key in enumerate(keys):
        spec, _, rows = per_key[key]
        ranks = np.concatenate([r[0] for r in rows])
        pos = np.concatenate([r[1] for r in rows])
        off = np.concatenate([r[2] for r in rows])
        siz = np.concatenate([r[3] for r in rows])
        if spec[0] == "o":
            writer = _pick(np.zeros(len(ranks), dtype=np.int64), ranks, np.ones(1, dtype=np.int64), loads, key_no)
            parts.append((ranks[writer], pos[writer], np.full(len(writer), key_no), np.full(len(writer), -1)))
            if len(ranks) > 1:
                replicated.append((ranks, pos))
            layouts.append(None)
            continue
        layout, keep, boxes = _tensor_key(key, spec, ranks, off, siz, loads, key_no, world, replicated, pos)
        layouts.append(layout)
        parts.append((ranks[keep], pos[keep], np.full(len(keep), key_no), boxes))
    assignments = _split_by_rank(world, parts, replicated)
    return assignments, Skeleton(world, keys, tuple(per_key[k][0] for k in keys), tuple(layouts))


def _tensor_key(key: str, spec: KeySpec, ranks: np.ndarray, off: np.ndarray, siz: np.ndarray,
                loads: np.ndarray, key_no: int, world: int, replicated: list[Any],
                pos: np.ndarray) -> tuple[Layout | None, np.ndarray, np.ndarray]:
    shape = np.asarray(spec[2], dtype=np.int64)
    if ((off < 0) | (siz < 0) | (off + siz > shape)).any():
        bad = int(np.nonzero(((off < 0) | (siz < 0) | (off + siz > shape)).any(axis=1))[0][0])
        raise CheckpointWriteError(f"key {key!r}: rank {int(ranks[bad])}'s slice {off[bad].tolist()}+"
                                   f"{siz[bad].tolist()} exceeds the shape {list(spec[2])}", key=key)
    volume = siz.prod(axis=1) if siz.shape[1] else np.ones(len(siz), dtype=np.int64)
    live = np.nonzero(volume > 0)[0] if math.prod(spec[2]) > 0 else np.arange(min(len(ranks), 1))
    if len(live) == 0:  # an empty tensor: one rank lists its (empty) slice
        live = np.arange(1)
    box_rows = np.concatenate([off[live], siz[live]], axis=1)
    if box_rows.shape[1] == 0:  # 0-d tensors: every copy is the one box
        uniq, first, inverse = box_rows[:1], np.zeros(1, dtype=np.int64), np.zeros(len(live), dtype=np.int64)
    else:
        uniq, first, inverse = _unique_boxes(box_rows, spec[2])
    nbytes = volume[live][first] * DTYPES[spec[1]].itemsize
    writer_rows = _pick(inverse, ranks[live], nbytes, loads, key_no)
    if len(live) > len(uniq):
        counts = np.bincount(inverse, minlength=len(uniq))
        shared = counts[inverse] > 1
        replicated.append((ranks[live][shared], pos[live][shared]))
    d = len(spec[2])
    u_off, u_siz = uniq[:, :d], uniq[:, d:]
    _check_volume(key, spec, u_siz, world)
    keep = live[writer_rows]
    whole = len(uniq) == 1 and (u_off == 0).all() and (u_siz[0] == shape).all()
    found = None if whole or d == 0 or math.prod(spec[2]) == 0 else detect_layout(
        spec[2], u_off, u_siz, ranks[keep])
    if found is None:
        if not whole:  # a grid's cells are disjoint by construction; listed boxes are checked
            _check_disjoint(key, u_off, u_siz)
        return None, keep, np.full(len(keep), -1)
    layout, order = found
    return layout, keep, order


def _unique_boxes(rows: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(rows, axis=0)`` (sorted rows, first index, inverse), fast: boxes are
    keyed by their offsets as one integer (mixed radix over the shape), and rows
    sharing offsets must then share sizes too; else the general row-wise unique."""
    d = len(shape)
    radix = [n + 1 for n in shape]
    if math.prod(radix) < 2**62:
        key = np.zeros(len(rows), dtype=np.int64)
        for k in range(d):
            key = key * radix[k] + rows[:, k]
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        if (rows[first][inverse] == rows).all():
            return rows[first], first, inverse
    uniq, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return uniq, first, inverse.reshape(-1)


def _pick(inverse: np.ndarray, holders: np.ndarray, nbytes: np.ndarray, loads: np.ndarray,
          salt: int) -> np.ndarray:
    """For each unique box (``inverse`` maps rows to boxes), the row whose rank writes it:
    the least-loaded holder by bytes (as DCP's dedup), round-robin for very many."""
    n = len(nbytes)
    if len(inverse) == n:  # nothing replicated: every row is its own box
        np.add.at(loads, holders, nbytes[inverse])
        out = np.empty(n, dtype=np.int64)
        out[inverse] = np.arange(n)
        return out
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(n))
    counts = np.diff(np.append(starts, len(inverse)))
    if n <= _GREEDY_MAX:
        out = np.empty(n, dtype=np.int64)
        for b in range(n):
            rows = order[starts[b]:starts[b] + counts[b]]
            pick = rows[int(np.argmin(loads[holders[rows]]))]
            loads[holders[pick]] += nbytes[b]
            out[b] = pick
        return out
    out = order[starts + (np.arange(n) + salt) % counts]
    np.add.at(loads, holders[out], nbytes)
    return out


def _check_volume(key: str, spec: KeySpec, siz: np.ndarray, world: int) -> None:
    """When several ranks save, the stored boxes fill the tensor (DCP's rule)."""
    total = int(siz.prod(axis=1).sum()) if siz.shape[1] else len(siz)
    if world > 1 and total != math.prod(spec[2]) and math.prod(spec[2]) > 0:
        raise CheckpointWriteError(f"key {key!r}: the ranks' slices hold {total} elements, the shape "
                                   f"{list(spec[2])} has {math.prod(spec[2])} (overlapping or missing slices)",
                                   key=key)


def _check_disjoint(key: str, off: np.ndarray, siz: np.ndarray) -> None:
    if len(off) > 1 and off.shape[1]:
        # sweep along dim 0: boxes sorted by start; a box may only meet those still open
        order = np.argsort(off[:, 0], kind="stable")
        active: list[int] = []
        for i in order:
            active = [a for a in active if off[a, 0] + siz[a, 0] > off[i, 0]]
            for a in active:
                if ((off[a] < off[i] + siz[i]) & (off[i] < off[a] + siz[a])).all():
                    raise CheckpointWriteError(f"key {key!r}: slices {off[a].tolist()}+{siz[a].tolist()} and "
                                               f"{off[i].tolist()}+{siz[i].tolist()} overlap", key=key)
            active.append(int(i))


def _split_by_rank(world: int, parts: list[Any], replicated: list[Any]) -> list[Assignment]:
    cols = [np.concatenate([p[c] for p in parts]) if parts else np.zeros(0, dtype=np.int64) for c in range(4)]
    ranks, pos, key_nos, boxes = cols
    # by rank, then by position in the rank's own plan (its shard file keeps the
    # state_dict's order): one integer key, one stable (radix) sort
    order = np.argsort(ranks * (int(pos.max(initial=0)) + 1) + pos, kind="stable")
    ranks, pos, key_nos, boxes = ranks[order], pos[order], key_nos[order], boxes[order]
    cut = np.searchsorted(ranks, np.arange(world + 1))
    rep_r = np.concatenate([r for r, _ in replicated]) if replicated else np.zeros(0, dtype=np.int64)
    rep_p = np.concatenate([p for _, p in replicated]) if replicated else np.zeros(0, dtype=np.int64)
    rep_order = np.lexsort((rep_p, rep_r))
    rep_r, rep_p = rep_r[rep_order], rep_p[rep_order]
    rep_cut = np.searchsorted(rep_r, np.arange(world + 1))
    return [Assignment(pos[cut[r]:cut[r + 1]].astype(np.int32), key_nos[cut[r]:cut[r + 1]].astype(np.int32),
                       boxes[cut[r]:cut[r + 1]].astype(np.int32),
                       tuple(int(x) for x in rep_p[rep_cut[r]:rep_cut[r + 1]]))
            for r in range(world)]


def _spec_text(spec: KeySpec) -> str:
    kind, dtype, shape, _ = spec
    return "a non-tensor value" if kind == "o" else f"a {dtype} tensor of shape {list(shape)}"
