import os

import pytest
import torch

# Tests start their own local Ray: bind it to loopback. Must precede any `import ray` (ARCHITECTURE / brief).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Triton kernels run under the interpreter on CPU-only machines (must be set before they are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One CPU thread keeps the 2-core CI box responsive and timings comparable.
torch.set_num_threads(1)

# The gRPC modules are generated (make setup does it); build them here too if pytest runs directly.
try:
    from protos.build import build as _build_protos

    _build_protos()
except ImportError:  # grpcio-tools missing: the gRPC tests will fail to import, loudly
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
