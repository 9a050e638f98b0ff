"""Shared by the benchmarks: writing results, running `streamgen serve` as a child process."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def host_cpu() -> str:
    """This host's CPU as a cost profile names it: model, the vector ISA that sets matmul speed, core count. A VM
    can land on other hardware between sessions (2x apart here: AVX-512/AMX or not), so a CPU profile holds
    only on the host it names."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():  # the first processor's block is enough
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:  # not Linux
        import platform

        fields["model name"] = platform.processor() or platform.machine()
    model = fields.get("model name", "unknown cpu")
    if "model" in fields:
        model += f" (family {fields.get('cpu family', '?')} model {fields['model']})"
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model} [{' '.join(isa) or 'no avx2'}], {os.cpu_count()} CPUs"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; NaN when empty."""
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))] if v else float("nan")


def outputs_rate(stamps: list[float], warmup_outputs: int) -> tuple[int, float]:
    """(outputs, per second) over the steady window: from the end of the burst that holds the last warm-up
    output to the last output. Outputs that arrive together (a micro-batch's, or a call's of several) carry one
    stamp, so the window starts at a burst's end, never inside one; give every output of the last burst too."""
    if warmup_outputs < 1:
        raise ValueError("the window starts at a warm-up output: warmup_outputs must be at least 1")
    start = warmup_outputs - 1
    while start + 1 < len(stamps) and stamps[start + 1] == stamps[start]:
        start += 1
    steady = stamps[start + 1:]
    if not steady:
        raise ValueError(f"no output after the burst of warm-up output {warmup_outputs} ({len(stamps)} in all)")
    return len(steady), len(steady) / (steady[-1] - stamps[start])


def write_json(path: str, results) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


def start_serve(config_path: str, log_path: str, timeout_s: float = 600) -> tuple[subprocess.Popen, int, int | None]:
    """`streamgen serve --config FILE` (listen 127.0.0.1:0); once it serves: the process, its gRPC port and its
    /metrics port (None when the file turns metrics off)."""
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--config", config_path],
                                cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                stderr=log, text=True)
    line = wait_for_line(proc, r"serving on 127\.0\.0\.1:(\d+)", timeout_s)
    if line is None:
        stop_serve(proc)
        raise RuntimeError(f"streamgen serve exited or did not start within {timeout_s:g} s; its log: {log_path}")
    metrics = re.search(r"metrics on 127\.0\.0\.1:(\d+)", line)
    return proc, int(re.search(r"serving on 127\.0\.0\.1:(\d+)", line).group(1)), \
        int(metrics.group(1)) if metrics else None


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout_s: float) -> str | None:
    """The first line of ``proc``'s stdout matching ``pattern`` within ``timeout_s``; None when it exits or the
    time runs out first. A thread reads the lines (and goes on draining them, so the pipe never fills): a
    ``readline`` here would block past the deadline on a child that prints nothing."""
    lines: queue.Queue = queue.Queue()

    def read():
        for text in proc.stdout:
            lines.put(text)
        lines.put(None)

    threading.Thread(target=read, name="serve-stdout", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is None:
            return None
        if re.search(pattern, line):
            return line


def stop_serve(proc: subprocess.Popen) -> None:
    """SIGTERM (it drains and stops its Ray), then a kill if it does not exit within a minute."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
