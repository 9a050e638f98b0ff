"""The local backend: the whole gRPC service (engine core, in-process stages, decode workers) in one process,
without Ray (how the service itself is measured on a GPU machine, which has no Ray); bf16 end to end."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest

from orchestrator.config import CacheConfig, GenerationConfig, ParallelConfig, SamplerConfig, ServerConfig, \
    ServiceConfig, get_config
from protos.streamgen.v1 import stream_pb2_grpc
from tests.integration.test_server import ROOT, Running, request
from workers.reference import ReferenceGenerator

# `streamgen serve` with every import of ray refused: the local backend must never need it.
NO_RAY = textwrap.dedent("""
    import importlib.abc, sys

    class NoRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError("ray is not importable in this process")

    sys.meta_path.insert(0, NoRay())
    from orchestrator.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def local_config(dtype: str = "float32") -> ServiceConfig:
    gen = GenerationConfig(model=get_config("tiny"), sampler=SamplerConfig(chunk_frames=3), cache=CacheConfig())
    return ServiceConfig(generation=gen, server=ServerConfig(listen="127.0.0.1:0", metrics_listen="",
                                                             max_streams_per_replica=2),
                         parallel=ParallelConfig(stages=2, backend="local", dtype=dtype))


def test_local_backend_serves_a_stream_with_ray_unimportable():
    proc = subprocess.Popen([sys.executable, "-c", NO_RAY, "serve", "--backend", "local", "--model", "tiny",
                             "--stages", "2", "--listen", "127.0.0.1:0", "--metrics-listen", ""], cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("serving on" in line for line in lines) and proc.poll() is None:
            lines.append(proc.stdout.readline())
        assert proc.poll() is None, "".join(lines)[-3000:]
        assert "no Ray" in lines[-1]
        port = int(lines[-1].split("serving on 127.0.0.1:")[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            frames = list(stream_pb2_grpc.StreamServiceStub(channel).Generate(request(max_frames=20), timeout=60))
        assert [f.index for f in frames] == list(range(20))
        assert all(len(f.data) == f.width * f.height * 3 for f in frames)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-3000:]
        assert "ImportError" not in out and "Traceback" not in out, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bfloat16_end_to_end_through_the_service_matches_the_bf16_reference():
    """dtype bfloat16 reaches every piece (stages, text encoder, decode workers); the frames a client gets
    equal the single-process bf16 reference within two intensity levels (bf16 rounds per op; the two run the
    same ops in the same order, but the stages' split moves where activations are rounded)."""
    cfg = local_config("bfloat16")
    running = Running(cfg)
    try:
        with grpc.insecure_channel(running.target) as channel:
            frames = list(stream_pb2_grpc.StreamServiceStub(channel).Generate(
                request(max_frames=33, seed=3), timeout=120))
        executor = running.service.replicas[0].core.executor
        import torch

        assert all(p.dtype == torch.bfloat16 for s in executor.stages for p in s.model.parameters())
        assert all(p.dtype == torch.bfloat16 for w in executor.pool.workers for p in w.decoder.parameters())
    finally:
        running.stop()
    got = np.stack([np.frombuffer(f.data, np.uint8).reshape(f.height, f.width, 3) for f in frames])
    want = ReferenceGenerator(cfg.generation, dtype=torch.bfloat16).generate("a red fox in the snow", 3, 3).numpy()
    diff = np.abs(got.astype(int) - want[:33].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_dry_run_prints_the_device_map_and_a_config_that_cannot_fit_fails_naming_the_piece():
    ok = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", "--dry-run", "--model", "wan2.1-1.3b",
                         "--stages", "2", "--dtype", "bfloat16", "--gpu-memory-gib", "80"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "slot 0" in ok.stdout and "slot 1" in ok.stdout and "text encoder (umt5)" in ok.stdout
    assert "stage 1 (blocks 15-29, head)" in ok.stdout and "decode worker 0" in ok.stdout
    assert "streams by memory:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", "--dry-run", "--model", "wan2.1-1.3b",
                          "--stages", "1", "--dtype", "bfloat16", "--gpu-memory-gib", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "text encoder (umt5) does not fit on slot 0" in bad.stderr, bad.stderr


@pytest.mark.parametrize("decode", ["shared", "dedicated"])
def test_a_config_that_cannot_fit_fails_at_start_naming_the_piece(decode):
    from orchestrator.app import Service
    import asyncio

    cfg = local_config()
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, decode=decode, gpu_memory_gib=1e-4))
    with pytest.raises(ValueError, match=r"stage 0 \(blocks 0-1, embeddings\) does not fit on slot 0"):
        asyncio.run(Service(cfg).start())


def test_admission_counts_each_streams_memory_as_well_as_time():
    """Slots with room for two streams' state: the time-based capacity is larger, but the third stream is
    refused RESOURCE_EXHAUSTED (memory), and GetCapacity says 2."""
    from workers import devicemap

    cfg = local_config()
    dmap = devicemap.plan(cfg.generation, cfg.parallel)
    # the slot memory that fits the weights and exactly two streams' state on the tightest slot
    need = max((dmap.weight_bytes(s) + 2.5 * dmap.stream_bytes(s)) / cfg.parallel.gpu_memory_utilization
               for s in range(dmap.slots))
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, max_streams_per_replica=8,
                                                              admission_headroom=1.0),
                              parallel=dataclasses.replace(cfg.parallel, gpu_memory_gib=need / devicemap.GIB),
                              engine=dataclasses.replace(cfg.engine, rebalance_every=0))  # the split planned above
    running = Running(cfg)
    try:
        core = running.service.replicas[0].core
        assert core.memory_streams == 2 and core.engine.max_streams(4.0, 4) > 2  # time alone would admit more
        with grpc.insecure_channel(running.target) as channel:
            stub = stream_pb2_grpc.StreamServiceStub(channel)
            from protos.streamgen.v1 import stream_pb2

            assert stub.GetCapacity(stream_pb2.CapacityRequest(fps=4.0, steps=4)).streams_max == 2
            calls = [stub.Generate(request(max_frames=200, fps=4.0), timeout=60) for _ in range(2)]
            for call in calls:
                next(call)  # both admitted and streaming
            with pytest.raises(grpc.RpcError) as err:
                next(stub.Generate(request(max_frames=5, fps=4.0), timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in calls:
                call.cancel()
    finally:
        running.stop()
