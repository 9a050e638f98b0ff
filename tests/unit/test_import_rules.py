"""ARCHITECTURE.md §6 import rules, checked on the source's AST.

Imports point one way: orchestrator/ -> workers/ -> streamgen_kernels/. The orchestrator's core modules (and its
config, which composes the data-plane config from workers/config.py) load neither torch, ray nor grpc.
"""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Torch-, Ray- and gRPC-free control-plane modules; "autoscale" is the autoscaling policy (any of its names).
CORE = ["config", "types", "clock", "deadline", "admission", "autoscale", "autoscaling", "autoscaler", "session",
        "quota", "tokens", "audit"]
HEAVY = {"torch", "ray", "grpc"}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute module names a file imports (``from x import y`` also yields ``x.y``: y may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            # A relative import resolves inside the file's own package: keep its top-level package.
            package = path.relative_to(ROOT).parts[0]
            out.add(f"{package}.{node.module or ''}".rstrip("."))
    return out


def top(name: str) -> str:
    return name.split(".")[0]


def sources(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_rules_see_imports_of_every_form(tmp_path):
    sample = ROOT / "orchestrator" / "config.py"
    assert "workers.config" in imported_modules(sample)
    fake = tmp_path / "f.py"
    fake.write_text("import torch.nn\nfrom ray import serve\ndef f():\n    import grpc\n")
    assert {"torch.nn", "ray", "ray.serve", "grpc"} <= imported_modules(fake)


def test_orchestrator_core_imports_no_torch_ray_grpc():
    present = [ROOT / "orchestrator" / f"{name}.py" for name in CORE]
    present = [p for p in present if p.exists()]
    assert {ROOT / "orchestrator" / f"{name}.py" for name in ("config", "admission", "deadline", "session")} \
        <= set(present)
    for path in present:
        bad = {m for m in imported_modules(path) if top(m) in HEAVY | {"streamgen_kernels"}
               or (top(m) == "workers" and m != "workers" and not (m + ".").startswith("workers.config."))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_data_plane_config_is_a_leaf():
    """workers/config.py is what the control plane's core may import: it imports no other project module."""
    bad = {m for m in imported_modules(ROOT / "workers" / "config.py")
           if top(m) in HEAVY | {"orchestrator", "workers", "streamgen_kernels", "protos"}}
    assert not bad, f"workers/config.py imports {sorted(bad)}"


def test_orchestrator_config_loads_without_torch_ray_grpc():
    """Checked in a fresh interpreter, so package __init__ files and re-exports count too."""
    code = ("import sys, orchestrator.config, orchestrator.admission; "
            f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_workers_never_import_orchestrator():
    for path in sources("workers"):
        bad = {m for m in imported_modules(path) if top(m) == "orchestrator"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_kernels_import_only_torch_triton_and_stdlib():
    for path in sources("streamgen_kernels"):
        bad = {m for m in imported_modules(path)
               if top(m) in {"workers", "orchestrator", "protos", "ray", "grpc", "numpy"}}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
