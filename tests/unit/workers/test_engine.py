"""PipelineEngine with the in-process executor: equality with the reference, controls, rebalance, cleanup."""

import pickle

import pytest
import torch

from tests.engine_cases import STREAMS, assert_matches_reference, collect, gen_config, local_executor, make_engine
from workers.config import GenerationConfig, get_config


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("mode,lanes,attention", [("sequential", 1, "inflight"), ("stream_batch", 1, "inflight"),
                                                  ("stream_batch", 2, "inflight"), ("stream_batch", 1, "clean")])
@pytest.mark.parametrize("n_streams", [1, 3])
def test_engine_equals_reference(stages, mode, lanes, attention, n_streams):
    cfg = gen_config(mode, lanes, attention=attention)
    streams = dict(list(STREAMS.items())[:n_streams])
    engine = make_engine(cfg, local_executor(cfg, stages))
    for sid, (prompt, seed) in streams.items():
        engine.add_stream(sid, prompt, seed)
    got = collect(engine, {sid: 5 for sid in streams})
    assert_matches_reference(cfg, got, streams, 5)


def test_one_stream_with_lanes_fills_the_pipeline():
    cfg = gen_config("stream_batch", lanes=3)
    engine = make_engine(cfg, local_executor(cfg, 3))
    engine.add_stream("a", "x", 0)
    collect(engine, {"a": 3})
    assert engine.stats.max_inflight == 3
    assert engine.stats.chained == 0  # three lanes: no forward waits for another
    cfg1 = gen_config("stream_batch", lanes=1)
    engine1 = make_engine(cfg1, local_executor(cfg1, 3))
    engine1.add_stream("a", "x", 0)
    collect(engine1, {"a": 3})
    # one lane: each forward takes the previous one's latents; it is issued at once and stage 0 waits
    assert engine1.stats.max_inflight == 3
    # (the first forward of each engine step follows one already collected, the other two are chained)
    assert engine1.stats.chained == engine1.stats.forwards * 2 // 3


def test_inflight_counts_what_is_in_flight_after_completions_too():
    """``stats.inflight`` (the in-flight gauge) follows completions as well as dispatches: a drained engine
    reports nothing in flight."""
    cfg = gen_config("sequential")
    engine = make_engine(cfg, local_executor(cfg, 2))
    engine.add_stream("a", "x", 0)
    collect(engine, {"a": 2})
    assert engine.stats.max_inflight == engine.executor.max_inflight == 2  # the pipeline was full
    engine.remove_stream("a")
    engine.drain()
    assert engine.idle and engine.stats.inflight == 0


def test_no_latents_reach_the_driver_between_steps():
    """The ring: the executor hands back only clean latents of finished chunks, once per chunk, and the
    micro-batches the engine submits carry no latents except a re-cache's."""
    cfg = gen_config("sequential")
    executor = local_executor(cfg, 2)
    submitted, returned = [], []
    submit, collect_ = executor.submit, executor.collect
    executor.submit = lambda mb: (submitted.append(mb), submit(mb))[1]
    executor.collect = lambda wait: (lambda got: returned.extend(got.finished) or got)(collect_(wait))
    engine = make_engine(cfg, executor)
    engine.add_stream("a", "a cat on a sofa", 1)
    got = collect(engine, {"a": 4})
    entries = sorted(e for mb in submitted for w in mb.segments for e in w.entries if e[0] < 4)
    assert entries == sorted([(c, -1) for c in range(4)] + [(c, s) for c in range(4) for s in range(4)]) or \
        entries == sorted([(c, -1) for c in range(3)] + [(c, s) for c in range(4) for s in range(4)])
    assert all(w.inline is None for mb in submitted for w in mb.segments)
    chunks = [c for d in returned for seg in d.chunks for c, _ in seg]
    assert chunks == [0, 1, 2, 3]  # each chunk's clean latents once, nothing for the other forwards
    assert_matches_reference(cfg, got, {"a": ("a cat on a sofa", 1)}, 4)


