"""The shipped demo model: a Self-Forcing-style file in the package, loaded through the real loader, the default
of the service config, and good enough that the detector agrees with its prompts."""

import os

import pytest
import torch

from tests.engine_cases import assert_matches_reference, collect, local_executor, make_engine
from workers.config import CacheConfig, GenerationConfig, SamplerConfig, get_config, shipped_weights
from workers.demo.clips import COLOURS, DIRECTIONS
from workers.demo.detect import assess
from workers.loader import load_weights, read_state_dict
from workers.model.dit import CausalWanModel
from workers.reference import ReferenceGenerator

PATH = shipped_weights(get_config("demo").weights)


def test_the_checkpoint_is_small_in_the_package_and_in_the_self_forcing_layout():
    assert os.path.isfile(PATH) and os.path.getsize(PATH) <= 8 * 1024 * 1024
    raw = torch.load(PATH, map_location="cpu", weights_only=True)
    assert {"generator", "generator_ema", "vae"} <= set(raw)
    assert all(k.startswith("model.") for k in raw["generator_ema"])
    ema = CausalWanModel(get_config("demo", weights=""))
    raw_model = CausalWanModel(get_config("demo", weights=""))
    load_weights(ema, PATH, use_ema=True)
    load_weights(raw_model, PATH, use_ema=False)
    assert set(read_state_dict(PATH, use_ema=True)) == set(ema.state_dict())
    assert any((a - b).abs().max() > 0 for a, b in zip(ema.state_dict().values(), raw_model.state_dict().values()))


def test_it_is_the_default_and_loads_its_ema_weights():
    gen = GenerationConfig()
    assert gen.model == get_config("demo") and (gen.width, gen.height) == (64, 64)
    assert gen.checkpoint() == (PATH, True) and gen.vae_checkpoint() == PATH
    other = GenerationConfig(model_path="/elsewhere/demo.pt")
    assert other.checkpoint() == ("/elsewhere/demo.pt", False) and other.vae_checkpoint() == "/elsewhere/demo.pt"
    assert GenerationConfig(model=get_config("tiny")).checkpoint() == ("", False)


@pytest.fixture(scope="module")
def reference():
    return ReferenceGenerator(GenerationConfig())


@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
def test_the_prompts_come_to_life(reference, mode):
    """48 frames (the demo's length) from the engine's sampler in both modes, one stream per colour x direction
    (shapes alternate), seed 0: the detector sees the object on most frames and agrees with most prompts. The
    bar here is the sample's; bench/quality.py measures all 64 streams through the service."""
    prompts = [f"a {c} {'ball' if (i + j) % 2 else 'square'} moving {d}"
               for i, c in enumerate(COLOURS) for j, d in enumerate(DIRECTIONS)]
    colour = direction = visible = 0
    for text in prompts:
        _, want_colour, _, _, want_direction = text.split()
        q = assess(reference.generate(text, 0, n_chunks=5, mode=mode)[:48])
        colour += q.colour == want_colour
        direction += q.direction == want_direction
        visible += q.visibility
    assert visible / len(prompts) >= 0.9
    assert colour >= 0.875 * len(prompts) and direction >= 0.875 * len(prompts), (colour, direction)


@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
def test_pipelined_engine_equals_the_reference_with_the_demo_model(mode):
    cfg = GenerationConfig(sampler=SamplerConfig(mode=mode), cache=CacheConfig(sink_frames=3, window_frames=3,
                                                                                 recache_frames=6))
    streams = {"a": ("a red ball moving right", 1), "b": ("a blue square moving up", 2)}
    engine = make_engine(cfg, local_executor(cfg, 2))  # the stages load the shipped weights (their EMA)
    for sid, (prompt, seed) in streams.items():
        engine.add_stream(sid, prompt, seed)
    assert_matches_reference(cfg, collect(engine, {sid: 4 for sid in streams}), streams, 4)
