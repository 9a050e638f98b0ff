"""Model config validation and the named configs."""

import pytest

from orchestrator.config import MODEL_CONFIGS, ModelConfig, get_config


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
    ({"default_height": 100}, "height"),
])
def test_invalid_model_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        get_config("tiny", **kwargs)


def test_unknown_config_name():
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("wan2.2")
