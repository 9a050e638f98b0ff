"""Video-to-video: the noise controller and the similarity filter against hand-computed values, and the
engine equal to the single-process reference (P 1 and 2, both modes, motion-aware on and off, 1 and 3
streams with a text-to-video one among them)."""

import math
import time

import pytest
import torch

from tests.engine_cases import assert_matches_reference, gen_config, local_executor, make_engine
from workers.reference import ReferenceGenerator
from workers.v2v import NoiseController, SimilarityFilter, VideoParams, first_step, to_unit, video_sampler


def frames(values) -> torch.Tensor:
    """Constant uint8 frames [N, 2, 2, 3] with the given values."""
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 2, 2, 3).contiguous()


def test_noise_controller_follows_the_formula():
    c = NoiseController(s_init=0.8, motion_aware=True)
    still = to_unit(frames([100, 100, 100, 100, 100]))
    assert c.next(still) == pytest.approx(0.8)  # no motion, no previous s: s = s_init
    # frames 0 -> 51 -> 51 -> 51: the jump is 51/127.5 = 0.4 in [-1, 1]; with the previous chunk's last
    # frame (100) before it the first step is |100-0|/127.5 = 0.784 -> d = clamp(0.784 / 0.2) = 1
    moving = to_unit(frames([0, 51, 51, 51]))
    s = c.next(moving)
    assert s == pytest.approx(0.9 * (0.8 - 0.1 * 1.0) + 0.1 * 0.8)  # = 0.71
    # small motion: one step of 5 levels = 0.0392 -> d = 0.196
    small = to_unit(frames([51, 56, 56, 56]))
    d = (5 / 127.5) / 0.2
    assert c.next(small) == pytest.approx(0.9 * (0.8 - 0.1 * d) + 0.1 * s)
    assert first_step(0.71) == 610.0 and first_step(0.8) == 700.0  # int(1000 s) - 100
    off = NoiseController(s_init=0.8, motion_aware=False)
    assert off.next(still) == off.next(moving) == 0.8


def test_similarity_filter_skips_near_identical_chunks_with_the_probability_rule():
    base = to_unit(frames([100, 110, 120, 130]))
    f = SimilarityFilter(threshold=0.98, seed=3)
    assert f.skip(base) is False  # nothing to compare with
    assert [f.skip(base) for _ in range(11)] == [True] * 10 + [False]  # identical: skipped, at most 10 in a row
    other = -base  # cosine -1: never skipped
    assert f.skip(other) is False
    # cos between threshold and 1: skipped with probability 1 - (1 - cos) / (1 - threshold), from the seed
    near = base + 0.05 * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    cos = torch.nn.functional.cosine_similarity(base.flatten().double(), near.flatten().double(), dim=0).item()
    p = max(0.0, 1 - (1 - cos) / (1 - 0.98))
    decisions = []
    for seed in range(400):
        g = SimilarityFilter(threshold=0.98, seed=seed)
        g.skip(base)
        decisions.append(g.skip(near))
    assert abs(sum(decisions) / 400 - p) < 0.08, (sum(decisions) / 400, p)
    assert SimilarityFilter(threshold=0.0).skip(base) is False and SimilarityFilter(0.0).skip(base) is False


