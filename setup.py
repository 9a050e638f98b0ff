"""Build hook: generate the gRPC modules (protos/streamgen/v1/*_pb2*.py) before the package files are copied.

Everything else about the package is in pyproject.toml. The modules are generated in the source tree, where an
editable install (``pip install -e .``) imports them and a wheel build (``pip install .``) copies them from, so
both install kinds give a working ``streamgen``. grpcio-tools is needed here only ([build-system].requires).
"""

import pathlib
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    """build_py that runs protoc first (always: the build environment's grpcio-tools decides the code)."""

    def run(self):
        sys.path.insert(0, str(ROOT))  # the build backend does not put the project on sys.path
        try:
            from protos.build import build
        finally:
            sys.path.remove(str(ROOT))
        build(force=True)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
