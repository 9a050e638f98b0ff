"""Validation and admission decisions with fake replicas."""

import math
import time
from dataclasses import dataclass, replace

import pytest

from orchestrator.admission import Admission, validate
from orchestrator.config import GenerationConfig, ServerConfig, get_config
from orchestrator.types import Encoding, LatePolicy, Rejection, RequestError, VideoSpec

MODEL = get_config("tiny")
GEN = GenerationConfig(model=MODEL)
SERVER = ServerConfig(max_streams_per_replica=4)


@dataclass
class Req:
    prompt: str = "a cat"
    seed: int = 0
    width: int = 0
    height: int = 0
    fps: float = 16.0
    steps: int = 0
    latency_budget_ms: int = 0
    late_policy: int = 0
    max_frames: int = 0
    encoding: int = 0
    jpeg_quality: int = 0


def test_defaults_fill_in():
    spec = validate(Req(), SERVER, GEN)
    assert (spec.width, spec.height, spec.fps, spec.steps) == (96, 64, 16.0, 4)
    assert spec.late_policy is LatePolicy.DROP and spec.encoding is Encoding.JPEG and spec.jpeg_quality == 90


@pytest.mark.parametrize("field,value", [
    ("prompt", ""), ("prompt", "   "), ("prompt", "x" * 5000), ("prompt", "bad\x00byte"),
    ("width", 16384), ("height", 16384), ("width", 48), ("height", 32),
    ("fps", float("nan")), ("fps", -1.0), ("fps", 0.0), ("fps", 1000.0), ("fps", float("inf")),
    ("steps", 9), ("max_frames", 10**9), ("late_policy", 7), ("encoding", 5), ("jpeg_quality", 101),
    ("late_policy", -1), ("encoding", -1),  # proto3 enums carry unknown values, negative ones too
])
def test_bad_fields_are_named(field, value):
    with pytest.raises(RequestError) as err:
        validate(Req(**{field: value}), SERVER, GEN)
    assert err.value.reason is Rejection.INVALID and err.value.message.startswith(field)


@dataclass
class FakeReplica:
    capacity: int
    latency: float = 0.1
    used: float = 0.0
    streams: int = 0
    video_capacity: int | None = None
    """For video-to-video streams (their encode included); None: as ``capacity``."""
    video_latency: float | None = None

    def max_streams(self, fps, steps, video=False):
        return self.video_capacity if video and self.video_capacity is not None else self.capacity

    def predicted_chunk_latency(self, steps, video=False):
        return self.video_latency if video and self.video_latency is not None else self.latency

    def load(self):
        return self.used

    def active(self):
        return self.streams


def test_picks_the_replica_with_most_headroom_and_refuses_when_full():
    adm = Admission(ServerConfig(max_streams_per_replica=8, admission_headroom=1.0))
    spec = validate(Req(), SERVER, GEN)
    replicas = [FakeReplica(4, used=0.5), FakeReplica(4, used=0.25)]
    d = adm.decide(spec, replicas)
    assert d.replica == 1 and d.utilisation == pytest.approx(0.25)
    full = [FakeReplica(4, used=1.0), FakeReplica(2, used=0.75)]
    start = time.perf_counter()
    with pytest.raises(RequestError) as err:
        adm.decide(spec, full)
    assert time.perf_counter() - start < 0.1
    assert err.value.reason is Rejection.CAPACITY and err.value.retry_after_ms == 1000


def test_budget_and_impossible_fps_are_failed_preconditions():
    adm = Admission(SERVER)
    spec = validate(Req(latency_budget_ms=50), SERVER, GEN)
    with pytest.raises(RequestError) as err:
        adm.decide(spec, [FakeReplica(4, latency=0.2)])
    assert err.value.reason is Rejection.BUDGET and "latency_budget_ms" in err.value.message
    with pytest.raises(RequestError) as err:
        adm.decide(validate(Req(), SERVER, GEN), [FakeReplica(0)])
    assert err.value.reason is Rejection.BUDGET and "fps" in err.value.message


def test_a_video_stream_is_priced_and_timed_by_the_replicas_video_figures():
    """A video-to-video stream's share and latency include its encode (the replica's video figures); a
    text-to-video stream's do not."""
    adm = Admission(ServerConfig(max_streams_per_replica=8, admission_headroom=1.0))
    text = validate(Req(latency_budget_ms=500), SERVER, GEN)
    video = replace(text, video=VideoSpec(0.7, False, 0.0, 5.0))
    replica = FakeReplica(4, latency=0.2, video_capacity=2, video_latency=0.25)
    assert adm.decide(text, [replica]).utilisation == pytest.approx(0.25)
    assert adm.decide(video, [replica]).utilisation == pytest.approx(0.5)
    replica.video_latency = 0.33  # + 3 input frames at 16 fps (187.5 ms) is over the 500 ms budget
    with pytest.raises(RequestError) as err:
        adm.decide(video, [replica])
    assert err.value.reason is Rejection.BUDGET
    assert adm.decide(text, [replica]).utilisation == pytest.approx(0.25)
    replica.video_latency, replica.video_capacity = 0.05, 0  # no video stream runs at this fps, text still does
    with pytest.raises(RequestError) as err:
        adm.decide(video, [replica])
    assert err.value.reason is Rejection.BUDGET and "fps" in err.value.message


def test_draining_refuses_with_retry_hint():
    with pytest.raises(RequestError) as err:
        Admission(SERVER).decide(validate(Req(), SERVER, GEN), [FakeReplica(4)], draining=True)
    assert err.value.reason is Rejection.DRAINING and err.value.retry_after_ms


def test_hard_cap_per_replica():
    adm = Admission(ServerConfig(max_streams_per_replica=2, admission_headroom=0.9))
    spec = validate(Req(), SERVER, GEN)
    assert math.isclose(adm.decide(spec, [FakeReplica(100, used=0.01, streams=1)]).utilisation, 0.01)
    with pytest.raises(RequestError) as err:
        adm.decide(spec, [FakeReplica(100, used=0.02, streams=2)])
    assert err.value.reason is Rejection.CAPACITY


def test_validate_property_every_input_is_ok_or_a_named_invalid_argument():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=2000, deadline=None)
    @given(st.builds(Req, prompt=st.text(max_size=300), seed=st.integers(0, 2**64 - 1),
                     width=st.integers(0, 2**32 - 1), height=st.integers(0, 2**32 - 1),
                     fps=st.floats(allow_nan=True, allow_infinity=True, width=32),
                     steps=st.integers(0, 2**32 - 1), latency_budget_ms=st.integers(0, 2**32 - 1),
                     late_policy=st.integers(0, 3), max_frames=st.integers(0, 2**32 - 1),
                     encoding=st.integers(0, 3), jpeg_quality=st.integers(0, 2**32 - 1)))
    def check(req):
        try:
            spec = validate(req, SERVER, GEN)
        except RequestError as err:
            assert err.reason is Rejection.INVALID
            assert err.message.split(":")[0] in {"prompt", "width", "height", "fps", "steps", "max_frames",
                                                 "late_policy", "encoding", "jpeg_quality"}
        else:
            assert 0 < spec.fps <= SERVER.max_fps and 1 <= spec.steps <= 8 and spec.prompt.strip()

    check()
