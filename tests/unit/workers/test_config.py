"""The data-plane config (workers/config.py): named models, validation, and the dataclass contract
that the rest of the tree relies on (dataclasses.replace re-validates, pickling, positional fields)."""

import ast
import dataclasses
import pathlib
import pickle
import typing

import annotated_types
import pytest

from orchestrator.config import AutoscalingConfig, ServerConfig, ServiceConfig
from workers.config import (MAX_STEPS, MODEL_CONFIGS, CacheConfig, EngineConfig, GenerationConfig, ModelConfig,
                            ParallelConfig, SamplerConfig, check_topology, get_config)

ROOT = pathlib.Path(__file__).resolve().parents[3]
ALL = [ModelConfig, SamplerConfig, CacheConfig, EngineConfig, GenerationConfig, ParallelConfig, ServerConfig,
       AutoscalingConfig, ServiceConfig]
BOUNDS = (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt)


def test_named_configs():
    assert set(MODEL_CONFIGS) >= {"tiny", "small", "wan2.1-1.3b", "wan2.1-14b"}
    c = get_config("wan2.1-1.3b")
    assert (c.dim, c.num_layers, c.num_heads, c.head_dim, c.ffn_dim) == (1536, 30, 12, 128, 8960)
    c = get_config("wan2.1-14b")
    assert (c.dim, c.num_layers, c.num_heads, c.head_dim, c.ffn_dim) == (5120, 40, 40, 128, 13824)
    assert get_config("tiny", num_layers=2).num_layers == 2


@pytest.mark.parametrize("kwargs,field", [
    ({"dim": 100, "num_heads": 3}, "divisible"),
    ({"num_layers": 0}, "num_layers"),
    ({"patch_size": (2, 2, 2)}, "patch_size"),
    ({"kernel_backend": "cuda"}, "kernel_backend"),
    ({"vae": "sdxl"}, "vae"),
    ({"default_height": 100}, "default_height"),
    ({"freq_dim": 31}, "freq_dim"),
    ({"num_layer": 3}, "num_layer"),
])
def test_invalid_model_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        get_config("tiny", **kwargs)


def test_unknown_config_name():
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("wan2.2")


def _numeric_bounds(info) -> tuple[type | None, list]:
    """(int / float / None, the range constraints) of a field, looking inside ``Annotated[X, ...] | None``."""
    kind, metadata = info.annotation, list(info.metadata)
    if type(None) in typing.get_args(kind):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    while typing.get_origin(kind) is typing.Annotated:
        metadata += [m for extra in kind.__metadata__ for m in getattr(extra, "metadata", [extra])]
        kind = typing.get_args(kind)[0]
    return (kind if kind in (int, float) else None), [m for m in metadata if isinstance(m, BOUNDS)]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_field_has_a_default_a_one_line_docstring_and_a_range(cls):
    for name, info in cls.__pydantic_fields__.items():
        assert not info.is_required(), f"{cls.__name__}.{name} has no default"
        assert info.description and "\n" not in info.description, f"{cls.__name__}.{name}: one-line docstring"
        kind, bounds = _numeric_bounds(info)
        if kind is not None:
            assert {type(b) for b in bounds} & {annotated_types.Ge, annotated_types.Gt} and \
                {type(b) for b in bounds} & {annotated_types.Le, annotated_types.Lt}, \
                f"{cls.__name__}.{name} has no validated range"


