"""bench/common.py's helpers: waiting for a server's start line is bounded by its timeout even when the child
prints nothing, and finds the line among others."""

import subprocess
import sys
import time

from bench.common import wait_for_line


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
