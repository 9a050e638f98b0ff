"""The engine on Ray stage actors (gloo between them) equals the single-process reference."""

import itertools
import os
import signal
import time

import pytest

import numpy as np

from tests.engine_cases import STREAMS, assert_matches_reference, collect, gen_config, make_engine, ray_executor
from workers.batch import OutputFormat
from workers.config import GenerationConfig, ParallelConfig
from workers.executor import StageFailure
from workers.reference import ReferenceGenerator

ray = pytest.importorskip("ray")

from workers.ray_executor import max_inflight, start_local_ray  # noqa: E402

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
            made[stages] = ray_executor(GenerationConfig(model=TINY), stages)
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
    ex = ray_executor(cfg, 2)
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


def test_four_stages_each_on_its_own_logical_gpu_equal_reference(local_ray):
    cfg = gen_config("sequential")
    ex = ray_executor(cfg, 4, gpus_per_stage=1)
    try:
        assert ray.available_resources().get("GPU", 0) == 0  # each stage actor holds one logical GPU
        renamed, got = _run(cfg, ex, STREAMS, 3)
        assert_matches_reference(cfg, got, renamed, 3)
    finally:
        ex.shutdown()


def test_stages_that_fail_to_start_leave_no_slot_behind(local_ray, tmp_path):
    """A pipeline whose stages die while starting (weights that cannot load) fails with StageFailure and gives
    back the placement group it reserved: a rebuild or a replacement replica finds its slots free."""
    def created():
        return {gid for gid, g in ray.util.placement_group_table().items() if g["state"] == "CREATED"}

    before = created()
    cfg = GenerationConfig(model=TINY, model_path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(StageFailure) as err:
        ray_executor(cfg, 2, gpus_per_stage=1)  # its own placement group: 2 bundles of 1 logical GPU
    assert err.value.kind in ("died", "error")
    assert created() == before  # removed: Ray ends the actors placed in it and frees its bundles


@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
def test_driver_makes_p_calls_a_micro_batch_and_sees_latents_once_a_chunk(executors, mode):
    """The ring closes between the stages: per micro-batch the driver makes one call per stage, sends no
    latents, and receives each finished chunk's clean latents once; nothing between steps."""
    cfg = gen_config(mode)
    ex = executors(3)
    engine = make_engine(cfg, ex)
    before = (ex.traffic.calls, ex.traffic.latent_bytes_out, ex.traffic.latent_bytes_in)
    sid = f"traffic-{next(_ids)}"
    engine.add_stream(sid, "a cat on a sofa", 1)
    got = collect(engine, {sid: 4})
    calls = ex.traffic.calls - before[0]
    assert calls == 3 * engine.stats.micro_batches
    assert ex.traffic.latent_bytes_out == before[1]  # no re-cache here: no latent goes out
    chunk_bytes = got[sid][0].nbytes
    assert ex.traffic.latent_bytes_in - before[2] == engine.stats.chunks * chunk_bytes
    assert engine.stats.chunks == len(got[sid])
    engine.remove_stream(sid)
    engine.step(wait=False)
    assert_matches_reference(cfg, got, {sid: ("a cat on a sofa", 1)}, 4)


@pytest.mark.parametrize("stages,per_call", [(2, 3), (3, 2)])
def test_calls_of_several_micro_batches_equal_the_reference(local_ray, stages, per_call):
    """``micro_batches_per_call``: the driver hands each stage several micro-batches per call (and each decode
    worker one call for their chunks); the engine keeps ``max_inflight(P, per_call)`` in flight, and the frames
    still equal the single-process reference and come back once each, in order, with the decode worker's. A
    prompt switch and a removal with calls in flight keep the other streams on their references."""
    cfg = gen_config("sequential")
    streams = dict(list(STREAMS.items())[:3])
    a, b, c = streams
    ex = ray_executor(cfg, stages, decode_workers=1, micro_batches_per_call=per_call)
    try:
        assert ex.max_inflight == max_inflight(stages, per_call) == 6
        engine = make_engine(cfg, ex)
        for sid, (prompt, seed) in streams.items():
            engine.add_stream(sid, prompt, seed, output=OutputFormat("raw_rgb"))
        outs = []

        def count(sid):
            return sum(o.stream_id == sid for o in outs)

        while min(count(sid) for sid in streams) < 3:
            outs += engine.step()
        assert engine.stats.max_inflight == ex.max_inflight  # it filled the deeper pipeline
        mbs = engine.stats.micro_batches
        assert stages * mbs / per_call <= ex.traffic.calls < stages * mbs  # calls of several, the last may be short
        engine.set_prompt(a, "a castle at night")
        engine.remove_stream(c)
        removed_at = len(outs)
        switch_at = None
        for _ in range(10_000):
            for o in engine.step():
                outs.append(o)
                if o.stream_id == a and o.prompt_revision == 1 and switch_at is None:
                    switch_at = o.chunk
            if count(a) >= 6 and count(b) >= 6 and switch_at is not None:
                break
        outs += engine.drain()
        assert not [o for o in outs[removed_at:] if o.stream_id == c]  # its results in flight were dropped
        ref = ReferenceGenerator(cfg)
        for sid in (a, b):
            prompt, seed = streams[sid]
            mine = [o for o in outs if o.stream_id == sid]
            assert [o.chunk for o in mine] == list(range(len(mine)))  # once each, in order
            diff = np.abs(_frames(mine[:3]).astype(int) - ref.generate(prompt, seed, 3).numpy().astype(int))
            assert diff.max() <= 1, diff.max()  # the decode worker's frames, chunk by chunk, in order
        got = {sid: {o.chunk: o.latents for o in outs if o.stream_id == sid} for sid in (a, b)}
        assert switch_at is not None and 3 <= switch_at <= 6
        assert_matches_reference(cfg, got, {sid: streams[sid] for sid in (a, b)}, 6,
                                 prompt_schedules={a: {switch_at: "a castle at night"}})
        for sid in (a, b):
            engine.remove_stream(sid)
        engine.step(wait=False)
        assert ex.cache_bytes() == [0] * stages
    finally:
        ex.shutdown()


def test_messages_larger_than_the_receive_posted_ahead_arrive_whole(local_ray):
    """Stage to stage, each stage posts the next message's receive ahead, sized for the largest message so far.
    Streams that join later make larger micro-batches (more frames, their new contexts): those messages come
    after a marker, through the middle stage of three too, and every stream still equals the reference."""
    cfg = gen_config("sequential")
    ex = ray_executor(cfg, 3)
    try:
        engine = make_engine(cfg, ex)
        streams = dict(STREAMS, d=("a kite over the sea", 4))  # 4 streams on 3 stages: 2 a micro-batch
        (first, (prompt, seed)), *later = streams.items()
        engine.add_stream(first, prompt, seed)
        got = collect(engine, {first: 2})
        assert [c["larger_messages"] for c in ex.link_stats()] == [0, 0, 0]
        posted = [c["posted_bytes"] for c in ex.link_stats()]
        for sid, (prompt, seed) in later:
            engine.add_stream(sid, prompt, seed)
        for sid, chunks in collect(engine, {sid: 3 for sid in streams}).items():
            got.setdefault(sid, {}).update(chunks)
        channels = ex.link_stats()
        assert channels[0]["posted_bytes"] == 0 and 0 < posted[1] < channels[1]["posted_bytes"], (posted, channels)
        assert all(c["larger_messages"] >= 1 for c in channels[1:]), channels
        assert_matches_reference(cfg, got, streams, 3)
    finally:
        ex.shutdown()


@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
def test_prompt_switch_on_ray_matches_the_reference_switch(executors, mode):
    """A re-cache restarts the ring (new epoch): stale next-step latents on stage 0 are never used."""
    cfg = gen_config(mode)
    engine = make_engine(cfg, executors(2))
    sid = f"switch-{next(_ids)}"
    engine.add_stream(sid, "a cat on a sofa", 1)
    got = collect(engine, {sid: 2})[sid]
    engine.set_prompt(sid, "a castle at night")
    switch_at = None
    for _ in range(10_000):
        for o in engine.step():
            got[o.chunk] = o.latents
            if o.prompt_revision == 1 and switch_at is None:
                switch_at = o.chunk
        if len(got) >= 5 and switch_at is not None:
            break
    for o in engine.drain():
        got[o.chunk] = o.latents
    engine.remove_stream(sid)
    engine.step(wait=False)
    assert switch_at is not None and 2 <= switch_at <= 5
    assert_matches_reference(cfg, {sid: got}, {sid: ("a cat on a sofa", 1)}, 5,
                             prompt_schedules={sid: {switch_at: "a castle at night"}})


def _frames(outs) -> np.ndarray:
    """Raw RGB frames of ChunkOutputs, [N, H, W, 3] uint8."""
    return np.stack([np.frombuffer(f, np.uint8).reshape(o.height, o.width, 3) for o in outs for f in o.frames])


@pytest.mark.parametrize("decode", ["dedicated", "shared"])
def test_decode_worker_frames_equal_in_process_decode(local_ray, decode):
    """P = 2 stages and one decode worker over Ray: the last stage hands finished chunks' latents to the
    decode worker over torch.distributed; the frames it encodes equal decoding the reference's latents in
    one process, chunk by chunk (the decoder state lives in the worker). Two streams share the worker."""
    cfg = gen_config("sequential")
    ex = ray_executor(cfg, 2, decode_workers=1, decode=decode, gpus_per_stage=1)
    try:
        held = 3 if decode == "dedicated" else 2  # logical GPUs: 2 stages (+ 1 dedicated decode worker)
        assert ray.available_resources().get("GPU", 0) == 4 - held
        engine = make_engine(cfg, ex)
        raw = OutputFormat("raw_rgb")
        streams = dict(list(STREAMS.items())[:2])
        for sid, (prompt, seed) in streams.items():
            engine.add_stream(sid, prompt, seed, output=raw)
        outs = {sid: [] for sid in streams}
        while any(len(v) < 4 for v in outs.values()):
            for o in engine.step():
                outs[o.stream_id].append(o)
        for o in engine.drain():
            outs[o.stream_id].append(o)
        assert ex.traffic.decode_calls > 0
        ref = ReferenceGenerator(cfg)
        for sid, (prompt, seed) in streams.items():
            got = _frames(outs[sid][:4])
            assert [o.chunk for o in outs[sid][:4]] == [0, 1, 2, 3]
            assert all(o.decode_s > 0 for o in outs[sid])
            want = ref.generate(prompt, seed, 4).numpy()
            assert got.shape == want.shape == (1 + 4 * (4 * cfg.sampler.chunk_frames - 1), 32, 48, 3)
            diff = np.abs(got.astype(int) - want.astype(int))
            assert diff.max() <= 1, diff.max()  # latents equal within 1e-6: at most one rounding level
        for sid in streams:
            engine.remove_stream(sid)
        engine.step(wait=False)
        assert ex.cache_bytes() == [0, 0]
    finally:
        ex.shutdown()


def test_driver_calls_and_held_sends_with_a_decode_worker(local_ray):
    """With a decode worker: still P stage calls per micro-batch, plus one decode call per micro-batch that
    finishes a chunk; the frames come back encoded (bytes), the latents once per chunk. Each stage holds the
    buffers of at most ``max_inflight`` micro-batches' sends (2 each at most here), however long it runs: a
    gloo send never reports itself complete unless waited on, and they once piled up for the stream's life."""
    cfg = gen_config("sequential")
    ex = ray_executor(cfg, 2, decode_workers=1)
    try:
        engine = make_engine(cfg, ex)
        engine.add_stream("d", "a cat on a sofa", 1, output=OutputFormat("jpeg", 80))
        outs = []
        while len(outs) < 3:
            outs += engine.step()
        outs += engine.drain()
        assert ex.traffic.calls == 2 * engine.stats.micro_batches
        assert ex.traffic.decode_calls == engine.stats.chunks == len(outs)  # sequential: one chunk per finishing forward
        assert all(o.frames and all(f[:2] == b"\xff\xd8" for f in o.frames) for o in outs)  # JPEG bytes
        bound = 2 * max_inflight(2)  # stage 0: a message (and a marker when it grows); stage 1: ring + an x0
        assert engine.stats.micro_batches > 2 * bound  # enough sends that an unbounded pile would show
        held = [c["pending_sends"] for c in ex.link_stats()]
        assert len(held) == 2 and all(0 < n <= bound for n in held), held
    finally:
        ex.shutdown()


def test_decoded_frames_go_out_without_waiting_for_the_next_forward(local_ray):
    """A chunk's frames leave the executor as soon as its decode worker has them, not once the next micro-batch
    comes back: with stage 0's process stopped (SIGSTOP) mid-stream, the engine still delivers the decoded chunk
    (before, ``collect`` waited on the stopped stage until the call timeout and failed it). The last stage stays
    up: its send of the finished latents completes only as the decode worker receives them."""
    cfg = gen_config("sequential")
    ex = ray_executor(cfg, 2, decode_workers=1, stage_call_timeout_s=20.0)
    first, decoder = ex.pids()[0], ex.decoder_pids()[0]
    try:
        engine = make_engine(cfg, ex)
        engine.add_stream("d", "a cat on a sofa", 1, output=OutputFormat("jpeg", 80))
        os.kill(decoder, signal.SIGSTOP)  # hold the decode until stage 0 is stopped too
        try:
            while not engine.streams["d"].decoding:  # a chunk finished on the stages, its frames not yet decoded
                assert engine.step() == []
            os.kill(first, signal.SIGSTOP)
            try:
                for _ in range(5):  # what the stages finished before the stop comes back; new work waits on it
                    assert engine.step(wait=False) == []
                    time.sleep(0.05)
                waiting = sorted(engine.streams["d"].decoding)
                assert engine.stats.inflight > 0 and waiting
                os.kill(decoder, signal.SIGCONT)
                outs = []
                while not outs:  # only the decode can finish now
                    outs = engine.step()
                assert [o.chunk for o in outs] == waiting[:len(outs)]
                assert engine.stats.inflight > 0  # the stopped stage still holds its forwards
            finally:
                os.kill(first, signal.SIGCONT)
        finally:
            os.kill(decoder, signal.SIGCONT)
        outs = []
        while len(outs) < 2:  # and the stream goes on
            outs += engine.step()
    finally:
        ex.shutdown()


@pytest.mark.parametrize("mode", ["sequential", "stream_batch"])
def test_video_to_video_on_ray_equals_the_reference(executors, mode):
    """A video-to-video stream beside a text-to-video one on Ray stage actors: stage 0 encodes the input chunks
    (its own VAE encoder state per stream), and the latents equal the single-process reference's."""
    from tests.unit.workers.test_v2v import video
    from workers.v2v import VideoParams, video_sampler

    cfg = gen_config(mode)
    sampler, params = video_sampler(cfg.sampler, 3), VideoParams(0.8, True)
    chunks = video(4, cfg.sampler.chunk_frames, seed=7)
    engine = make_engine(cfg, executors(2))
    sid, tid = f"v2v-{next(_ids)}", f"t2v-{next(_ids)}"
    engine.add_stream(sid, "a watercolor painting", 1, sampler=sampler, video=params)
    engine.add_stream(tid, "an owl at night", 3)
    for i, chunk in enumerate(chunks):
        engine.push_input(sid, chunk, meta=i)
    engine.end_input(sid)
    got = collect(engine, {sid: 4, tid: 3})
    for s in (sid, tid):
        engine.remove_stream(s)
    engine.step(wait=False)
    want = ReferenceGenerator(cfg).transform(chunks, "a watercolor painting", 1, params, sampler=sampler)
    for chunk, (_, _, x0) in enumerate(want):
        assert (got[sid][chunk] - x0).abs().max().item() <= 1e-4, chunk
    assert_matches_reference(cfg, {tid: got[tid]}, {tid: ("an owl at night", 3)}, 3)


def _thread_nices(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread niceness is Linux's")
def test_serving_stages_outrank_processes_still_starting(executors):
    """Ray starts workers at niceness 15; a stage that is ready takes ``serving_nice`` on every thread, so a
    sibling replica's rebuild (fresh processes importing torch) cannot starve a pipeline that serves."""
    executor = executors(2)
    serving = ParallelConfig().serving_nice
    pids = executor.pids() + executor.decoder_pids()
    can = os.geteuid() == 0  # CAP_SYS_NICE: lowering niceness below the start level needs it
    for pid in pids:
        assert _thread_nices(pid) == ({serving} if can else {15}), pid

    @ray.remote(num_cpus=0)
    class Starting:  # a worker that is not a stage: Ray's level on the thread that runs its calls
        def nice(self) -> int:
            return os.nice(0)

    assert ray.get(Starting.remote().nice.remote()) == 15 > serving


def _thread_masks(pid: int) -> set[tuple[int, ...]]:
    return {tuple(sorted(os.sched_getaffinity(int(tid)))) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not os.path.isdir("/proc/self/task"),
                    reason="needs two cores and Linux thread affinity")
def test_pinned_stages_hold_cores_of_their_own_and_free_them_when_they_end(local_ray):
    """``pin_cores``: each CPU stage claims a core no other stage holds and runs every thread there; a
    third stage on two cores floats; a stage's cores are free again once it has shut down, and frames
    are the reference's."""
    cores = sorted(os.sched_getaffinity(0))
    cfg = gen_config("sequential")
    executor = ray_executor(cfg, 3, pin_cores=True)
    try:
        claims = executor.pinned_cores()
        held = [c for c in claims if c is not None]
        assert sorted(held) == [(core,) for core in cores[:len(held)]] and len(held) == min(3, len(cores))
        if len(cores) == 2:
            assert claims.count(None) == 1
        for pid, claim in zip(executor.pids(), claims):
            assert _thread_masks(pid) == {claim if claim is not None else tuple(cores)}, pid
        assert executor.kept_heaps() == [True] * 3  # CPU stages keep their heap (workers.host.keep_heap)
        streams = {sid: STREAMS[sid] for sid in list(STREAMS)[:2]}
        renamed, got = _run(cfg, executor, streams, 2)
        assert_matches_reference(cfg, got, renamed, 2)
    finally:
        executor.shutdown()
    again = ray_executor(cfg, 2, pin_cores=True)
    try:
        assert sorted(again.pinned_cores()) == [(core,) for core in cores[:2]]
    finally:
        again.shutdown()
