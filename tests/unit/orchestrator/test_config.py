"""The service config (orchestrator/config.py) and the root it composes from the data-plane config.

The model, sampler, cache, engine, generation and parallel schemas are tested in
tests/unit/workers/test_config.py."""


import pytest

import workers.config
from orchestrator import config
from orchestrator.admission import validate
from tests.unit.orchestrator.test_admission import Req
from orchestrator.config import AutoscalingConfig, GenerationConfig, ServerConfig, ServiceConfig
from orchestrator.types import RequestError


def test_the_root_composes_the_data_plane_classes_themselves():
    for name in ("ModelConfig", "SamplerConfig", "CacheConfig", "EngineConfig", "GenerationConfig",
                 "ParallelConfig", "get_config", "MAX_STEPS"):
        assert getattr(config, name) is getattr(workers.config, name)
    root = ServiceConfig()
    assert isinstance(root.parallel, workers.config.ParallelConfig)
    assert isinstance(root.generation, workers.config.GenerationConfig)


@pytest.mark.parametrize("kwargs,match", [
    ({"listen": "127.0.0.1"}, "HOST:PORT"),
    ({"listen": "127.0.0.1:70000"}, "HOST:PORT"),
    ({"listen": "0.0.0.0:50051"}, "not loopback"),
    ({"metrics_listen": "nowhere"}, "metrics_listen"),
    ({"default_fps": 30.0, "max_fps": 20.0}, "default_fps"),
    ({"admission_headroom": 9.0}, "admission_headroom"),
    ({"max_streams_per_replica": 0}, "max_streams_per_replica"),
    ({"listne": "127.0.0.1:1"}, "listne"),
])
def test_server_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerConfig(**kwargs)


def test_server_config_accepts_what_it_documents():
    assert ServerConfig(listen="0.0.0.0:1", allow_plaintext_non_loopback=True).listen == "0.0.0.0:1"
    assert ServerConfig(listen="[::1]:0", metrics_listen="").metrics_listen == ""


def test_autoscaling_bounds():
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="target_utilisation"):
        AutoscalingConfig(target_utilisation=0.0)
    with pytest.raises(ValueError, match="period_s"):  # 0 would spin the fleet loop on the server's event loop
        AutoscalingConfig(period_s=0)
    assert ServiceConfig(autoscaling=AutoscalingConfig(1, 4)).autoscaling.max_replicas == 4


def test_validate_checks_the_size_against_the_generation_config_not_the_model_defaults():
    """A server configured for 192x128 with the tiny model (whose own default is 96x64) generates 192x128:
    requests for that size, or 0, are accepted and filled in with it; the model's default size is not."""
    gen = GenerationConfig(model="tiny", height=128, width=192)
    server = ServerConfig()
    spec = validate(Req(), server, gen)
    assert (spec.width, spec.height, spec.steps) == (192, 128, gen.sampler.num_steps)
    assert (validate(Req(width=192, height=128), server, gen).width) == 192
    with pytest.raises(RequestError, match="width: this server generates 192x128"):
        validate(Req(width=96, height=64), server, gen)
