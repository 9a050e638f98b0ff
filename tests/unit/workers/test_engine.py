"""PipelineEngine with the in-process executor: equality with the reference, controls, rebalance, cleanup."""

import pickle

import pytest
import torch

from tests.engine_cases import STREAMS, assert_matches_reference, collect, gen_config, make_engine
from workers.engine import PipelineEngine
from workers.executor import InProcessExecutor
from workers.model.text import build_text_encoder


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("mode,lanes,attention", [("sequential", 1, "inflight"), ("stream_batch", 1, "inflight"),
                                                  ("stream_batch", 2, "inflight"), ("stream_batch", 1, "clean")])
@pytest.mark.parametrize("n_streams", [1, 3])
def test_engine_equals_reference(stages, mode, lanes, attention, n_streams):
    cfg = gen_config(mode, lanes, attention=attention)
    streams = dict(list(STREAMS.items())[:n_streams])
    engine = make_engine(cfg, InProcessExecutor(cfg.model, stages))
    for sid, (prompt, seed) in streams.items():
        engine.add_stream(sid, prompt, seed)
    got = collect(engine, {sid: 5 for sid in streams})
    assert_matches_reference(cfg, got, streams, 5)


def test_one_stream_with_lanes_fills_the_pipeline():
    cfg = gen_config("stream_batch", lanes=3)
    engine = make_engine(cfg, InProcessExecutor(cfg.model, 3))
    engine.add_stream("a", "x", 0)
    collect(engine, {"a": 3})
    assert engine.stats.max_inflight == 3
    cfg1 = gen_config("stream_batch", lanes=1)
    engine1 = make_engine(cfg1, InProcessExecutor(cfg1.model, 3))
    engine1.add_stream("a", "x", 0)
    collect(engine1, {"a": 3})
    assert engine1.stats.max_inflight == 1  # each forward waits for the previous one


@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
def test_rebalance_mid_stream_keeps_reference_frames(mode):
    cfg = gen_config(mode)
    executor = InProcessExecutor(cfg.model, 2)
    engine = make_engine(cfg, executor)
    for sid, (prompt, seed) in STREAMS.items():
        engine.add_stream(sid, prompt, seed)
    first = collect(engine, {sid: 3 for sid in STREAMS})
    before = executor.cache_bytes()
    executor.rebalance([(0, 1), (1, 4)])
    assert executor.split() == [(0, 1), (1, 4)]
    after = executor.cache_bytes()
    assert after[0] < before[0] and after[1] > before[1]  # block 1's KV caches moved with it
    second = collect(engine, {sid: 6 for sid in STREAMS})
    got = {sid: {**first[sid], **second[sid]} for sid in STREAMS}
    assert_matches_reference(cfg, got, STREAMS, 6)


def test_removing_streams_returns_cache_bytes_to_baseline():
    cfg = gen_config("sequential")
    executor = InProcessExecutor(cfg.model, 2)
    engine = make_engine(cfg, executor)
    baseline = executor.cache_bytes()
    for sid, (prompt, seed) in STREAMS.items():
        engine.add_stream(sid, prompt, seed)
    collect(engine, {sid: 2 for sid in STREAMS})
    assert all(b > a for a, b in zip(baseline, executor.cache_bytes()))
    for sid in STREAMS:
        engine.remove_stream(sid)
    engine.step(wait=False)
    assert executor.cache_bytes() == baseline
    assert not engine.streams


@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
def test_prompt_change_control_matches_reference_switch(mode):
    cfg = gen_config(mode)
    engine = make_engine(cfg, InProcessExecutor(cfg.model, 2))
    engine.add_stream("a", "a cat on a sofa", 1)
    got = collect(engine, {"a": 2})
    engine.set_prompt("a", "a castle at night")
    switch_at = None
    for _ in range(1000):
        for o in engine.step():
            got["a"][o.chunk] = o.latents
            if o.prompt_revision == 1 and switch_at is None:
                switch_at = o.chunk
        if len(got["a"]) >= 6:
            break
    for o in engine.drain():
        got["a"][o.chunk] = o.latents
    assert switch_at is not None
    # chunks in flight when the control arrived finish first (<= pipeline depth + 1 chunks), then the switch
    assert 2 <= switch_at <= 2 + 2 + 1
    assert_matches_reference(cfg, got, {"a": ("a cat on a sofa", 1)}, 6,
                             prompt_schedules={"a": {switch_at: "a castle at night"}})


