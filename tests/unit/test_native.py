"""The one native loader (``shardckpt.native.loader``) for the three kernel families:
the compiled kernels are active (CI builds them), and each family's fallback
warns exactly once however many of its functions run, whether forced by its
environment variable or because the extension cannot be imported.

Kernel-specific checks (known answers, edge cases, each CPU path) stay in
test_checksum.py, test_codec.py and test_staging.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

import shardckpt.native as native
from shardckpt.native import bytegroup, copy, crc32c


@dataclass(frozen=True)
class Family:
    name: str  # key in native.implementation()
    module: object
    ext: str  # compiled module
    force_env: str
    fallback: str  # implementation() without the extension
    compiled_paths: frozenset[str]  # what the extension may report
    exercise: str  # child-process code calling every function of the family through `m`


FAMILIES = [
    Family("crc32c", crc32c, "_crc32c", "SHARDCKPT_FORCE_SOFTWARE_CRC", "software",
           frozenset({"vpclmulqdq", "pclmulqdq+sse4.2", "sse4.2", "table"}),
           """
           assert m.crc32c(b"123456789") == 0xE3069283
           assert m.crc32c_combine(m.crc32c(b"1234"), m.crc32c(b"56789"), 5) == 0xE3069283
           assert m.crc32c(b"") == 0 and m.crc32c(bytes(32)) == 0x8A9136AA
           """),
    Family("bytegroup", bytegroup, "_bytegroup", "SHARDCKPT_FORCE_NUMPY_BYTEGROUP", "numpy",
           frozenset({"avx512vbmi", "avx2", "scalar"}),
           """
           src, planes, back = bytes(range(8)), bytearray(8), bytearray(8)
           m.group(src, planes, 4)
           assert bytes(planes) == bytes([0, 4, 1, 5, 2, 6, 3, 7])
           m.ungroup(bytes(planes), back, 4)
           assert bytes(back) == src
           back2 = bytearray(8)
           m.ungroup_planes([bytes(planes[i * 2:i * 2 + 2]) for i in range(4)], back2)
           assert bytes(back2) == src
           m.group(b"", bytearray(0), 2)
           """),
    Family("copy", copy, "_copy", "SHARDCKPT_FORCE_NUMPY_COPY", "numpy",
           frozenset({"avx512", "avx2", "memcpy"}),
           """
           d = bytearray(5)
           m.copy(d, b"hello")
           m.copy_many([d], [b"world"])
           assert d == b"world"
           m.copy(bytearray(0), b"")
           """),
]


def _forced() -> bool:
    """A fallback forced for some family, or allowed (``SHARDCKPT_ALLOW_SOFTWARE_KERNELS``)."""
    names = [f.force_env for f in FAMILIES] + ["SHARDCKPT_ALLOW_SOFTWARE_KERNELS"]
    return any(os.environ.get(n, "").lower() in ("1", "true", "yes", "on") for n in names)


@pytest.fixture(params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request) -> Family:
    return request.param


def test_compiled_kernels_are_active(family: Family):
    """Fails (does not skip) when an extension is missing: CI must build them."""
    if _forced():
        pytest.skip("a fallback is forced or allowed (SHARDCKPT_FORCE_* / SHARDCKPT_ALLOW_SOFTWARE_KERNELS)")
    assert family.module.is_compiled(), f"shardckpt.native.{family.ext} is not built (pip install -e .)"
    impl = family.module.implementation()
    assert impl.startswith("compiled:") and impl.split(":", 1)[1] in family.compiled_paths, impl
    assert native.implementation()[family.name] == impl


def test_package_reports_every_family():
    assert set(native.implementation()) == {f.name for f in FAMILIES}
    assert native.is_compiled() == all(f.module.is_compiled() for f in FAMILIES)


def _child(family: Family, prelude: str, **env: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(prelude) + textwrap.dedent(f"""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from shardckpt.native import {family.name} as m
            print("IMPL", m.implementation(), m.is_compiled())
            for _ in range(3):
        """) + textwrap.indent(textwrap.dedent(family.exercise), " " * 8) + textwrap.dedent("""
        slow = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        print("COUNT", len(slow))
        print("MSG", slow[0].message if slow else "")
        """)
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_forced_fallback_warns_exactly_once(family: Family):
    proc = _child(family, "", **{family.force_env: "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"IMPL {family.fallback} False" in proc.stdout, proc.stdout
    assert "COUNT 1" in proc.stdout, proc.stdout
    assert family.force_env in proc.stdout and "slow" in proc.stdout


def test_missing_extension_falls_back_with_one_warning(family: Family):
    prelude = f"""
        import sys
        sys.modules["shardckpt.native.{family.ext}"] = None  # import fails, as if never built
        """
    proc = _child(family, prelude, **{family.force_env: ""})
    assert proc.returncode == 0, proc.stderr
    assert f"IMPL {family.fallback} False" in proc.stdout, proc.stdout
    assert "COUNT 1" in proc.stdout and "could not be imported" in proc.stdout, proc.stdout


def test_force_variable_off_uses_the_extension(family: Family):
    if not family.module.is_compiled():
        pytest.skip("extension not built")
    proc = _child(family, "", **{family.force_env: "0"})
    assert proc.returncode == 0, proc.stderr
    assert "IMPL compiled:" in proc.stdout and "COUNT 0" in proc.stdout, proc.stdout
