"""Copy checkpoint directories between ranks over a gloo group (point to point).

Used for peer replicas (each rank sends its local step to the ranks holding
its copies) and for restoring a replaced node (a holder sends the shard to the
rank that needs it). Every transfer is one directory: a header (JSON: the data
files' names and sizes, and the manifest's bytes), then the data files' bytes
as one stream cut into pieces of ``PIECE_BYTES``. The receiver writes the data files
(durable on close), publishes the manifest last with the backend's commit
strategy, then verifies every chunk's CRC32C: a copy counts only once it
verified.

Call order (every rank of ``group`` calls ``transfer`` at the same point, with
the sends and receives that pair up: rank a sends to b exactly when b receives
from a):

1. [all] size of each header out / in (one int64 each), then the headers;
2. [all] piece k of every transfer that has one, all posted before any wait,
   for k = 0, 1, ...: no rank waits on a message its peer has not posted yet
   (by induction on k), so any set of pairs completes;
3. [receivers] manifest published, directory verified.

A rank that cannot read its files still sends (zeros) and a receiver that
cannot write still receives, so no peer is left waiting; each reports its
error, and the caller's status gather (``_dist.Group.run``) fails the step on
every rank, naming the rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ...backends import ShardFile, Storage
from ...errors import CheckpointWriteError
from ...format import jsoncodec
from ...format.manifest import DATA_DIR, MANIFEST_NAME
from ...store import CheckpointDir, commit_strategy, verify_dir

__all__ = ["Send", "Receive", "transfer", "PIECE_BYTES"]

#: Bytes per message: large enough to stream at loopback/NIC speed, small enough
#: that a transfer's buffers stay small.
PIECE_BYTES = 32 << 20


@dataclass
class Send:
    peer: int  # rank in the group
    source: CheckpointDir


@dataclass
class Receive:
    peer: int
    target: CheckpointDir
    error: BaseException | None = field(default=None)


def _header(src: CheckpointDir) -> tuple[bytes, list[tuple[str, int]]]:
    s = src.storage
    files = sorted((f"{DATA_DIR}/{n}", s.size(f"{DATA_DIR}/{n}")) for n in s.listdir(DATA_DIR))
    doc = {"files": files, "manifest": s.read_bytes(MANIFEST_NAME).decode("latin-1")}
    return jsoncodec.encode(doc, tuples=True), files


def _exchange(group: dist.ProcessGroup, out: list[tuple[int, torch.Tensor]],
              into: list[tuple[int, torch.Tensor]]) -> None:
    works = [dist.isend(t, dist.get_global_rank(group, p), group=group) for p, t in out]
    works += [dist.irecv(t, dist.get_global_rank(group, p), group=group) for p, t in into]
    for w in works:
        if w is not None:  # None only for a rank outside the group, which never calls this
            w.wait()


def _bytes_of(buf: torch.Tensor) -> memoryview:
    return memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers


class _Stream:
    """One transfer's data files as a byte stream, read (send) or written (receive)."""

    def __init__(self, storage: Storage, files: list[tuple[str, int]]) -> None:
        self.storage, self.files = storage, files
        self.total = sum(n for _, n in files)
        self.pos = 0
        self.error: BaseException | None = None
        self._writer: ShardFile | None = None
        self._open_index = -1

    def pieces(self) -> int:
        return -(-self.total // PIECE_BYTES)

    def _spans(self, n: int) -> list[tuple[int, str, int, int, int]]:
        """(file index, name, offset in file, offset in piece, length) covering [pos, pos+n)."""
        out: list[tuple[int, str, int, int, int]] = []
        start, at = 0, self.pos
        for i, (name, size) in enumerate(self.files):
            if at < start + size and at + n > start and n > 0:
                lo = max(at, start)
                take = min(at + n, start + size) - lo
                out.append((i, name, lo - start, lo - at, take))
            start += size
        return out

    def read(self, buf: torch.Tensor) -> int:
        n = min(PIECE_BYTES, self.total - self.pos)
        mv = _bytes_of(buf)
        for _, name, off, boff, take in self._spans(n):
            if self.error is None:
                try:
                    reader = self.storage.open_reader(name)
                    try:
                        reader.read_into(off, mv[boff:boff + take])
                    finally:
                        reader.close()
                except Exception as e:  # noqa: BLE001 - the peer still gets its bytes
                    self.error = e
        self.pos += n
        return n

    def write(self, buf: torch.Tensor, n: int) -> None:
        mv = _bytes_of(buf)
        for i, name, _, boff, take in self._spans(n):
            if self.error is not None:
                break
            try:
                if i != self._open_index:
                    self._finish_file()
                    self._writer, self._open_index = self.storage.open_writer(name), i
                if self._writer is not None:
                    self._writer.write(mv[boff:boff + take])
            except Exception as e:  # noqa: BLE001 - keep receiving: the sender must not hang
                self.error = e
        self.pos += n

    def _finish_file(self) -> None:
        if self._writer is not None:
            w, self._writer = self._writer, None
            w.close()

    def close(self) -> None:
        try:
            if self.error is None:
                self._finish_file()
                # files the stream never opened (empty ones)
                for name, size in self.files:
                    if size == 0 and not self.storage.exists(name):
                        self.storage.put(name, b"")
        except Exception as e:  # noqa: BLE001
            self.error = e
        if self.error is not None and self._writer is not None:
            self._writer.abort()


def transfer(group: dist.ProcessGroup, sends: list[Send], receives: list[Receive]) -> list[BaseException]:
    """Run this rank's part of a directory exchange; return the errors it hit (its
    own files unreadable, a received copy unwritable or failing verification)."""
    errors: list[BaseException] = []
    headers: list[bytes] = []
    outs: list[_Stream] = []
    for s in sends:
        try:
            h, listed = _header(s.source)
        except Exception as e:  # noqa: BLE001 - send an empty header: the peer records a failure
            errors.append(e)
            h, listed = b"", []
        headers.append(h)
        outs.append(_Stream(s.source.storage, listed))
    sizes_in = [(r.peer, torch.zeros(1, dtype=torch.int64)) for r in receives]
    _exchange(group, [(s.peer, torch.tensor([len(h)], dtype=torch.int64)) for s, h in zip(sends, headers)], sizes_in)
    heads_in = [(p, torch.empty(int(t.item()), dtype=torch.uint8)) for p, t in sizes_in]
    _exchange(group, [(s.peer, torch.frombuffer(bytearray(h), dtype=torch.uint8)) for s, h in zip(sends, headers)
                      if h], [(p, t) for p, t in heads_in if t.numel()])
    ins: list[_Stream] = []
    manifests: list[bytes | None] = []
    for r, (_, t) in zip(receives, heads_in):
        files: list[tuple[str, int]] = []
        manifest = None
        try:
            if not t.numel():
                raise CheckpointWriteError(f"rank {r.peer} could not read the shard it was to send to "
                                           f"{r.target.url}")
            doc = jsoncodec.decode(bytes(t.numpy()))
            files = [(str(n), int(z)) for n, z in doc["files"]]
            manifest = doc["manifest"].encode("latin-1")
            if r.target.storage.exists():
                r.target.delete()  # a stale copy of this step (a re-save): replaced, never mixed
            r.target.storage.makedirs(DATA_DIR)
        except Exception as e:  # noqa: BLE001
            r.error = e
        manifests.append(manifest)
        stream = _Stream(r.target.storage, files)
        stream.error = r.error
        ins.append(stream)
    bufs_out = [torch.empty(PIECE_BYTES, dtype=torch.uint8) for _ in outs]
    bufs_in = [torch.empty(PIECE_BYTES, dtype=torch.uint8) for _ in ins]
    for k in range(max([s.pieces() for s in outs + ins], default=0)):
        out = [(s.peer, b[:st.read(b)]) for s, st, b in zip(sends, outs, bufs_out) if k < st.pieces()]
        into = [(r.peer, b[:min(PIECE_BYTES, st.total - st.pos)], st)
                for r, st, b in zip(receives, ins, bufs_in) if k < st.pieces()]
        _exchange(group, out, [(p, b) for p, b, _ in into])
        for _, b, st in into:
            st.write(b, b.numel())
    errors += [st.error for st in outs if st.error is not None]
    for r, st, manifest in zip(receives, ins, manifests):
        st.close()
        try:
            if st.error is not None:
                raise st.error
            if manifest is None:
                raise CheckpointWriteError("no manifest received")
            r.target.storage.sync_dir(DATA_DIR)
            commit_strategy(r.target.storage).publish(r.target.storage, MANIFEST_NAME, manifest)
            verify_dir(r.target)
        except Exception as e:  # noqa: BLE001 - reported by the caller's status gather
            errors.append(CheckpointWriteError(f"copy of rank {r.peer}'s shard at {r.target.url}: "
                                               f"{type(e).__name__}: {e}"))
    return errors
