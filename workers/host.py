"""How a serving process takes its host: its niceness (``take_serving_priority``), for CPU stages cores
of its own (``claim_cores``), and a heap that keeps freed memory (``keep_heap``).

Cores are claimed node-wide without a coordinator: one ``flock``-ed file per core in a directory every
process of the node sees (``/dev/shm``). A process holds its locks while it lives and the kernel drops them
when it dies, so a crashed stage frees its cores for its replacement.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import os
import platform
from dataclasses import dataclass, field

log = logging.getLogger("streamgen.host")

CORE_LOCK_DIR = "/dev/shm/streamgen-cores" if os.path.isdir("/dev/shm") else "/tmp/streamgen-cores"
CPU_QUOTA_FILES = ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
"""cgroup v2 and v1: a CPU quota means the cores this process sees are shared by time, not given to it."""


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""mallopt(3) parameters."""
MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (larger blocks are always mmap-ed)."""
HEAP_KEEP_BYTES = 1 << 30
"""Free memory at the top of the heap that glibc keeps instead of handing back to the kernel."""


def keep_heap(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = HEAP_KEEP_BYTES) -> bool:
    """Have glibc's malloc serve blocks up to ``mmap_threshold`` from a heap it does not trim below
    ``trim_threshold`` of free space. A CPU forward frees and reallocates the same transients every
    micro-batch (an FFN's hidden state: [F*T, ffn_dim] floats, 16 MB for ``small`` at 5 frames); with glibc's
    defaults those can be mmap-ed or trimmed and faulted in anew each time, page by zeroed page (measured on a
    2-CPU stage: ~19k page faults/s, 3.6 % of its core in the kernel, while an identical stage whose heap
    happened to settle took none). Whether it took: only on glibc. Process-wide: call it in a stage's own
    process, before the model is built."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))


def take_serving_priority(nice: int | None) -> bool:
    """Set every thread of this process to ``nice`` (Linux niceness is per thread; threads started later
    inherit their creator's). Whether it took: lowering niceness needs CAP_SYS_NICE."""
    if nice is None:
        return False
    try:
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    except PermissionError:
        log.info("pid %d keeps niceness %d: no CAP_SYS_NICE to serve at %d", os.getpid(), os.nice(0), nice)
        return False
    except (FileNotFoundError, ProcessLookupError):  # not Linux, or a thread that just ended
        return False
    return True


@dataclass
class CoreClaim:
    """Cores this process holds and runs on; ``release`` (or the process's end) gives them back."""

    cores: tuple[int, ...]
    _fds: list[int] = field(default_factory=list, repr=False)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the file drops its flock
        self._fds.clear()


def cpu_quota(files: tuple[str, ...] = CPU_QUOTA_FILES) -> bool:
    """Whether this process's cgroup limits its CPU time (then every core it sees may be another's too)."""
    for path in files:
        try:
            with open(path) as f:
                limit = f.read().split()[0]
        except (OSError, IndexError):
            continue
        return limit not in ("max", "-1")
    return False


def claim_cores(n: int, directory: str = CORE_LOCK_DIR, quota_files: tuple[str, ...] = CPU_QUOTA_FILES
                ) -> CoreClaim | None:
    """Claim ``n`` cores of those this process may run on that no other process of the node holds, and pin
    every thread of this process to them (threads started later inherit the mask). None, pinning nothing,
    when fewer than ``n`` are free or a CPU quota makes pinning meaningless: the OS places the threads.

    Why: two compute-bound stages on two cores lose up to ~2 % of throughput to the scheduler moving them and
    briefly stacking them on one core (``bench/pipeline_scaling.py --compare-pinning``)."""
    if cpu_quota(quota_files):
        log.info("pid %d: a CPU quota shares this cgroup's cores by time; not pinning", os.getpid())
        return None
    held: list[tuple[int, int]] = []
    try:
        os.makedirs(directory, exist_ok=True)
        for core in sorted(os.sched_getaffinity(0)):
            if len(held) == n:
                break
            fd = os.open(os.path.join(directory, f"core-{core}.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((core, fd))
    except OSError as err:  # another user's lock directory or file, a read-only /dev/shm: float
        log.info("pid %d: cannot take core locks in %s (%s); not pinning", os.getpid(), directory, err)
    claim = CoreClaim(tuple(c for c, _ in held), [fd for _, fd in held])
    if len(held) < n:
        log.info("pid %d: %d of %d cores free; not pinning", os.getpid(), len(held), n)
        claim.release()
        return None
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), claim.cores)
        except ProcessLookupError:  # a thread that just ended
            pass
    return claim