def test_replace_validates_again_and_keeps_the_other_fields():
    sampler = SamplerConfig(mode="stream_batch", lanes=2)
    assert dataclasses.replace(sampler, chunk_frames=1) == SamplerConfig(chunk_frames=1, mode="stream_batch", lanes=2)
    with pytest.raises(ValueError, match="lanes"):
        dataclasses.replace(sampler, mode="sequential")  # lanes > 1 needs stream_batch
    with pytest.raises(ValueError, match="chunk_frames"):
        dataclasses.replace(sampler, chunk_frames=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampler.lanes = 3


def test_positional_fields_and_pickling():
    cache = CacheConfig("ema_sink", 2, 4, 0.5, 6)
    assert (cache.policy, cache.capacity_frames, cache.ema_alpha) == ("ema_sink", 6, 0.5)
    cfg = ServiceConfig(generation=GenerationConfig(model="small"), parallel=ParallelConfig(stages=4),
                        autoscaling=AutoscalingConfig(1, 3))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert cfg.generation.model == get_config("small") and cfg.generation.height == 128


def test_sampler_steps_are_floats_strictly_decreasing_and_at_most_max_steps():
    assert SamplerConfig(denoising_steps=[1000, 500]).denoising_steps == (1000.0, 500.0)
    assert SamplerConfig(denoising_steps=tuple(range(1000, 1000 - 100 * MAX_STEPS, -100))).num_steps == MAX_STEPS
    with pytest.raises(ValueError, match="denoising_steps"):
        SamplerConfig(denoising_steps=tuple(range(1000, 1000 - 100 * (MAX_STEPS + 1), -100)))
    with pytest.raises(ValueError, match="denoising_steps"):
        SamplerConfig(denoising_steps=())
    with pytest.raises(ValueError, match="denoising_steps"):
        SamplerConfig(denoising_steps=(1001, 500))


def test_generation_model_by_name_or_name_with_overrides():
    assert GenerationConfig(model="tiny").model == get_config("tiny")
    assert GenerationConfig(model={"name": "tiny", "kernel_backend": "torch"}).model == \
        get_config("tiny", kernel_backend="torch")
    with pytest.raises(ValueError, match="unknown model config"):
        GenerationConfig(model="wan9")


def test_parallel_config():
    par = ParallelConfig()
    assert (par.stages, par.backend, par.device, par.dtype, par.plan, par.decode, par.decode_workers) == (2, "ray", "auto", "float32", "layers", "shared", 1)
    for bad in ({"plan": "steps"}, {"dtype": "int8"}, {"device": "tpu"}, {"backend": "threads"}, {"decode": "remote"}, {"decode_workers": -1},
                {"gpus_per_stage": -1.0}, {"stage_call_timeout_s": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ParallelConfig(**bad)
    with pytest.raises(ValueError, match="gpus_per_stage"):
        ParallelConfig(device="cuda")  # a Ray stage with no GPU reserved sees none
    assert ParallelConfig(device="cuda", backend="local").stage_device(cuda_available=True) == "cuda"
    with pytest.raises(ValueError, match="no CUDA device"):
        ParallelConfig(device="cuda", gpus_per_stage=1.0).stage_device(cuda_available=False)
    assert ParallelConfig().stage_device(cuda_available=True) == "cpu"  # no GPU reserved
    assert ParallelConfig(gpus_per_stage=1.0).stage_device(cuda_available=True) == "cuda"
    assert ParallelConfig(gpus_per_stage=1.0).stage_device(cuda_available=False) == "cpu"
    assert ParallelConfig(backend="local").stage_device(cuda_available=True) == "cuda"
    assert ParallelConfig(device="cpu", gpus_per_stage=1.0).stage_device(cuda_available=True) == "cpu"


def test_topology_is_checked_against_the_model():
    check_topology(ParallelConfig(stages=4), get_config("tiny"))
    with pytest.raises(ValueError, match=r"stages \(5\).*num_layers \(4\)"):
        check_topology(ParallelConfig(stages=5), get_config("tiny"))
    with pytest.raises(ValueError, match="stages"):
        ServiceConfig(parallel=ParallelConfig(stages=5))  # the root checks it too
    with pytest.raises(ValueError, match="replica_host 'serve' needs parallel.backend 'ray'"):
        ServiceConfig(parallel=ParallelConfig(backend="local"), replica_host="serve")


def test_max_steps_is_defined_once():
    """One MAX_STEPS in the tree: workers/config.py; everyone else imports it."""
    where = []
    for package in ("orchestrator", "workers", "streamgen_kernels", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, ast.AnnAssign) else []
                if any(isinstance(t, ast.Name) and t.id == "MAX_STEPS" for t in targets):
                    where.append(str(path.relative_to(ROOT)))
    assert where == ["workers/config.py"]


def test_the_demo_config_needs_its_vae_layout_and_a_plain_weights_name():
    demo = get_config("demo")
    assert (demo.vae, demo.vae_stride, demo.weights) == ("demo", (4, 8, 8), "demo.pt")
    with pytest.raises(ValueError, match="vae 'demo' needs"):
        get_config("demo", vae_stride=(1, 8, 8))
    with pytest.raises(ValueError, match="vae 'demo' needs"):
        get_config("demo", out_channels=4)
    for bad in ("../demo.pt", "/abs/demo.pt", "demo.bin"):
        with pytest.raises(ValueError, match="weights"):
            get_config("demo", weights=bad)