def video(chunks: int, f: int, height: int = 32, width: int = 48, speed: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """A moving pattern, cut into input chunks: 1 + 4 (f - 1) frames first, 4 f after."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 255, (height, 2 * width, 3), generator=g, dtype=torch.uint8)
    n = 1 + 4 * (f - 1) + 4 * f * (chunks - 1)
    allf = torch.stack([base.roll(speed * i, dims=1)[:, :width] for i in range(n)])
    out, i = [], 0
    for c in range(chunks):
        k = 1 + 4 * (f - 1) if c == 0 else 4 * f
        out.append(allf[i:i + k])
        i += k
    return out


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
@pytest.mark.parametrize("motion_aware", [True, False])
@pytest.mark.parametrize("n_streams", [1, 3])
def test_v2v_engine_equals_reference(stages, mode, motion_aware, n_streams):
    cfg = gen_config(mode)
    sampler = video_sampler(cfg.sampler, 3)
    params = VideoParams(noise_scale=0.8, motion_aware=motion_aware)
    streams = {"v1": ("a watercolor painting", 1, video(5, cfg.sampler.chunk_frames, seed=1)),
               "v2": ("a neon city", 2, video(5, cfg.sampler.chunk_frames, speed=-5, seed=2))}
    streams = dict(list(streams.items())[:1 if n_streams == 1 else 2])
    engine = make_engine(cfg, local_executor(cfg, stages))
    for sid, (prompt, seed, chunks) in streams.items():
        engine.add_stream(sid, prompt, seed, sampler=sampler, video=params)
        for i, chunk in enumerate(chunks):
            engine.push_input(sid, chunk, meta=i)
        engine.end_input(sid)
    if n_streams == 3:
        engine.add_stream("t", "an owl at night", 3)  # a text-to-video stream in the same micro-batches
    got = {sid: {} for sid in [*streams, "t"]}
    metas = {sid: [] for sid in streams}
    for _ in range(10_000):
        for o in engine.step():
            got[o.stream_id][o.chunk] = o.latents
            if o.stream_id in metas:
                metas[o.stream_id].append(o.input)
        if all(len(metas[s]) == 5 for s in streams) and (n_streams == 1 or len(got["t"]) >= 4):
            break
    ref = ReferenceGenerator(cfg)
    for sid, (prompt, seed, chunks) in streams.items():
        assert metas[sid] == list(range(5))  # every input chunk's output, in order
        want = ref.transform(chunks, prompt, seed, params, sampler=sampler)
        assert [i for i, _, _ in want] == list(range(5))
        for chunk, (_, _, x0) in enumerate(want):
            err = (got[sid][chunk] - x0).abs().max().item()
            assert err <= 1e-4, f"{sid} chunk {chunk}: {err}"
    if n_streams == 3:
        assert_matches_reference(cfg, {"t": got["t"]}, {"t": ("an owl at night", 3)}, 4)


def test_v2v_first_step_follows_motion_and_input_shapes_are_checked():
    cfg = gen_config("sequential")
    engine = make_engine(cfg, local_executor(cfg, 1))
    engine.add_stream("v", "p", 0, sampler=video_sampler(cfg.sampler, 3), video=VideoParams(0.8, True))
    chunks = video(3, cfg.sampler.chunk_frames, speed=40)
    chunks[0] = chunks[0][:1].expand(5, -1, -1, -1).contiguous()  # a still first chunk, then fast motion
    with pytest.raises(ValueError, match="needs 5 frames"):
        engine.push_input("v", chunks[1], meta=0)  # the first chunk takes 1 + 4 (f - 1) frames
    for i, chunk in enumerate(chunks):
        engine.push_input("v", chunk, meta=i)
    program = engine.streams["v"].program
    scales = [program.inputs[c].noise_scale for c in range(3)]
    assert scales[0] == pytest.approx(0.8) and scales[1] == pytest.approx(0.9 * 0.7 + 0.1 * 0.8)  # motion: less noise
    works = [program.next_work("v") for _ in range(5)]  # chunk 0: 3 steps and its context pass; chunk 1 enters
    assert [w.input.chunk if w.input else None for w in works] == [0, None, None, None, 1]
    assert works[0].timesteps == (program.schedule.timestep_of(first_step(scales[0])),)
    want = program.schedule.timestep_of(first_step(scales[1]))  # 610 before the warp
    assert works[4].timesteps == (want,) and not math.isclose(want, program.schedule.timesteps[0])
    assert works[4].entry_sigmas == ((program.schedule.sigma(want), program.sigmas[1]),)


def test_a_video_streams_encode_is_fitted_apart_and_charged_to_video_streams_only(monkeypatch):
    """Stage 0's VAE encode is its own fit: the video figures include it, and once the video stream has left,
    text-to-video capacity is what the forwards alone give (before, the encode raised stage 0's forward fit
    until new traffic washed it out, and admission kept refusing text streams meanwhile)."""
    cfg = gen_config("sequential")
    engine = make_engine(cfg, local_executor(cfg, 1))
    engine.calibrate()
    engine.add_stream("v", "a watercolor painting", 1, sampler=video_sampler(cfg.sampler, 3),
                      video=VideoParams(noise_scale=0.8))
    encoder = engine.executor.stages[0].encoder
    encode_chunk = encoder.encode_chunk

    def slow(pixels, state):  # an encoder far slower than the tiny DiT's forward (a few ms): 0.4 s a chunk
        time.sleep(0.4)
        return encode_chunk(pixels, state)

    monkeypatch.setattr(encoder, "encode_chunk", slow)
    for i, chunk in enumerate(video(4, cfg.sampler.chunk_frames)):
        engine.push_input("v", chunk, meta=i)
    engine.end_input("v")
    done = 0
    for _ in range(10_000):
        done += sum(o.stream_id == "v" for o in engine.step())
        if done == 4:
            break
    engine.remove_stream("v")
    assert done == 4 and engine.latency.encode.n > 0
    assert engine.latency.encode_time() >= 0.4
    # no encode in the forward fit (1 forward in 4 carries one: with it, the fit's mean is ~0.1 s)
    forward = engine.latency.forward_latency(engine._forwards_and_tokens(3)[1])
    assert forward < 0.05, forward
    assert engine.predicted_chunk_latency(3, video=True) >= engine.predicted_chunk_latency(3) + 0.4
    assert engine.frame_rate(3, video=True) < engine.frame_rate(3)


def test_a_steps_change_keeps_a_video_stream_on_its_input():
    """A steps change restarts unfinished chunks under the new list; a video stream stays one: its chunks
    still wait for input, and each input chunk's output comes back once, in order."""
    cfg = gen_config("sequential")
    engine = make_engine(cfg, local_executor(cfg, 1))
    engine.add_stream("v", "p", 0, sampler=video_sampler(cfg.sampler, 3), video=VideoParams(0.8, True))
    chunks = video(4, cfg.sampler.chunk_frames)
    engine.push_input("v", chunks[0], meta=0)
    metas = []
    for _ in range(200):
        metas += [o.input for o in engine.step()]
        if metas:
            break
    engine.set_steps("v", video_sampler(cfg.sampler, 2).denoising_steps)
    engine.push_input("v", chunks[1], meta=1)
    for _ in range(200):
        metas += [o.input for o in engine.step()]
        if engine.idle and not engine.streams["v"].program.ready():
            break
    program = engine.streams["v"].program
    assert program.video and len(program.sigmas) == 2
    assert metas == [0, 1]  # nothing generated from noise ahead of the input
    assert not program.ready() and program.next_chunk == 2  # chunk 2 waits for its input
    engine.push_input("v", chunks[2], meta=2)
    engine.end_input("v")
    for _ in range(200):
        metas += [o.input for o in engine.step()]
        if metas[-1:] == [2]:
            break
    assert metas == [0, 1, 2]
