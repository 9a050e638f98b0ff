"""The quality detector on generated clips whose answers are known."""

import pytest
import torch

from workers.demo import clips
from workers.demo.clips import all_prompts, clip, to_uint8
from workers.demo.detect import assess, observe

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@pytest.mark.parametrize("seed", [0, 1])
def test_every_prompt_is_read_back_from_its_clip(seed):
    for i, p in enumerate(all_prompts()):
        q = assess(to_uint8(clip(p, 100 * seed + i, 48)))
        assert (q.colour, q.direction, q.visibility) == (p.colour, p.direction, 1.0), p
        assert q.speed == pytest.approx(clips.SPEED, abs=0.05)
        assert q.steps_used == 47  # wrapping around an edge is not a jump: no step is dropped


def test_reversed_clip_moves_the_other_way():
    for p in all_prompts()[:8]:
        q = assess(to_uint8(clip(p, 7, 24)).flip(0))
        assert q.direction == OPPOSITE[p.direction]


def test_visibility_counts_frames_with_an_object():
    frames = to_uint8(clip("a blue square moving down", 3, 20))
    empty = to_uint8(torch.full((20, 3, 64, 64), clips.BACKGROUND[0] / 127.5 - 1))
    mixed = torch.cat((frames[:10], empty[:10]))
    q = assess(mixed)
    assert q.visibility == 0.5 and q.colour == "blue" and q.direction == "down"
    none = assess(empty)
    assert (none.visibility, none.colour, none.direction) == (0.0, None, None)


def test_noise_and_smears_are_not_objects():
    noise = (torch.rand(10, 64, 64, 3) * 255).to(torch.uint8)
    assert assess(noise).visibility == 0.0
    # two objects far apart: not one compact object
    two = clips.render(torch.tensor([[10.0, 10.0], [42.0, 42.0]]), clips.colour_tensor("red").expand(2, 3),
                       torch.tensor([False, False])).amax(0, keepdim=True)
    assert not observe(to_uint8(two)[0]).visible


def test_a_still_object_has_no_direction_and_jumps_are_ignored():
    still = to_uint8(clip("a red ball moving left", 2, 1)).expand(10, -1, -1, -1)
    q = assess(still)
    assert q.visibility == 1.0 and q.direction is None and q.speed < 0.1
    # a clip moving right with one teleport in the middle: the jump is not motion
    a = to_uint8(clip("a green ball moving right", 1, 10))
    b = to_uint8(clip("a green ball moving right", 2, 10))
    q = assess(torch.cat((a, b)))
    assert q.direction == "right" and q.steps_used == 18
