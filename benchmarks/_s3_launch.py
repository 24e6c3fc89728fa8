"""One launcher for the benchmarks whose ranks talk to a moto S3 endpoint: start
the endpoint (in this process, so it outlives every rank) and a bucket, run the
script's ``--worker`` ranks under ``torchrun --standalone``, return the JSON the
ranks wrote. Rank chatter goes to stderr so stdout carries only the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from typing import Any

__all__ = ["run_ranks_on_s3", "write_json"]

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_ranks_on_s3(script: str, ranks: int, worker_args: list[str], prefix: str,
                    tmp_dir: str | None = None, omp_threads: int | None = None) -> dict[str, Any]:
    """Run ``script --worker <worker_args> --endpoint URL --bucket B --out F [--tmp DIR]`` on
    ``ranks`` ranks; exits 2 if they fail. ``{tmp}`` in ``worker_args`` is the scratch dir."""
    from tests.s3util import S3Endpoint

    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    with S3Endpoint() as endpoint, tempfile.TemporaryDirectory(prefix=prefix, dir=tmp_dir) as tmp:
        endpoint.make_bucket(bucket)
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               os.path.abspath(script), "--worker", *[a.replace("{tmp}", tmp) for a in worker_args],
               "--endpoint", endpoint.url, "--bucket", bucket, "--out", out]
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(omp_threads or max(1, (os.cpu_count() or 1) // ranks))
        env["PYTHONPATH"] = _REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        print(f"moto S3 server {endpoint.url} (pid {os.getpid()}), bucket {bucket}", file=sys.stderr)
        rc = subprocess.run(cmd, stdout=sys.stderr, env=env).returncode
        if rc != 0:
            print(f"benchmark ranks failed (torchrun exit status {rc}); see above", file=sys.stderr)
            sys.exit(2)
        with open(out) as f:
            data = json.load(f)
        endpoint.delete_bucket(bucket)
    return data


def write_json(result: dict[str, Any], path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results written to {path}")
