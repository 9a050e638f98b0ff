"""The simulator: the real engine on a fake clock over hand-made profiles with known answers."""

import json
import math

import pytest

from workers.config import EngineConfig, GenerationConfig, ParallelConfig, SamplerConfig, get_config
from workers.costs import Linear, ModelCosts, Profile, load_profile
from workers.sim import FakeClock, SimExecutor, build, simulate

FPC = 4  # video frames per chunk: one latent frame, the VAE's temporal stride 4


def gen(mode="sequential", steps=4, lanes=1) -> GenerationConfig:
    step_list = tuple(1000.0 * (steps - i) / steps for i in range(steps))
    return GenerationConfig(model=get_config("small"), sampler=SamplerConfig(denoising_steps=step_list, chunk_frames=1,
                                                                              mode=mode, lanes=lanes))


FREE = Linear()


def profile(block: Linear = FREE, decode: Linear = FREE, **kw) -> Profile:
    return Profile(name="hand", models={"small": ModelCosts(block=block, vae_decode=decode)}, **kw)


def per_call(seconds: float, blocks: int) -> Linear:
    """A block cost that makes a stage of ``blocks`` blocks take ``seconds`` per call, whatever the tokens."""
    return Linear(seconds / blocks, 0.0)


def test_two_stages_of_10ms_tick_10ms():
    # 8 blocks, 4 per stage, 10 ms a call; sequential 4 steps: 5 forwards a chunk; 2 streams keep both stages busy
    r = simulate(gen(), ParallelConfig(stages=2, decode_workers=0), profile(per_call(0.010, 4)), streams=2,
                 duration_s=4.0, engine_cfg=EngineConfig(rebalance_every=0))
    assert r.split == [(0, 4), (4, 8)]
    assert r.frames_per_s == pytest.approx(100 / 5 * FPC, rel=0.01)  # one forward per 10 ms tick
    assert r.utilization["stage 0 compute"] == pytest.approx(1.0, abs=0.01)
    assert r.min_stream_fps == pytest.approx(r.frames_per_s / 2, rel=0.01)
    assert r.streams_at_fps == 2  # 40 frames/s each, at the default 16
    # a chunk finishes with its 4th step: 4 chained forwards through 2 stages of 10 ms, after 10 ms in stage 0's
    # queue (the Ray executor's one micro-batch beyond the stages)
    assert r.latency_p50_s == pytest.approx(4 * 0.020 + 0.010, rel=0.01)
    assert r.stage_compute_s == pytest.approx([0.010, 0.010], rel=0.01)  # per micro-batch, as EngineStats counts


def test_one_stream_cannot_fill_two_stages_in_sequential_mode():
    # each forward waits for the previous one's ring latents (20 ms round trip), except a chunk's step 0, which
    # starts from noise right behind the context pass: 4 x 20 + 10 ms a chunk, stage 0 busy 5 x 10 ms of it
    r = simulate(gen(), ParallelConfig(stages=2, decode_workers=0), profile(per_call(0.010, 4)), streams=1,
                 duration_s=4.0, engine_cfg=EngineConfig(rebalance_every=0))
    assert r.frames_per_s == pytest.approx(FPC / 0.090, rel=0.01)
    assert r.utilization["stage 0 compute"] == pytest.approx(0.050 / 0.090, abs=0.02)


def test_decode_capped_by_a_dedicated_decoder():
    # DiT 10 ms per micro-batch, decode 50 ms per chunk on one dedicated GPU: 20 chunks/s at most
    tokens = get_config("small").tokens_per_frame(128, 256)
    p = profile(per_call(0.010, 8), decode=Linear(0.0, 0.050 / tokens))
    r = simulate(gen("stream_batch", steps=1), ParallelConfig(stages=1, decode="dedicated", decode_workers=1), p,
                 streams=4, duration_s=6.0, max_ahead=3)
    assert r.frames_per_s == pytest.approx(20 * FPC, rel=0.02)
    assert r.bottleneck == "decode"
    assert r.utilization["decode"] == pytest.approx(1.0, abs=0.02)
    assert r.utilization["stage 0 compute"] < 0.5  # held back by the streams' bounded look-ahead
    assert r.latency_p99_s < 1.0  # bounded: the decode queue does not grow