@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
def test_rebalance_mid_stream_keeps_reference_frames(mode):
    cfg = gen_config(mode)
    executor = local_executor(cfg, 2)
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
    executor = local_executor(cfg, 2)
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
    engine = make_engine(cfg, local_executor(cfg, 2))
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
    engine = make_engine(cfg, local_executor(cfg, 2))
    engine.add_stream("a", "p", 4)
    got = collect(engine, {"a": 2})
    engine.set_steps("a", (1000, 500))
    more = collect(engine, {"a": 5})
    chunks = sorted({**got["a"], **more["a"]})
    assert chunks == list(range(len(chunks))) and len(chunks) >= 5
    ref = collect(_fresh(cfg), {"a": 5})
    assert (more["a"][4] - ref["a"][4]).abs().max() > 1e-3  # the two-step chunks differ


def _fresh(cfg):
    engine = make_engine(cfg, local_executor(cfg, 2))
    engine.add_stream("a", "p", 4)
    return engine


def test_stage_stats_and_latency_model_are_fed():
    cfg = gen_config("sequential")
    engine = make_engine(cfg, local_executor(cfg, 2))
    engine.add_stream("a", "p", 0)
    collect(engine, {"a": 2})
    stats = engine.stats
    assert all(c > 0 for c in stats.compute_s)
    # stage 0 hands on activations; the last stage sends only next-step latents back round the ring
    assert stats.bytes_sent[0] > stats.bytes_sent[1] > 0
    assert [s.stage for s in stats.last_stage_stats] == [0, 1]
    assert engine.latency.calibrated and engine.latency.tick(48) > 0


def test_block_scheduler_rebalances_a_skewed_split_and_keeps_frames():
    from workers.config import EngineConfig

    cfg = gen_config("sequential")
    executor = local_executor(cfg, 2, split=[(0, 1), (1, 4)])  # stage 1 does 3x the blocks
    real_collect = executor.collect

    def collect_on_a_fake_clock(wait):
        """Each block costs 1 ms per token, whatever the machine's load: the split decision is deterministic."""
        got = real_collect(wait)
        for done in got.finished:
            for s in done.stats:
                s.block_s = {b: 1e-3 * s.tokens for b in s.block_s}
                s.compute_s = sum(s.block_s.values())
        return got

    executor.collect = collect_on_a_fake_clock
    engine = make_engine(cfg, executor)
    engine.engine_cfg = EngineConfig(profile_every=1, rebalance_every=8, rebalance_threshold=0.2)
    for sid, (prompt, seed) in STREAMS.items():
        engine.add_stream(sid, prompt, seed)
    got = collect(engine, {sid: 6 for sid in STREAMS})
    assert engine.rebalances >= 1
    assert executor.split() == [(0, 2), (2, 4)]  # equal block costs: half each
    split, best, now = engine.planned_split()
    assert now <= (1 + 0.2) * best or split == executor.split()
    assert_matches_reference(cfg, got, STREAMS, 6)


def test_one_slow_window_of_block_timings_moves_no_blocks():
    """A move drains the pipeline, so the re-planner acts only on a plan that two checks in a row agree on:
    block 0 timed 5x slower for a few micro-batches (a preempted thread) proposes a move at one check, the
    next check no longer does, and the split stays. The same skew lasting does move blocks."""
    from workers.config import EngineConfig

    cfg = gen_config("sequential")

    def run(slow: range) -> tuple[list, int, list]:
        executor = local_executor(cfg, 2, split=[(0, 2), (2, 4)])
        real_collect, seen = executor.collect, [0]
        proposals = []

        def collect_on_a_fake_clock(wait):
            """1 ms per token and block, block 0 5x that while ``slow`` holds the micro-batch count."""
            got = real_collect(wait)
            for done in got.finished:
                seen[0] += 1
                for s in done.stats:
                    s.block_s = {b: (5e-3 if b == 0 and seen[0] in slow else 1e-3) * s.tokens for b in s.block_s}
                    s.compute_s = sum(s.block_s.values())
            return got

        executor.collect = collect_on_a_fake_clock
        engine = make_engine(cfg, executor)
        engine.engine_cfg = EngineConfig(profile_every=1, rebalance_every=8, rebalance_threshold=0.2)
        real_maybe = engine._maybe_rebalance

        def watched():
            real_maybe()
            proposed = getattr(engine, "_proposed_split", None)
            if proposed is not None and proposed not in proposals:
                proposals.append(proposed)

        engine._maybe_rebalance = watched
        for sid, (prompt, seed) in STREAMS.items():
            engine.add_stream(sid, prompt, seed)
        got = collect(engine, {sid: 5 for sid in STREAMS})
        assert engine.stats.micro_batches >= 40
        assert_matches_reference(cfg, got, STREAMS, 5)
        return executor.split(), engine.rebalances, proposals

    split, moves, proposals = run(range(13, 17))  # seen by the check at 16, decayed by the one at 24
    assert moves == 0 and split == [(0, 2), (2, 4)]  # no second check confirmed ...
    assert proposals == [[(0, 1), (1, 4)]]  # ... the move the slow window did propose
    split, moves, _ = run(range(13, 10_000))
    assert moves == 1 and split == [(0, 1), (1, 4)]


