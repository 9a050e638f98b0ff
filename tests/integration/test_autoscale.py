"""Autoscaling between 1 and 2 replicas under a phased load, with engine loops in the server and in Serve
replicas (each case starts and stops its own Ray instance)."""

import dataclasses
import threading
import time

import grpc
import pytest

from tests.integration.test_server import Running, request, service_config, wait_for
from protos.streamgen.v1 import stream_pb2_grpc


@pytest.mark.parametrize("host", ["driver", "serve"])
def test_phased_load_scales_up_and_back_down_without_stream_errors(host):
    from orchestrator.config import AutoscalingConfig

    base = service_config()
    cfg = dataclasses.replace(
        base, parallel=dataclasses.replace(base.parallel, gpus_per_stage=1.0), local_ray_gpus=4.0, replica_host=host,
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=2, target_utilisation=0.7, upscale_delay_s=0.5,
                                      downscale_delay_s=3.0, period_s=0.2),
        server=dataclasses.replace(base.server, max_streams_per_replica=2))
    running = Running(cfg)
    service = running.service
    sizes, errors, refusals, done = [], [], [], []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            sizes.append(len(service.replicas))
            time.sleep(0.1)

    def stream(seed, frames):
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(running.target) as ch:
            stub = stream_pb2_grpc.StreamServiceStub(ch)
            while True:
                try:
                    got = list(stub.Generate(request(seed=seed, max_frames=frames), timeout=120))
                    assert [f.index for f in got] == list(range(frames))
                    done.append(seed)
                    return
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline:
                        refusals.append(seed)  # admission said full: retry after its hint
                        time.sleep(int(dict(err.trailing_metadata())["retry-after-ms"]) / 1000)
                        continue
                    errors.append((seed, err.code()))
                    return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert len(service.replicas) == 1
        long = threading.Thread(target=stream, args=(0, 800))  # ~50 s: phase 1 and 3
        long.start()
        time.sleep(2.0)
        burst = []
        # up to 2C = 4 streams, one a second, for ~20 s each: the 2C phase outlasts a replica start, which takes
        # ~26 s here in serve mode while the first replica serves on the same 2 cores
        for seed in (1, 2, 3):
            t = threading.Thread(target=stream, args=(seed, 320))
            t.start()
            burst.append(t)
            time.sleep(1.0)
        for t in burst:
            t.join(90)
        assert max(sizes) == 2  # scaled up
        assert wait_for(lambda: len(service.replicas) == 1, 20.0)  # and back down after the burst
        long.join(90)
    finally:
        watching.set()
        watcher.join()
        running.stop()
    assert not errors, errors
    assert sorted(done) == [0, 1, 2, 3]