def test_shared_decode_takes_the_last_stage_time():
    # one stream, sequential 1 step: 2 forwards of 10 ms plus a 10 ms decode on the same device per chunk
    tokens = get_config("small").tokens_per_frame(128, 256)
    p = profile(per_call(0.010, 8), decode=Linear(0.0, 0.010 / tokens))
    r = simulate(gen(steps=1), ParallelConfig(stages=1, decode="shared", decode_workers=1), p, streams=1,
                 duration_s=4.0)
    assert r.frames_per_s == pytest.approx(FPC / 0.030, rel=0.01)
    assert r.utilization["stage 0 compute"] == pytest.approx(1.0, abs=0.02)
    assert r.utilization["decode"] == pytest.approx(1 / 3, abs=0.02)
    assert r.bottleneck == "stage 0 compute"


def test_costs_scale_with_tokens_and_batch():
    # pure per-token cost: batching 2 streams doubles the micro-batch time, frames/s stays the same
    tokens = get_config("small").tokens_per_frame(128, 256)
    p = profile(Linear(0.0, 0.001 / tokens))  # 1 ms per block per latent frame: 8 ms a one-stream forward
    one = simulate(gen(), ParallelConfig(stages=1, decode_workers=0), p, streams=1, duration_s=4.0)
    two = simulate(gen(), ParallelConfig(stages=1, decode_workers=0), p, streams=2, duration_s=4.0)
    assert one.frames_per_s == pytest.approx(FPC / (5 * 0.008), rel=0.01)
    assert two.frames_per_s == pytest.approx(one.frames_per_s, rel=0.01)
    assert two.min_stream_fps == pytest.approx(one.frames_per_s / 2, rel=0.02)


def test_memory_per_gpu_from_the_device_map():
    p = profile(per_call(0.010, 8), gpu_memory_gib=1.0, dtype="float32")
    one = simulate(gen(), ParallelConfig(stages=2, decode_workers=1), p, streams=1, duration_s=1.0)
    three = simulate(gen(), ParallelConfig(stages=2, decode_workers=1), p, streams=3, duration_s=1.0)
    per_stream = [b - a for a, b in zip(one.memory_bytes, three.memory_bytes)]
    assert all(d > 0 for d in per_stream) and len(per_stream) == 2
    assert one.memory_streams is not None and one.memory_streams > 3


def test_noise_is_seeded():
    p = profile(per_call(0.010, 8))
    run = [simulate(gen(), ParallelConfig(stages=1, decode_workers=0), p, streams=2, duration_s=2.0, noise=0.3,
                    seed=s).frames_per_s for s in (1, 1, 2)]
    exact = simulate(gen(), ParallelConfig(stages=1, decode_workers=0), p, streams=2, duration_s=2.0).frames_per_s
    assert run[0] == run[1] and run[0] != run[2]
    assert run[0] == pytest.approx(exact, rel=0.25)


def test_finished_latents_have_the_chunk_shape():
    clock = FakeClock()
    g = gen()
    ex = SimExecutor(g, ParallelConfig(stages=1, decode_workers=0), profile(per_call(0.010, 8)), clock)
    engine, _, clock = build(g, ParallelConfig(stages=1, decode_workers=0), profile(per_call(0.010, 8)))
    engine.add_stream("a", "p", 0)
    out = engine.run_chunks({"a": 2})["a"]
    assert [o.chunk for o in out] == [0, 1]
    assert tuple(out[0].latents.shape) == (1,) + ex.latent_shape
    # 2 chunks x 4 steps and chunk 0's context pass, 10 ms each, nothing else
    assert clock.now() == pytest.approx(9 * 0.010)
    assert out[1].latency_s == pytest.approx(5 * 0.010)  # dispatched with the context pass, 2nd in flight


