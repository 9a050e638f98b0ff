"""On a GPU: a stage with CUDA graphs gives the frames it gives eagerly, and replays them."""

import pytest
import torch

from tests.engine_cases import collect, gen_config, local_executor, make_engine

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
def test_graphed_forwards_equal_eager_ones(mode):
    cfg = gen_config(mode)
    got = {}
    for graphs in ("off", "auto"):
        executor = local_executor(cfg, 1, device="cuda", cuda_graphs=graphs)
        engine = make_engine(cfg, executor)
        engine.add_stream("a", "a cat on a sofa", 1)
        got[graphs] = collect(engine, {"a": 12})["a"]
        if graphs == "auto":
            assert executor.stages[0].graphs.replays > 0
    for chunk in range(12):
        assert (got["off"][chunk] - got["auto"][chunk]).abs().max() <= 1e-4, chunk