def test_calibrate_at_start_fixes_a_skewed_split_and_predicts_capacity():
    cfg = gen_config("sequential")
    executor = local_executor(cfg, 2, split=[(0, 3), (3, 4)])
    engine = make_engine(cfg, executor)
    assert not engine.latency.calibrated
    split = engine.calibrate()
    assert split != [(0, 3), (3, 4)] and engine.rebalances == 1
    assert engine.latency.calibrated
    one = engine.predicted_chunk_latency(1)
    four = engine.predicted_chunk_latency(4)
    assert 0 < one < four
    assert engine.max_streams(16.0, 1) >= engine.max_streams(16.0, 4) >= 1
    assert executor.cache_bytes() == [0, 0]  # the profiling stream is gone
    engine.add_stream("a", "a cat on a sofa", 1)
    got = collect(engine, {"a": 3})
    assert_matches_reference(cfg, got, {"a": ("a cat on a sofa", 1)}, 3)


def test_max_ahead_bounds_work_done_ahead_of_the_consumer():
    cfg = gen_config("sequential")
    engine = make_engine(cfg, local_executor(cfg, 1))
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
def test_restore_from_checkpoint_continues_like_a_recache_in_place(mode, lanes):
    """A checkpoint (what the orchestrator keeps per stream) restored on another engine continues exactly
    as the reference does when it re-caches the same prompt at that chunk: same chunks, same latents."""
    cfg = gen_config(mode, lanes)
    source = make_engine(cfg, local_executor(cfg, 2))
    source.add_stream("a", "a cat on a sofa", 1)
    first = collect(source, {"a": 3})["a"]
    ckpt = source.checkpoint("a")
    assert ckpt.next_chunk >= 3 and [c for c, _ in ckpt.history] == list(range(ckpt.next_chunk))[-2:]
    restored = make_engine(cfg, local_executor(cfg, 1))
    restored.restore(pickle.loads(pickle.dumps(ckpt)))  # it crosses processes
    with pytest.raises(ValueError):
        restored.restore(ckpt)
    got = collect(restored, {"a": 4})["a"]
    assert sorted(got)[:4] == list(range(ckpt.next_chunk, ckpt.next_chunk + 4))
    n = ckpt.next_chunk + 4
    assert_matches_reference(cfg, {"a": {**first, **got}}, {"a": ("a cat on a sofa", 1)}, n,
                             prompt_schedules={"a": {ckpt.next_chunk: "a cat on a sofa"}}, tol=1e-5)


def test_restore_rewarms_the_decoder_on_recent_latents():
    """The decode worker's causal-conv caches are warmed on the checkpoint's recent latents, so the first
    frames after a restore continue the stream's decode instead of starting from zeros."""
    from workers.model.vae import TinyVAE

    cfg = gen_config("sequential")
    source = make_engine(cfg, local_executor(cfg, 1, decode_workers=1))
    source.add_stream("a", "x", 0)
    collect(source, {"a": 2})
    ckpt = source.checkpoint("a")
    target_executor = local_executor(cfg, 1, decode_workers=1)
    target = make_engine(cfg, target_executor)
    target.restore(ckpt)
    state = target_executor.pool.workers[0]._states["a"]
    fresh = TinyVAE(cfg.model).new_state()
    assert not _same_state(state, fresh)  # the causal-conv caches hold the recent latents, not zeros
    vae = TinyVAE(cfg.model)
    want_state = vae.new_state()
    for _, x0 in ckpt.history:
        vae.decode_chunk(x0, want_state)
    assert _same_state(state, want_state)
    out = collect(target, {"a": 1})
    assert min(out["a"]) == ckpt.next_chunk
    source.executor.shutdown()
    target_executor.shutdown()


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