@pytest.mark.parametrize("mode,stages", [("sequential", 1), ("sequential", 2), ("stream_batch", 1),
                                         ("stream_batch", 2)])
def test_admission_agrees_with_the_simulation(mode, stages):
    # the engine's max_streams (its latency model, fitted from what the simulated stages reported) and the
    # streams the simulation sustains at fps, for the same per-token costs
    tokens = get_config("small").tokens_per_frame(128, 256)
    p = profile(Linear(0.0, 0.0013 / tokens))
    fps = 7.0
    r = simulate(gen(mode, lanes=stages if mode == "stream_batch" else 1), ParallelConfig(stages=stages,
                 decode_workers=0), p, streams=2 * stages, duration_s=6.0, fps=fps)
    assert r.admission_streams == math.floor(r.frames_per_s / fps)
    assert r.admission_streams >= 1


def test_profile_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_profile(str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        load_profile(str(tmp_path / "missing.json"))
    bad.write_text(json.dumps({"name": "x", "models": {"nope": {"block": {"a_s": 0, "b_s": 0}}}}))
    with pytest.raises(ValueError, match="unknown models"):
        load_profile(str(bad))
    bad.write_text(json.dumps({"name": "x", "models": {"small": {"block": {"a_s": -1, "b_s": 0}}}}))
    with pytest.raises(ValueError, match="a_s"):
        load_profile(str(bad))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"_comment": "doc", "name": "x", "models": {"small": {"block": {"a_s": 0.1}}}}))
    prof = load_profile(str(good))
    assert prof.costs("small").block(1000) == 0.1
    with pytest.raises(ValueError, match="no costs for model 'tiny'"):
        prof.costs("tiny")


def test_measured_like_the_benches():
    # P=1, 10 ms a forward: chunk 0 out at 40 ms (warm-up), then one every 50 ms (4 steps + the context pass)
    r = simulate(gen(), ParallelConfig(stages=1, decode_workers=0), profile(per_call(0.010, 8)), streams=1,
                 duration_s=100.0, chunks=(1, 2))
    assert r.chunks == 2
    assert r.frames_per_s == pytest.approx(2 * FPC / 0.100)
    assert r.latency_p50_s == pytest.approx(0.050)


def test_attention_over_the_cache_grows_with_the_frames_committed_up_to_its_capacity():
    from workers.batch import MicroBatch, Work

    g = gen()  # default cache: 3 sink + 6 window = 9 frames
    m = g.model
    grid = m.token_grid(g.height, g.width)
    tpf = grid[0] * grid[1]
    p = Profile(name="hand", models={"small": ModelCosts(block=FREE, attention_s=1e-9)})
    ex = SimExecutor(g, ParallelConfig(stages=1, decode_workers=0), p, FakeClock())

    def cost(chunk: int) -> float:
        mb = MicroBatch(0, [Work("s", 0, 0, ((chunk, 0),), (500.0,), ((0.5, 0.0),), 4, 1)], grid, {})
        return ex.stage_cost(0, mb.tokens, ex.cached_pairs(mb))

    assert cost(0) == 0.0  # the first chunk attends to itself only (folded into block)
    assert cost(2) == pytest.approx(m.num_layers * 1e-9 * tpf * 2 * tpf)
    assert cost(100) == pytest.approx(m.num_layers * 1e-9 * tpf * 9 * tpf) == cost(9)


