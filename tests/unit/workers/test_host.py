"""workers/host.py: cores claimed node-wide through lock files, pinned on every thread, freed with the process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from workers.host import claim_cores, cpu_quota

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CORES = sorted(os.sched_getaffinity(0))

# A process with a thread started before it claims cores and one after, which reports what every thread may
# run on, then holds its claim until stdin closes.
CLAIMER = textwrap.dedent("""
    import json, os, sys, threading
    from workers.host import claim_cores
    done = threading.Event()
    earlier = threading.Thread(target=done.wait)
    earlier.start()
    claim = claim_cores(int(sys.argv[1]), sys.argv[2], quota_files=())
    later = threading.Thread(target=sys.stdin.read)
    later.start()
    masks = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
    print(json.dumps({"cores": None if claim is None else list(claim.cores), "masks": masks}), flush=True)
    later.join()
    done.set()
""")


def _claimer(n: int, lock_dir: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", CLAIMER, str(n), lock_dir], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc, json.loads(proc.stdout.readline())


def _end(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores")
def test_processes_claim_disjoint_cores_and_every_thread_runs_only_there(tmp_path):
    first, got1 = _claimer(1, str(tmp_path))
    second, got2 = _claimer(1, str(tmp_path))
    try:
        assert got1["cores"] == CORES[:1] and got2["cores"] == CORES[1:2]
        for got in (got1, got2):  # the main thread, one started before the claim and one after
            assert len(got["masks"]) >= 3
            assert all(mask == got["cores"] for mask in got["masks"].values())
    finally:
        _end(first)
        _end(second)


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores")
def test_a_claim_that_does_not_fit_pins_nothing_and_holds_nothing(tmp_path):
    holder, _ = _claimer(len(CORES) - 1, str(tmp_path))
    try:
        greedy, got = _claimer(2, str(tmp_path))  # one core is free, two are asked for
        _end(greedy)
        assert got["cores"] is None
        assert all(mask == CORES for mask in got["masks"].values())
        single, got = _claimer(1, str(tmp_path))  # the partial claim was released: the free core is there
        _end(single)
        assert got["cores"] == CORES[-1:]
    finally:
        _end(holder)


def test_cores_come_back_when_the_holder_dies(tmp_path):
    holder, got = _claimer(1, str(tmp_path))
    assert got["cores"] == CORES[:1]
    holder.kill()  # no release: the kernel drops the lock with the process
    holder.wait(timeout=30)
    again, got = _claimer(1, str(tmp_path))
    _end(again)
    assert got["cores"] == CORES[:1]


def test_a_cpu_quota_means_no_pinning(tmp_path):
    v2, v1 = tmp_path / "cpu.max", tmp_path / "cpu.cfs_quota_us"
    v2.write_text("max 100000\n")
    v1.write_text("-1\n")
    assert not cpu_quota((str(v2),)) and not cpu_quota((str(v1),)) and not cpu_quota((str(tmp_path / "none"),))
    v2.write_text("150000 100000\n")
    v1.write_text("50000\n")
    assert cpu_quota((str(v2),)) and cpu_quota((str(v1),))
    assert claim_cores(1, str(tmp_path / "locks"), quota_files=(str(v2),)) is None
    assert not (tmp_path / "locks").exists()  # not a lock taken


def test_a_lock_directory_it_cannot_use_means_no_pinning(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the directory should be
    before = os.sched_getaffinity(0)
    assert claim_cores(1, str(blocker)) is None
    assert os.sched_getaffinity(0) == before


# A fresh process that mallocs a forward's transients (4 x 16 MB alive at its peak, as the FFN's hidden state of
# ``small`` at 5 frames), writes them, frees them and does it again, reporting each round's page faults; with
# ``keep`` it first calls keep_heap. Straight through libc, so nothing else lands between the blocks.
CHURN = textwrap.dedent("""
    import ctypes, ctypes.util, json, resource, sys
    from workers.host import keep_heap
    kept = keep_heap() if sys.argv[1] == "keep" else None
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    size, faults = 16 << 20, []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(size) for _ in range(4)]
        for p in blocks:
            ctypes.memset(p, 1, size)
        for p in blocks:
            libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"kept": kept, "faults": faults}))
""")


def _churn(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_kept_heap_reuses_freed_transients_without_faulting_them_in_again():
    """With glibc's defaults a freed block goes back to the kernel (mmap-ed and unmapped, or trimmed off the heap's
    top) and is faulted in anew, page by zeroed page; after keep_heap the heap grows to the block once and later
    rounds take no page faults. (In a stage, the FFN's hidden state did this every forward: ~19k faults/s.)"""
    plain, kept = _churn("plain"), _churn("keep")
    assert plain["kept"] is None and kept["kept"] is True
    assert min(plain["faults"][1:]) >= 3 * 4096, plain  # every round, (nearly) all four blocks: the problem is real
    assert max(kept["faults"][1:]) < 64, kept