def test_block_scheduler_counts_a_shared_decode_on_the_last_stage():
    """A decode worker on the last stage's device takes its time there: the best split moves blocks off it."""
    cfg = gen_config("sequential")
    executor = local_executor(cfg, 2, decode_workers=1)
    try:
        engine = make_engine(cfg, executor)
        for b in range(cfg.model.num_layers):
            engine.block_cost[b] = 1e-4  # equal blocks: an even split is best
        engine.stage_overhead = {0: 0.0, 1: 0.0}
        assert engine.planned_split()[0] == [(0, 2), (2, 4)]
        forwards, tokens = engine._forwards_and_tokens(cfg.sampler.num_steps)
        engine.latency.observe_decode(2.5 * 1e-4 * tokens * forwards)  # 2.5 blocks' worth per forward
        split, best, _ = engine.planned_split()
        assert split == [(0, 3), (3, 4)] and best == pytest.approx(3.5e-4)  # 1 block + its decode share
    finally:
        executor.shutdown()


def test_frames_per_chunk_follow_the_vae_temporal_stride():
    """Capacity and deadlines count video frames: a latent frame is vae_stride[0] of them (4 for the Wan VAE,
    1 in pixel space), not a literal 4."""
    engines = {}
    for stride in (4, 1):
        cfg = gen_config("sequential")
        cfg = GenerationConfig(model=get_config("tiny", vae_stride=(stride, 8, 8)), sampler=cfg.sampler,
                               cache=cfg.cache, height=cfg.height, width=cfg.width)
        engine = make_engine(cfg, local_executor(cfg, 2))
        for stage in range(2):  # the same measured costs for both
            engine.latency.observe(stage, 48, 0.01)
            engine.latency.observe(stage, 96, 0.02)
        engine.add_stream("a", "p", 0, fps=8.0)
        engine.streams["a"].program.next_chunk = 3
        engines[stride] = engine
    four, one = engines[4], engines[1]
    assert four.video_frames_per_chunk == 4 * 2 and one.video_frames_per_chunk == 2
    assert four.frame_rate(4) == pytest.approx(4 * one.frame_rate(4))
    assert four.max_streams(2.0, 4) >= 4 * one.max_streams(2.0, 4) >= 4
    # chunk 3 starts at video frame 3 * 8 (stride 4) or 3 * 2 (stride 1), due at that frame / fps
    assert four.streams["a"].due() - four.streams["a"].started == pytest.approx(3 * 8 / 8.0)
    assert one.streams["a"].due() - one.streams["a"].started == pytest.approx(3 * 2 / 8.0)


def test_a_split_check_runs_once_each_time_the_count_crosses_rebalance_every():
    """One engine step may dispatch several micro-batches (a pipeline filling, or calls of several), so the
    micro-batch count can jump past a multiple of ``rebalance_every``: the check runs at the first step after
    each crossing, once (it ran only on exact multiples, and skipped every crossing a jump went past)."""
    from workers.config import EngineConfig
    from workers.engine import PipelineEngine

    cfg = gen_config("sequential")
    engine = PipelineEngine(cfg, local_executor(cfg, 2), EngineConfig(rebalance_every=4))
    checks = []
    engine.planned_split = lambda: checks.append(engine.stats.micro_batches)  # no plan: the split stays
    for count in (3, 5, 7, 8, 13, 13, 16):
        engine.stats.micro_batches = count
        engine._maybe_rebalance()
    assert checks == [5, 8, 13, 16]


def test_what_was_submitted_is_flushed_even_when_scheduling_the_next_raises():
    """The engine waits for every micro-batch it submitted, so ``flush`` must send them even when the step's
    dispatch loop fails after a submit (an executor that holds submissions until flush would keep it forever)."""
    cfg = gen_config("sequential")
    executor = local_executor(cfg, 2)
    engine = make_engine(cfg, executor)
    engine.add_stream("a", "x", 0)
    flushed, schedule = [], engine._schedule

    def schedule_once():
        if engine._inflight:
            raise RuntimeError("scheduling failed")
        return schedule()

    engine._schedule = schedule_once
    executor.flush = lambda: flushed.append(sorted(engine._inflight))
    with pytest.raises(RuntimeError, match="scheduling failed"):
        engine.step()
    assert flushed == [[0]]
