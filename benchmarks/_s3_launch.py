"""One launcher for the benchmarks whose ranks talk to a moto S3 endpoint: start
the endpoint (in this process, so it outlives every rank) and a bucket, run the
script's ``--worker`` ranks under ``torchrun --standalone``, return the JSON the
ranks wrote. Rank chatter goes to stderr so stdout carries only the report.
:func:`add_worker_flags` declares the hidden flags the ranks are given."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from typing import Any

from benchmarks._common import torchrun

__all__ = ["add_worker_flags", "run_ranks_on_s3"]


def add_worker_flags(ap: argparse.ArgumentParser, *extra: str) -> None:
    """Hidden flags of a script's rank mode: ``--worker`` and what :func:`run_ranks_on_s3`
    passes (``--endpoint``, ``--bucket``, ``--out``), plus ``extra`` string flags."""
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--endpoint", "--bucket", "--out", *extra):
        ap.add_argument(flag, help=argparse.SUPPRESS)


def run_ranks_on_s3(script: str, ranks: int, worker_args: list[str], prefix: str,
                    tmp_dir: str | None = None, omp_threads: int | None = None) -> dict[str, Any]:
    """Run ``script --worker <worker_args> --endpoint URL --bucket B --out F [--tmp DIR]`` on
    ``ranks`` ranks; exits 2 if they fail. ``{tmp}`` in ``worker_args`` is the scratch dir."""
    from tests.s3util import S3Endpoint

    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    with S3Endpoint() as endpoint, tempfile.TemporaryDirectory(prefix=prefix, dir=tmp_dir) as tmp:
        endpoint.make_bucket(bucket)
        out = os.path.join(tmp, "result.json")
        args = ["--worker", *[a.replace("{tmp}", tmp) for a in worker_args],
                "--endpoint", endpoint.url, "--bucket", bucket, "--out", out]  # fmt: skip
        print(f"moto S3 server {endpoint.url} (pid {os.getpid()}), bucket {bucket}", file=sys.stderr)
        rc = torchrun(script, ranks, args, omp_threads=omp_threads, check=False)
        if rc != 0:
            print(f"benchmark ranks failed (torchrun exit status {rc}); see above", file=sys.stderr)
            sys.exit(2)
        with open(out) as f:
            data = json.load(f)
        endpoint.delete_bucket(bucket)
    return data