def test_contention_is_one_on_gpus_and_grows_with_busy_cores():
    gpu = profile(shared_slowdown=1.5)  # no cores: each stage owns its device
    assert gpu.contention(3.0) == 1.0
    cpu = profile(cores=2, shared_slowdown=1.5)
    assert cpu.contention(0.0) == 1.0 and cpu.contention(0.5) == pytest.approx(1.25)
    assert cpu.contention(1.0) == pytest.approx(1.5)
    assert cpu.contention(2.0) == pytest.approx(1.5 * 3 / 2)  # three processes on two cores: time sharing too
    assert profile(cores=1).contention(1.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        profile(cores=2, shared_slowdown=0.5)


@pytest.mark.parametrize("stages,streams,slowed", [(2, 2, 1.5), (1, 2, 1.0)])
def test_stages_sharing_a_cpus_cores_run_at_the_shared_speed(stages, streams, slowed):
    """Two stages busy all the time on a 2-core host whose cores give 1.5x the time when both compute: every
    forward takes 15 ms instead of 10 (after the first window). One stage alone on the host: no change."""
    block = per_call(0.010, 8 // stages)  # 10 ms a forward per stage
    p, free = profile(block, cores=2, shared_slowdown=1.5), profile(block)
    kw = dict(streams=streams, duration_s=8.0, engine_cfg=EngineConfig(rebalance_every=0))
    shared = simulate(gen(), ParallelConfig(stages=stages, decode_workers=0), p, **kw)
    alone = simulate(gen(), ParallelConfig(stages=stages, decode_workers=0), free, **kw)
    assert alone.frames_per_s / shared.frames_per_s == pytest.approx(slowed, rel=0.03)
    assert shared.latency_p50_s / alone.latency_p50_s == pytest.approx(slowed, rel=0.03)


def test_one_stream_on_two_cpu_stages_pays_contention_only_while_they_overlap():
    """The sequential single stream's forwards take turns on the two stages (test above): only a chunk's step 0 on
    stage 0 runs beside its context pass on stage 1, 10 ms of a 90 ms chunk. Contention slows those, not the
    chain: the chunk takes at most 2 x 5 ms longer, not 1.5x (what the stages' plain utilisation would give)."""
    p = profile(per_call(0.010, 4), cores=2, shared_slowdown=1.5)
    kw = dict(streams=1, duration_s=8.0, engine_cfg=EngineConfig(rebalance_every=0))
    shared = simulate(gen(), ParallelConfig(stages=2, decode_workers=0), p, **kw)
    alone = simulate(gen(), ParallelConfig(stages=2, decode_workers=0), profile(per_call(0.010, 4)), **kw)
    assert 1.0 < alone.frames_per_s / shared.frames_per_s <= 0.100 / 0.090 + 0.01


@pytest.mark.parametrize("mode,stages", [("sequential", 2), ("stream_batch", 1)])
def test_the_capacity_a_serve_hosted_core_reports_admits_as_the_engine_does(mode, stages):
    """A Serve-hosted replica admits from the ``Capacity`` its core reports (pickled across processes): the same
    max streams as the engine's own (micro-batch sizes and the memory cap included) and the same latencies,
    for every fps, step count and stream kind."""
    import pickle

    engine, _, _ = build(gen(mode), ParallelConfig(stages=stages, decode_workers=1),
                         profile(Linear(5e-4, 2e-8), decode=Linear(0.004, 0.0)), EngineConfig(max_batch_streams=4))
    for _ in range(3):  # a fixed cost per call, which micro-batches of several streams split
        for stage in range(stages):
            for tokens in (100, 200, 400, 800):
                engine.latency.observe(stage, tokens, 0.004 + 1e-6 * tokens)
    engine.latency.observe_encode(0.03)  # a video chunk's encode on stage 0: video figures differ from text ones
    assert engine.frame_rate(4, False, 4) > 1.5 * engine.frame_rate(4, False, 1)
    capacity = pickle.loads(pickle.dumps(engine.capacity(8)))
    capped = engine.capacity(8, memory_streams=3)
    seen = set()
    for steps in (1, 2, 4, 8):
        for video in (False, True):
            assert capacity.predicted_chunk_latency(steps, video) == engine.predicted_chunk_latency(steps, video)
            for fps in (1.0, 4.0, 8.0, 16.0, 30.0):
                want = engine.max_streams(fps, steps, video)
                assert capacity.max_streams(fps, steps, video) == want, (steps, video, fps)
                assert capped.max_streams(fps, steps, video) == min(want, 3)
                seen.add(want)
    assert len(seen) > 3  # the cases span several capacities, not one
    assert capacity.max_streams(16.0, 4, True) < capacity.max_streams(16.0, 4, False)
