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


# -- error hygiene (RELIABILITY S7, S-T10): every non-OK status the suite's clients see is swept ------------

from tests import hygiene  # noqa: E402 - after the environment set-up above


def pytest_configure(config):
    hygiene.install()


def pytest_unconfigure(config):
    hygiene.uninstall()


@pytest.fixture(autouse=True)
def _error_hygiene():
    """Each test's non-OK statuses pass the sweep's rules (failing at that test's teardown, so it is named)."""
    start = hygiene.count()
    yield
    bad = hygiene.report(hygiene.seen()[start:])
    if bad:
        pytest.fail("error hygiene (S7): a status leaks internals:\n" + "\n".join(bad), pytrace=False)


def pytest_terminal_summary(terminalreporter):
    statuses = hygiene.seen()
    bad = hygiene.report(statuses)
    codes = sorted({s.code.name for s in statuses})
    terminalreporter.write_line(f"error hygiene sweep: {len(statuses)} non-OK statuses ({', '.join(codes) or 'none'}), "
                                f"{len(bad)} leaking")


def pytest_sessionfinish(session, exitstatus):
    """The whole suite's statuses, including any that arrived after their test ended."""
    bad = hygiene.report(hygiene.seen())
    if bad and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_runtest_logreport(report):
    """A failure's last lines at once, not only in the summary: CI keeps the head of a long log."""
    if report.failed:
        tail = report.longreprtext.strip().splitlines()[-12:]
        print(f"\n--- FAILED {report.nodeid} ({report.when}) ---\n" + "\n".join(tail), flush=True)
