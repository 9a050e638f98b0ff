"""On a GPU with the local backend: steady forwards touch no host memory and wait for nothing (latents, noise,
timesteps and RoPE tables are made or kept on the device), so the host queues the next forward while the
device runs this one."""

import pytest
import torch

from tests.engine_cases import gen_config, local_executor, make_engine

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", ["off", "auto"])
def test_steady_forwards_make_no_implicit_host_sync(graphs):
    cfg = gen_config("stream_batch")
    executor = local_executor(cfg, 1, device="cuda", cuda_graphs=graphs)
    engine = make_engine(cfg, executor)
    engine.add_stream("a", "a cat on a sofa", 1)
    for _ in range(40):  # warm-up: caches full, tables and graphs made
        engine.step(wait=False)
    assert engine.stats.max_inflight == 2  # one stage, one more queued
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            engine.step(wait=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine.drain()
