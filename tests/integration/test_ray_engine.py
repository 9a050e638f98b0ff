"""The engine on Ray stage actors (gloo between them) equals the single-process reference."""

import itertools

import pytest

from tests.engine_cases import STREAMS, assert_matches_reference, collect, gen_config, make_engine

ray = pytest.importorskip("ray")

from workers.ray_executor import RayExecutor, start_local_ray  # noqa: E402

TINY = gen_config("sequential").model
_ids = itertools.count()


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(num_cpus=2, num_gpus=4)  # logical GPUs: placement is tested, compute stays on CPU
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def executors(local_ray):
    made = {}

    def get(stages):
        if stages not in made:
            made[stages] = RayExecutor(TINY, stages)
        return made[stages]

    try:
        yield get
    finally:
        for ex in made.values():
            ex.shutdown()


def _run(cfg, executor, streams, n):
    engine = make_engine(cfg, executor)
    renamed = {f"{sid}-{next(_ids)}": v for sid, v in streams.items()}
    for sid, (prompt, seed) in renamed.items():
        engine.add_stream(sid, prompt, seed)
    got = collect(engine, {sid: n for sid in renamed})
    for sid in renamed:
        engine.remove_stream(sid)
    engine.step(wait=False)
    return renamed, got


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("mode,lanes,attention", [("sequential", 1, "inflight"), ("stream_batch", 1, "inflight"),
                                                  ("stream_batch", 3, "inflight"), ("stream_batch", 3, "clean")])
@pytest.mark.parametrize("n_streams", [1, 3])
def test_ray_engine_equals_reference(executors, stages, mode, lanes, attention, n_streams):
    cfg = gen_config(mode, lanes, attention=attention)
    streams = dict(list(STREAMS.items())[:n_streams])
    renamed, got = _run(cfg, executors(stages), streams, 4)
    assert_matches_reference(cfg, got, renamed, 4)


def test_stage_actors_hold_only_their_blocks(executors):
    ex = executors(3)
    names = ex.owned_parameter_names()
    for stage, (a, b) in enumerate(ex.split()):
        blocks = {int(n.split(".")[1]) for n in names[stage] if n.startswith("blocks.")}
        assert blocks == set(range(a, b))
        assert any(n.startswith("patch_embedding") for n in names[stage]) == (stage == 0)
        assert any(n.startswith("head.") for n in names[stage]) == (stage == 2)
    from workers.model.dit import CausalWanModel

    assert sum(ex.num_parameters()) == sum(p.numel() for p in CausalWanModel(TINY).parameters())


def test_cleanup_returns_cache_bytes_to_baseline(executors):
    ex = executors(2)
    baseline = ex.cache_bytes()
    cfg = gen_config("sequential")
    engine = make_engine(cfg, ex)
    engine.add_stream("cleanup", "p", 0)
    collect(engine, {"cleanup": 2})
    assert all(b > a for a, b in zip(baseline, ex.cache_bytes()))
    engine.remove_stream("cleanup")
    engine.step(wait=False)
    assert ex.cache_bytes() == baseline


@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
def test_rebalance_mid_stream_on_ray(local_ray, mode):
    cfg = gen_config(mode)
    ex = RayExecutor(TINY, 2)
    try:
        engine = make_engine(cfg, ex)
        for sid, (prompt, seed) in STREAMS.items():
            engine.add_stream(sid, prompt, seed)
        first = collect(engine, {sid: 2 for sid in STREAMS})
        ex.rebalance([(0, 3), (3, 4)])
        assert ex.split() == [(0, 3), (3, 4)]
        second = collect(engine, {sid: 5 for sid in STREAMS})
        got = {sid: {**first[sid], **second[sid]} for sid in STREAMS}
        assert_matches_reference(cfg, got, STREAMS, 5)
    finally:
        ex.shutdown()


@pytest.mark.parametrize("layers_per_group", [1, 2])
@pytest.mark.parametrize("mode,attention", [("sequential", "inflight"), ("stream_batch", "clean")])
def test_ray_step_split_and_grid_equal_reference(local_ray, layers_per_group, mode, attention):
    """Step split (2 groups) and a 2x2 grid on 4 logical GPUs, one per stage actor."""
    from workers.executor import StepSplitExecutor

    cfg = gen_config(mode, attention=attention)
    groups = [RayExecutor(TINY, layers_per_group, num_gpus_per_stage=1) for _ in range(2)]
    try:
        used = ray.available_resources().get("GPU", 0)
        assert used == 4 - 2 * layers_per_group  # each stage actor holds one logical GPU
        executor = StepSplitExecutor(groups, [[0, 1], [2, 3]])
        renamed, got = _run(cfg, executor, STREAMS, 4)
        assert_matches_reference(cfg, got, renamed, 4)
    finally:
        for g in groups:
            g.shutdown()
