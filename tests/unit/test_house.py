"""The package's shape, read from its source (docs/DESIGN.md, "The house"):

- at most 6 modules at the package root besides ``__init__``/``__main__``;
- no module over 500 lines, no function over 80, in ``shardckpt/`` and ``benchmarks/``;
- imports run one way: no module imports from a layer above its own;
- no ``_private`` name or module imported from another package (folder);
- canonical JSON (``json.dumps(sort_keys=...)``) written in one module;
- torch's private APIs used in one module (``compat``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

PKG = REPO_ROOT / "shardckpt"

#: Layers, lowest first: a module may import its own layer and those below.
LAYERS: list[set[str]] = [
    {"errors", "knobs", "compat"},
    {"collectives", "native"},
    {"backends"},
    {"format"},
    {"store"},
    {"io"},
    {"dcp"},
    {"engine"},
    # entry points: they use one another (cli over tools and converters, manager over api)
    {"api", "state", "manager", "tools", "converters", "cli", "demo", "storage", "__init__", "__main__",
     "integrations", "lightning", "transformers", "accelerate", "mmengine", "torchtitan"},
]
LAYER_OF = {name: n for n, names in enumerate(LAYERS) for name in names}


def _sources(base: Path) -> list[Path]:
    return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


def _unit(path: Path) -> str:
    """The top-level unit (package folder or root module) ``path`` belongs to."""
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else Path(rel[0]).stem


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every ``from shardckpt... import``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
                base = base[: len(base) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "shardckpt":
                out.append((node.lineno, module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "shardckpt"]
    return out


def _target_unit(module: str, names: list[str]) -> list[str]:
    parts = module.split(".")[1:]
    if parts:
        return [parts[0]]
    return names  # ``from shardckpt import knobs`` / ``from .. import knobs``


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in _sources(PKG)}
    assert units <= set(LAYER_OF), f"no layer for {sorted(units - set(LAYER_OF))}: add it to LAYERS and DESIGN.md"


def test_at_most_six_root_modules():
    root = [p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(root) <= 6, root


@pytest.mark.parametrize("base", ["shardckpt", "benchmarks"])
def test_module_and_function_sizes(base: str):
    long_modules, long_functions = [], []
    for path in _sources(REPO_ROOT / base):
        src = path.read_text()
        if src.count("\n") + 1 > 500:
            long_modules.append(str(path.relative_to(REPO_ROOT)))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_imports_run_one_way_and_privates_stay_home():
    upward, private = [], []
    for path in _sources(PKG):
        unit, here = _unit(path), path.parent
        for line, module, names in _imports(path):
            where = f"{path.relative_to(REPO_ROOT)}:{line} {module}"
            for target in _target_unit(module, names):
                if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[unit]:
                    upward.append(f"{where} ({unit} -> {target})")
            target_dir = REPO_ROOT.joinpath(*module.split("."))
            target_dir = target_dir if target_dir.is_dir() else target_dir.parent
            if target_dir != here and (any(_private(p) for p in module.split(".")) or any(map(_private, names))):
                private.append(where)
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)
    assert not private, "private names imported across packages:\n" + "\n".join(private)


def test_one_canonical_json_writer_and_one_torch_compat_module():
    canonical, torch_private = set(), set()
    for path in _sources(PKG):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "dumps":
                if any(k.arg == "sort_keys" for k in node.keywords):
                    canonical.add(path.name)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
                if any(_private(p) for p in node.module.split(".")) or any(_private(a.name) for a in node.names):
                    torch_private.add(path.name)
    assert canonical == {"jsoncodec.py"}, canonical
    assert torch_private <= {"compat.py"}, torch_private
