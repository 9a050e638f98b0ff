"""ARCHITECTURE.md §6 import rules, checked on the source's AST."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORE = ["config", "types", "clock", "deadline", "admission", "scheduler", "session"]


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def top(name: str) -> str:
    return name.split(".")[0]


def sources(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_orchestrator_core_imports_no_torch_ray_grpc():
    present = [ROOT / "orchestrator" / f"{name}.py" for name in CORE]
    present = [p for p in present if p.exists()]
    assert ROOT / "orchestrator" / "config.py" in present
    for path in present:
        bad = {m for m in imported_modules(path) if top(m) in {"torch", "ray", "grpc", "workers", "kernels"}}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_workers_import_only_orchestrator_config_and_types():
    allowed = {"orchestrator", "orchestrator.config", "orchestrator.types"}
    for path in sources("workers"):
        bad = {m for m in imported_modules(path) if top(m) == "orchestrator" and m not in allowed}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_kernels_import_only_torch_triton_and_stdlib():
    for path in sources("kernels"):
        bad = {m for m in imported_modules(path)
               if top(m) in {"workers", "orchestrator", "protos", "ray", "grpc", "numpy"}}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
