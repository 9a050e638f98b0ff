"""Build the Python gRPC modules from protos/streamgen/v1/*.proto (grpcio-tools). Idempotent.

Run by the package build (setup.py's build_py, so `pip install .` and `pip install -e .` both generate them) and,
if the modules are missing or older than their .proto, by the test suite's conftest. grpcio-tools is a build-time
(and test-extra) dependency only: nothing imports this module at run time.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "streamgen" / "v1"


def stale() -> list[pathlib.Path]:
    out = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        gen = proto.with_name(proto.stem + "_pb2.py")
        if not gen.exists() or gen.stat().st_mtime < proto.stat().st_mtime:
            out.append(proto)
    return out


def build(force: bool = False) -> None:
    protos = sorted(PROTO_DIR.glob("*.proto")) if force else stale()
    if not protos:
        return
    from grpc_tools import protoc

    # -I at the repo root: generated imports read `from protos.streamgen.v1 import stream_pb2`.
    args = ["protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}", f"--pyi_out={ROOT}"]
    args += [str(p.relative_to(ROOT)) for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {[p.name for p in protos]}")


if __name__ == "__main__":
    build(force="--force" in sys.argv)
