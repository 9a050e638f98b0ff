"""`pip install .` gives a working `streamgen`: the wheel's build step generates the gRPC modules, the wheel
carries them, the console script and the demo model's weights, and grpcio-tools is needed only to build.

The wheel is built from a copy of the source without generated modules, without build isolation (which would
download setuptools and grpcio-tools), so the test runs offline with the test environment's build tools.
"""

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("protos/streamgen/v1/stream_pb2.py", "protos/streamgen/v1/stream_pb2_grpc.py")


def _source_copy(dest: Path) -> Path:
    """The project as a clean clone has it: no venv, build outputs or generated modules."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "out", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", "*_pb2*.py", "*_pb2*.pyi")
    shutil.copytree(ROOT, dest, ignore=ignore)
    assert not list((dest / "protos").rglob("*_pb2*.py"))
    return dest


def _build_wheel(tmp_path: Path) -> Path:
    src = _source_copy(tmp_path / "src")
    out = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = out.glob("streamgen-*.whl")
    return wheel


def _requirements(metadata: str) -> dict[str, str]:
    """Runtime Requires-Dist lines (no extra marker) by lower-cased project name."""
    reqs = {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            spec = line.split(":", 1)[1].strip()
            name = spec.split(";")[0].replace(" ", "")
            reqs[name.split("[")[0].split("=")[0].split(">")[0].split("<")[0].split("~")[0].lower()] = spec
    return reqs


def test_wheel_carries_generated_modules_and_console_script_and_runs_from_them(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        page = tuple(f"orchestrator/static/{name}" for name in ("index.html", "page.js", "page.css"))
        shipped = GENERATED + ("protos/streamgen/v1/stream.proto", "workers/weights/demo.pt") + page
        for path in shipped:  # the browser page ships as it is, the demo weights too
            assert path in names, sorted(names)
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        site = tmp_path / "site"
        zf.extractall(site)
    assert "[console_scripts]" in entry_points and "streamgen = orchestrator.cli:main" in entry_points
    reqs = _requirements(metadata)
    assert "grpcio-tools" not in reqs, reqs  # build-time only
    for name in ("pydantic", "pyyaml", "grpcio", "protobuf", "torch", "aiohttp"):
        assert name in reqs, (name, reqs)
    assert reqs["torch"].replace(" ", "") == "torch==2.13.0"

    # From the unpacked wheel alone (it comes first on sys.path; cwd is elsewhere): the generated stubs import
    # against the installed grpcio / protobuf, and the console script's entry point prints the CLI's help.
    check = f"""
import sys
sys.path.insert(0, {str(site)!r})
from importlib.metadata import distributions
from protos.streamgen.v1 import stream_pb2, stream_pb2_grpc
import orchestrator.cli
for mod in (stream_pb2, stream_pb2_grpc, orchestrator.cli):
    assert mod.__file__.startswith({str(site)!r}), mod.__file__
(dist,) = [d for d in distributions(path=[{str(site)!r}]) if d.metadata["Name"] == "streamgen"]
(ep,) = [e for e in dist.entry_points if e.group == "console_scripts" and e.name == "streamgen"]
assert stream_pb2.GenerateRequest(prompt="x").prompt == "x"
assert hasattr(stream_pb2_grpc, "StreamServiceStub")
import os
from workers.config import GenerationConfig
weights, use_ema = GenerationConfig().checkpoint()  # the default model's shipped weights, found in the install
assert weights.startswith({str(site)!r}) and os.path.isfile(weights) and use_ema, weights
sys.exit(ep.load()(["--help"]))
"""
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: streamgen" in proc.stdout and "serve" in proc.stdout, proc.stdout


def test_nothing_outside_the_build_step_imports_grpc_tools():
    """grpcio-tools is not a runtime dependency, so no shipped module but the build script may import it."""
    offenders = []
    for package in ("orchestrator", "workers", "streamgen_kernels", "protos"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "protos" / "build.py" or "_pb2" in path.name:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "grpc_tools"]
    assert offenders == []


def test_no_top_level_package_we_ship_is_another_installed_distributions():
    """Each top-level import name the wheel installs belongs to streamgen alone in this environment: a name that
    another installed distribution also provides would overwrite its files on `pip install .` and shadow it from
    the checkout (transformers 5.25 pulled in Hugging Face's `kernels`, which our `kernels/` package shadowed)."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    ours = {p.split(".")[0] for p in packages}
    providers = importlib.metadata.packages_distributions()
    taken = {name: sorted(set(providers.get(name, [])) - {"streamgen"}) for name in sorted(ours)}
    assert all(not dists for dists in taken.values()), f"import names also provided by: {taken}"
