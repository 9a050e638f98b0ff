"""The synthetic clips: vocabulary, determinism from the seed, steady motion with wrap-around."""

import pytest
import torch

from workers.demo import clips
from workers.demo.clips import Prompt, all_prompts, clip, parse_prompt, to_uint8


def test_vocabulary_is_32_prompts_that_parse_back():
    prompts = all_prompts()
    assert len(prompts) == 32 and len(set(prompts)) == 32
    for p in prompts:
        assert parse_prompt(p.text) == p
    assert parse_prompt("  A Red BALL moving Left ") == Prompt("red", "ball", "left")
    for bad in ("a purple ball moving left", "a red cube moving left", "a red ball moving sideways", "red ball", ""):
        with pytest.raises(ValueError, match="not a demo prompt"):
            parse_prompt(bad)


def test_clip_is_64x64_and_deterministic_from_the_seed():
    a = clip("a green square moving up", 5, 12)
    assert a.shape == (12, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, clip("a green square moving up", 5, 12))
    assert not torch.equal(a, clip("a green square moving up", 6, 12))
    # frames first..first+n-1 are the same frames of the same clip
    assert torch.equal(clip("a green square moving up", 5, 4, first=8), a[8:])


def test_one_object_of_the_prompt_colour_on_a_dark_background():
    frames = to_uint8(clip("a yellow ball moving left", 1, 3)).int()
    bg = torch.tensor(clips.BACKGROUND)
    off = (frames - bg).abs().sum(-1) > 0  # [N, H, W]
    area = off.sum((1, 2)).float()
    assert ((area > 140) & (area < 260)).all(), area  # one ball, radius 7 (+ anti-aliased rim)
    centre = frames[off].float().mean(0)
    assert (frames.reshape(-1, 3) == bg).all(-1).float().mean() > 0.9  # mostly plain background
    full = frames[(frames - torch.tensor(clips.COLOURS["yellow"])).abs().sum(-1) == 0]
    assert len(full) > 100 and centre[0] > 150 and centre[2] < 100


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_steady_motion_in_the_named_direction_wrapping_at_the_edge(direction):
    start = clips.start_position(3)
    t = torch.arange(0, 40)
    track = clips.track(start, direction, t)
    step = (track[1:] - track[:-1] + 32) % 64 - 32  # wrapped per-frame steps
    dx, dy = clips.DIRECTIONS[direction]
    assert torch.allclose(step, torch.tensor([dx, dy], dtype=torch.float64) * clips.SPEED)
    assert ((track >= 0) & (track < 64)).all()
    # 40 frames at 2 px cross the whole frame: the object leaves one edge and comes back at the other
    axis = 0 if dx else 1
    assert (track[1:, axis] - track[:-1, axis]).abs().max() > 60


def test_an_object_on_the_edge_is_split_across_it_not_cut():
    frame = clips.render(torch.tensor([[0.0, 32.0]]), clips.colour_tensor("red")[None], torch.tensor([False]))[0]
    obj = (frame[0] > 0)  # red channel bright
    left, right = obj[:, :8].sum(), obj[:, -8:].sum()
    assert left > 40 and right > 40 and abs(int(left) - int(right)) < 25


def test_switch_track_is_continuous_across_a_direction_change():
    t = torch.arange(0, 10)
    track = clips.switch_track(t, ["right"] * 5 + ["up"] * 5, (10.0, 10.0))
    assert track[4].tolist() == [18.0, 10.0]  # 4 frames right
    assert track[5].tolist() == [20.0, 10.0]  # frame 5 still arrives by the old motion
    assert track[9].tolist() == [20.0, 2.0]  # then up
