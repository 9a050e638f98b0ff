"""`streamgen serve --address auto` joins a Ray cluster it did not start, and leaves it as it found it.

The cluster is a real `ray start --head` on this machine, bound to loopback, with 2 logical GPUs. Its
processes run in their own process group, which the fixture ends (by that group id) on teardown.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest

from tests.integration.test_server import request, serve_process
from protos.streamgen.v1 import stream_pb2_grpc

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, env) of a head node on 127.0.0.1. The env is the cluster's, as an operator's shell has it:
    the loopback switch (this test cluster binds 127.0.0.1 only) and Ray's token auth."""
    port = _free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w+")
    head = subprocess.Popen([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                             "--num-gpus=2", "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        assert _resources(address, env, timeout=90) is not None, _tail(log)
        yield address, env, head
    finally:
        try:  # workers and the Serve controller run in sessions of their own: note them to end them too
            descendants = psutil.Process(head.pid).children(recursive=True)
        except psutil.Error:  # the head already gone
            descendants = []
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)  # the group `ray start` leads: GCS, raylet and their helpers
            except ProcessLookupError:
                break
            try:
                head.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for proc in descendants:
            try:
                proc.wait(5)
            except Exception:  # noqa: BLE001 - still running after its raylet went: end it
                try:
                    proc.kill()
                except Exception:  # noqa: BLE001 - gone meanwhile
                    pass
        log.close()
        # `ray stop` would forget this cluster; a killed head leaves its address behind for ray.init()
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip() == f"127.0.0.1:{port}":
            current.unlink()


def _tail(log) -> str:
    log.seek(0)
    return log.read()[-3000:]


def _resources(address: str, env: dict, timeout: float) -> dict | None:
    """The cluster's available resources, asked by a separate driver (this process keeps no Ray)."""
    code = ("import json, ray; ray.init(address='auto', log_to_driver=False); "
            "print('RES', json.dumps(ray.available_resources())); ray.shutdown()")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run([sys.executable, "-c", code], env=dict(env, RAY_ADDRESS=address), capture_output=True,
                              text=True, timeout=60)
        m = re.search(r"^RES (.*)$", proc.stdout, re.M)
        if m:
            import json

            return json.loads(m.group(1))
        time.sleep(1.0)
    return None


@pytest.mark.parametrize("host", ["driver", "serve"])
def test_serve_joins_an_existing_cluster_with_address_auto(cluster, host):
    address, env, head = cluster
    with serve_process("--address", "auto", "--stages", "2", "--gpus-per-stage", "1", "--drain-timeout", "1",
                       "--replica-host", host, env=dict(env, RAY_ADDRESS=address)) as (serve, port, lines):
        assert "joined Ray cluster 'auto'" in lines[-1]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            frames = list(stream_pb2_grpc.StreamServiceStub(ch).Generate(request(max_frames=24), timeout=60))
        assert [f.index for f in frames] == list(range(24))
        # the 2 stage actors hold the cluster's 2 logical GPUs while the service runs
        assert _resources(address, env, timeout=30).get("GPU", 0) == 0
        # everything this test started listens on loopback only: the server, the cluster, the stage actors
        pids = {serve.pid, head.pid}
        for root in (serve.pid, head.pid):
            pids |= {c.pid for c in psutil.Process(root).children(recursive=True)}
        bad = [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
               if c.status == psutil.CONN_LISTEN and c.pid in pids
               and c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
        assert not bad, bad
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    # the cluster outlives the service (and its Serve, in serve mode), and gets its GPUs back
    assert head.poll() is None
    assert wait_for_gpus(address, env, 2, 30)


def wait_for_gpus(address, env, want: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (_resources(address, env, timeout=30) or {}).get("GPU", 0) == want:
            return True
        time.sleep(1.0)
    return False
