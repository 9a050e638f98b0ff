"""build_executor: the config reaches the stages (weights file, generator_ema, dtype, layout)."""

import dataclasses

import pytest
import torch

from workers.config import GenerationConfig, ParallelConfig, get_config
from workers.executor import InProcessExecutor, build_executor
from workers.model import CausalWanModel

CFG = get_config("tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Self-Forcing-style file whose generator and generator_ema differ."""
    plain = CausalWanModel(get_config("tiny", init_seed=1)).state_dict()
    ema = CausalWanModel(get_config("tiny", init_seed=2)).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "self_forcing_dmd.pt"
    torch.save({"generator": {"model." + k: v for k, v in plain.items()},
                "generator_ema": {"model." + k: v for k, v in ema.items()}}, path)
    return str(path), plain, ema


@pytest.mark.parametrize("use_ema", [False, True])
def test_the_serving_executor_loads_generator_ema_when_asked(checkpoint, use_ema):
    path, plain, ema = checkpoint
    gen = GenerationConfig(model=CFG, model_path=path, use_ema=use_ema)
    executor = build_executor(gen, ParallelConfig(stages=2, backend="local"))
    want = ema if use_ema else plain
    for stage in executor.stages:
        for name, value in stage.model.state_dict().items():
            assert torch.equal(value, want[name]), name


def test_layout_and_dtype_come_from_the_parallel_config():
    parallel = ParallelConfig(stages=3, backend="local", dtype="bfloat16", device="cpu")
    executor = build_executor(GenerationConfig(model=CFG), parallel)
    assert isinstance(executor, InProcessExecutor) and executor.num_stages == 3
    assert [s.block_range for s in executor.stages] == [(0, 2), (2, 3), (3, 4)]
    assert all(p.dtype == torch.bfloat16 for s in executor.stages for p in s.model.parameters())
    assert executor.stages[0].device == torch.device("cpu")
    if not torch.cuda.is_available():  # a forced device that is not there fails at build, naming it
        with pytest.raises(ValueError, match="cuda"):
            build_executor(GenerationConfig(model=CFG), dataclasses.replace(parallel, device="cuda"))