def test_steps_change_continues_with_increasing_chunks():
    cfg = gen_config("sequential")
    engine = make_engine(cfg, InProcessExecutor(cfg.model, 2))
    engine.add_stream("a", "p", 4)
    got = collect(engine, {"a": 2})
    engine.set_steps("a", (1000, 500))
    more = collect(engine, {"a": 5})
    chunks = sorted({**got["a"], **more["a"]})
    assert chunks == list(range(len(chunks))) and len(chunks) >= 5
    ref = collect(_fresh(cfg), {"a": 5})
    assert (more["a"][4] - ref["a"][4]).abs().max() > 1e-3  # the two-step chunks differ


def _fresh(cfg):
    engine = make_engine(cfg, InProcessExecutor(cfg.model, 2))
    engine.add_stream("a", "p", 4)
    return engine


def test_stage_stats_and_latency_model_are_fed():
    cfg = gen_config("sequential")
    engine = make_engine(cfg, InProcessExecutor(cfg.model, 2))
    engine.add_stream("a", "p", 0)
    collect(engine, {"a": 2})
    stats = engine.stats
    assert all(c > 0 for c in stats.compute_s)
    assert stats.bytes_sent[0] > 0 and stats.bytes_sent[1] == 0  # the last stage sends nothing on
    assert [s.stage for s in stats.last_stage_stats] == [0, 1]
    assert engine.latency.calibrated and engine.latency.tick(48) > 0


@pytest.mark.parametrize("layers_per_group", [1, 2])
@pytest.mark.parametrize("mode,attention", [("sequential", "inflight"), ("stream_batch", "clean")])
def test_step_split_and_grid_equal_reference(layers_per_group, mode, attention):
    """2 step groups (steps {0, 1} and {2, 3}), each a 1- or 2-stage layer split: 2 or 2x2 devices."""
    from workers.executor import StepSplitExecutor

    cfg = gen_config(mode, attention=attention)
    groups = [InProcessExecutor(cfg.model, layers_per_group) for _ in range(2)]
    executor = StepSplitExecutor(groups, [[0, 1], [2, 3]])
    assert executor.num_stages == 2 * layers_per_group
    engine = make_engine(cfg, executor)
    for sid, (prompt, seed) in STREAMS.items():
        engine.add_stream(sid, prompt, seed)
    got = collect(engine, {sid: 5 for sid in STREAMS})
    assert_matches_reference(cfg, got, STREAMS, 5)
    # every group computed only its own steps: group caches hold the same committed context
    assert executor.cache_bytes()[:layers_per_group] == executor.cache_bytes()[layers_per_group:]


def test_step_split_rejects_stream_batch():
    from workers.executor import StepSplitExecutor

    cfg = gen_config("stream_batch")
    executor = StepSplitExecutor([InProcessExecutor(cfg.model, 1) for _ in range(2)], [[0, 1], [2, 3]])
    engine = make_engine(cfg, executor)
    engine.add_stream("a", "p", 0)
    with pytest.raises(ValueError, match="batch_attention"):
        collect(engine, {"a": 3})


def test_block_scheduler_rebalances_a_skewed_split_and_keeps_frames():
    from orchestrator.config import EngineConfig

    cfg = gen_config("sequential")
    executor = InProcessExecutor(cfg.model, 2, split=[(0, 1), (1, 4)])  # stage 1 does 3x the blocks
    engine = make_engine(cfg, executor)
    engine.engine_cfg = EngineConfig(profile_every=1, rebalance_every=8, rebalance_threshold=0.2)
    for sid, (prompt, seed) in STREAMS.items():
        engine.add_stream(sid, prompt, seed)
    got = collect(engine, {sid: 6 for sid in STREAMS})
    assert engine.rebalances >= 1
    assert executor.split() != [(0, 1), (1, 4)]
    split, best, now = engine.planned_split()
    assert now <= (1 + 0.2) * best or split == executor.split()
    assert_matches_reference(cfg, got, STREAMS, 6)


