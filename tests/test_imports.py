"""Imports point down the layers written in docs/architecture.md; this test keeps them that way."""

from __future__ import annotations

import ast
from pathlib import Path

import lserve

PACKAGE = Path(lserve.__file__).parent
BASE = {"config", "errors", "sampling_params", "request"}
# what each layer may import from lserve besides the base modules
ALLOWED: dict[str, set[str]] = {
    "kv_cache": set(),
    "ops": {"kv_cache"},  # the kernels write and read the cache's formats (kv_cache/fp8.py)
    "model": {"ops"},  # fused elementwise kernels (ops/fused_layers.py) on CUDA
    "sparse": {"ops", "kv_cache"},
    "attention": {"ops", "kv_cache", "sparse"},
    "runner": {"ops", "kv_cache", "sparse", "attention", "model"},
    "engine": {"ops", "kv_cache", "sparse", "attention", "model", "runner"},
    "entrypoints": {"ops", "kv_cache", "sparse", "attention", "model", "runner", "engine"},
    "eval": {"ops", "kv_cache", "sparse", "attention", "model", "runner", "engine"},
    "bench": {"ops", "kv_cache", "sparse", "attention", "model", "runner", "engine", "eval"},
    # offline tool beside the engine: runs the bare model with its own attention callables; the
    # page-score step scores with the attention backends' own functions and answers eval's tasks
    "calibration": {"model", "sparse", "engine", "attention", "eval"},
}


def _lserve_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lserve" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_layers_import_only_downwards() -> None:
    bad = []
    for layer, allowed in ALLOWED.items():
        for path in (PACKAGE / layer).rglob("*.py"):
            for target in _lserve_imports(path) - BASE - allowed - {layer}:
                bad.append(f"{path.relative_to(PACKAGE)} imports lserve.{target}")
    assert not bad, "\n".join(bad)


def test_base_modules_import_no_layer() -> None:
    for name in BASE:
        assert _lserve_imports(PACKAGE / f"{name}.py") <= BASE, name
