"""bench/common.py's helpers: waiting for a server's start line is bounded by its timeout even when the child
prints nothing, and finds the line among others."""

import subprocess
import sys
import time

import pytest

from bench.common import outputs_rate, wait_for_line


def child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_a_silent_child_times_out_instead_of_blocking():
    proc = child("import time; time.sleep(30)")
    try:
        started = time.monotonic()
        assert wait_for_line(proc, r"serving on", 0.5) is None
        assert time.monotonic() - started < 5  # readline would have waited the child's 30 s
    finally:
        proc.kill()
        proc.wait()


def test_the_line_is_found_among_others_and_an_exit_ends_the_wait():
    proc = child("print('starting'); print('serving on 127.0.0.1:5; metrics on 127.0.0.1:6', flush=True); "
                 "import time; time.sleep(30)")
    try:
        assert wait_for_line(proc, r"serving on 127\.0\.0\.1:(\d+)", 20).startswith("serving on 127.0.0.1:5")
    finally:
        proc.kill()
        proc.wait()
    quits = child("print('bye')")
    assert wait_for_line(quits, r"serving on", 20) is None and quits.wait() == 0


def test_the_rate_window_starts_and_ends_at_burst_ends():
    """Outputs that come back together share a stamp: the window starts after the whole burst that holds the
    last warm-up output (not inside it, which would count outputs that took no time) and ends at the last."""
    stamps = [1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0]  # a burst of 1, then bursts of 3 a second apart
    assert outputs_rate(stamps, 2) == (6, 3.0)  # warm-up output 2 is in the burst at 2.0: 6 outputs in 2 s
    assert outputs_rate(stamps, 1) == (9, 3.0)  # one output at 1.0, then 9 in 3 s
    assert outputs_rate([1.0, 2.0, 3.0, 5.0], 2) == (2, 2 / 3.0)  # single outputs: as before
    with pytest.raises(ValueError, match="no output after"):
        outputs_rate([1.0, 2.0, 2.0], 2)