def test_calibrate_at_start_fixes_a_skewed_split_and_predicts_capacity():
    cfg = gen_config("sequential")
    executor = InProcessExecutor(cfg.model, 2, split=[(0, 3), (3, 4)])
    engine = make_engine(cfg, executor)
    assert not engine.latency.calibrated
    split = engine.calibrate()
    assert split != [(0, 3), (3, 4)] and engine.rebalances == 1
    assert engine.latency.calibrated
    one = engine.predicted_chunk_latency(1)
    four = engine.predicted_chunk_latency(4)
    assert 0 < one < four
    assert engine.max_streams(16.0, 1) >= engine.max_streams(16.0, 4) >= 0
    assert executor.cache_bytes() == [0, 0]  # the profiling stream is gone
    engine.add_stream("a", "a cat on a sofa", 1)
    got = collect(engine, {"a": 3})
    assert_matches_reference(cfg, got, {"a": ("a cat on a sofa", 1)}, 3)


def test_max_ahead_bounds_work_done_ahead_of_the_consumer():
    cfg = gen_config("sequential")
    engine = make_engine(cfg, InProcessExecutor(cfg.model, 1))
    engine.add_stream("a", "p", 0, max_ahead=2)
    produced = []
    for _ in range(200):
        produced += engine.step()
    assert len(produced) == 2  # waits for the consumer
    engine.consumed("a")
    for _ in range(200):
        produced += engine.step()
    assert len(produced) == 3


@pytest.mark.parametrize("mode,lanes", [("sequential", 1), ("stream_batch", 2)])
def test_restore_from_checkpoint_continues_like_a_moved_stream(mode, lanes):
    """A checkpoint (what the orchestrator keeps per stream) restored on another engine continues exactly
    as the live stream state moved there would: same re-cache, same chunks, same latents."""
    cfg = gen_config(mode, lanes)
    source = make_engine(cfg, InProcessExecutor(cfg.model, 2))
    source.add_stream("a", "a cat on a sofa", 1)
    collect(source, {"a": 3})
    ckpt = source.checkpoint("a")
    assert ckpt.next_chunk >= 3 and [c for c, _ in ckpt.history] == list(range(ckpt.next_chunk))[-2:]
    moved = make_engine(cfg, InProcessExecutor(cfg.model, 2))
    moved.import_stream(source.export_stream("a"))
    restored = make_engine(cfg, InProcessExecutor(cfg.model, 1))
    restored.restore(pickle.loads(pickle.dumps(ckpt)))  # it crosses processes
    with pytest.raises(ValueError):
        restored.restore(ckpt)
    want, got = collect(moved, {"a": 4})["a"], collect(restored, {"a": 4})["a"]
    assert sorted(got)[:4] == list(range(ckpt.next_chunk, ckpt.next_chunk + 4))
    for chunk in list(range(ckpt.next_chunk, ckpt.next_chunk + 4)):
        assert (got[chunk] - want[chunk]).abs().max() <= 1e-5


def test_restore_rewarms_the_decoder_on_recent_latents():
    from workers.model.vae import TinyVAE

    cfg = gen_config("sequential")
    source = PipelineEngine(cfg, InProcessExecutor(cfg.model, 1), build_text_encoder(cfg.model), TinyVAE(cfg.model))
    source.add_stream("a", "x", 0)
    collect(source, {"a": 2})
    ckpt = source.checkpoint("a")
    target = PipelineEngine(cfg, InProcessExecutor(cfg.model, 1), build_text_encoder(cfg.model), TinyVAE(cfg.model))
    target.restore(ckpt)
    state = target.streams["a"].decoder_state
    fresh = TinyVAE(cfg.model).new_state()
    assert not _same_state(state, fresh)  # the causal-conv caches hold the recent latents, not zeros
    out = collect(target, {"a": 1})
    assert min(out["a"]) == ckpt.next_chunk


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b
