"""Video-to-video ingress with a fake clock: decode / crop / resize, the even subsampler, pacing at the stream's
fps, the bounded queue, order checks, every input frame's one outcome; the playout pacer; config validation."""

import io
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from orchestrator.admission import Admission, input_buffering_s, validate_transform
from orchestrator.config import GenerationConfig, ServerConfig
from orchestrator.deadline import PlayoutPacer
from orchestrator.ingress import Ingress, InputMeta, InvalidFrame, decode_frame, evenly
from orchestrator.types import Encoding, FrameOutcome, InputOutcome, LatePolicy, Rejection, RequestError

SERVER, GEN = ServerConfig(), GenerationConfig(model="tiny")


def test_evenly_spreads_picks_over_the_queue_and_keeps_the_newest():
    assert evenly(4, 4) == [0, 1, 2, 3]
    assert evenly(12, 4) == [0, 4, 7, 11]
    assert evenly(9, 1) == [8]
    picks = evenly(30, 8)
    gaps = np.diff(picks)
    assert picks[-1] == 29 and len(set(picks)) == 8 and gaps.max() - gaps.min() <= 1
    with pytest.raises(ValueError):
        evenly(3, 4)


def frame(i: int, arrival: float) -> tuple[InputMeta, np.ndarray]:
    return InputMeta(i, 1000 + i, arrival), np.full((2, 2, 3), i % 256, np.uint8)


def test_chunks_come_at_the_streams_fps_and_a_faster_input_is_subsampled():
    ing = Ingress(fps=8.0, chunk_frames=1, max_pending=8)  # chunks: 1 frame first, then 4
    built = []
    for i in range(3 * 8 * 4):  # 4 s of input at 3x the stream's fps
        t = i / 24
        ing.offer(*frame(i, t))
        got = ing.take(t)
        if got is not None:
            built.append((t, got))
            ing.delivered(repeated=False)
    frames_out = sum(len(m) for _, (_, m) in built)
    assert 4 * 8 * 0.85 <= frames_out <= 4 * 8 * 1.15  # output stays near 8 fps of the 4 s
    # within a chunk, the picks are spread over what was queued (about every 3rd frame), oldest first
    for _, (arr, metas) in built[2:]:
        idx = [m.index for m in metas]
        assert idx == sorted(idx) and 2 <= min(np.diff(idx)) and max(np.diff(idx)) <= 4
        assert [int(v) for v in arr[:, 0, 0, 0]] == [i % 256 for i in idx]
    counts = ing.counts
    assert counts[InputOutcome.ACCEPTED] == frames_out
    assert counts[InputOutcome.ACCEPTED] + counts[InputOutcome.DROPPED_BACKLOG] + len(ing.queue) == 96


def test_the_engine_behind_means_the_oldest_frames_go_not_latency():
    ing = Ingress(fps=8.0, chunk_frames=1, max_pending=2)
    for i in range(200):  # nothing comes back from the engine
        ing.offer(*frame(i, i / 8))
        ing.take(i / 8)
    assert ing.pending == 2 and len(ing.queue) == ing.capacity == 12  # bounded
    assert [m.index for m, _ in ing.queue][-1] == 199  # the newest kept
    assert ing.counts[InputOutcome.DROPPED_BACKLOG] == 200 - 5 - 12  # 1 + 4 frames went into the two chunks
    ing.finish()
    assert ing.counts[InputOutcome.ACCEPTED] == 5 and sum(ing.counts.values()) == 200


def test_order_and_repeats_and_first_chunk_size():
    ing = Ingress(fps=16.0, chunk_frames=2)
    assert ing.frames_needed() == 5  # 1 + 4 (f - 1)
    assert ing.offer(*frame(5, 0.0)) is None
    assert ing.offer(*frame(5, 0.01)) is InputOutcome.DROPPED_ORDER
    assert ing.offer(*frame(3, 0.02)) is InputOutcome.DROPPED_ORDER
    for i in range(6, 10):
        ing.offer(*frame(i, 0.1))
    arr, metas = ing.take(0.2)
    assert [m.index for m in metas] == [5, 6, 7, 8, 9] and ing.frames_needed() == 8
    ing.delivered(repeated=True)
    assert ing.counts[InputOutcome.FILTERED_SIMILAR] == 5 and ing.counts[InputOutcome.DROPPED_ORDER] == 2


def test_decode_crops_to_the_aspect_and_resizes():
    src = np.zeros((100, 300, 3), np.uint8)
    src[:, 100:200] = 255  # a white middle third
    raw = decode_frame(src.tobytes(), Encoding.RAW_RGB, 300, 100, 48, 32)
    assert raw.shape == (32, 48, 3)
    # 300x100 cropped to 3:2 keeps x in [75, 225): the white band covers most of the middle
    assert raw[:, 24].min() > 200 and raw[:, 0].max() < 60 and raw[:, -1].max() < 60
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, format="JPEG", quality=95)
    jpg = decode_frame(buf.getvalue(), Encoding.JPEG, 300, 100, 48, 32)
    assert np.abs(jpg.astype(int) - raw.astype(int)).mean() < 10
    for data, enc, w, h, why in [(b"\x00" * 10, Encoding.RAW_RGB, 2, 2, "bytes"),
                                 (b"not a jpeg", Encoding.JPEG, 2, 2, "decodable"),
                                 (buf.getvalue()[:200], Encoding.JPEG, 300, 100, "decodable"),
                                 (buf.getvalue(), Encoding.JPEG, 301, 100, "the frame says"),
                                 (b"", Encoding.RAW_RGB, 0, 0, "size"),
                                 (b"", Encoding.RAW_RGB, 5000, 10, "size")]:
        with pytest.raises(InvalidFrame, match=why):
            decode_frame(data, enc, w, h, 48, 32)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_only_the_jpeg_decoder_sees_client_bytes_and_its_errors_are_invalid_frames():
    """Client bytes that another PIL decoder would take (PPM, PNG, DDS) are refused, and no decoder error
    escapes as anything but InvalidFrame (a ValueError, SyntaxError or NotImplementedError would end the
    stream's reader)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 80, 200)).save(buf, format="PNG")
    png = buf.getvalue()
    at = png.index(b"IDAT")
    idat = png[at + 4:at + 4 + struct.unpack(">I", png[at - 4:at])[0]]
    broken_png = png[:at - 4] + _chunk(b"IDAT", idat[:len(idat) // 2]) + b"\0\0\0\4\0\1\2\3abcd\0\0\0\0"
    dds = (b"DDS " + struct.pack("<7I", 124, 0x1007, 16, 16, 0, 0, 0) + bytes(44) + struct.pack("<2I", 32, 4)
           + b"XYZW" + bytes(104))
    got = {}
    for name, data in [("ppm", b"P6\n16 16\nxyz\n" + bytes(768)), ("broken png", broken_png), ("dds", dds),
                       ("valid png", png)]:
        try:
            got[name] = decode_frame(data, Encoding.JPEG, 16, 16, 8, 8).shape
        except InvalidFrame as err:
            got[name] = str(err).split(" (")[0]
    assert got == dict.fromkeys(got, "not a decodable JPEG")


def test_playout_keeps_the_input_cadence_and_judges_each_frame_against_its_arrival():
    p = PlayoutPacer(fps=10.0, budget_s=1.0, late_policy=LatePolicy.DROP)
    # inputs every 0.1 s; their chunk of 4 becomes ready at once, 0.5 s after the first arrived
    places = [p.place(arrival=0.1 * k, ready_at=0.5) for k in range(4)]
    sends = [pl.send_at for pl in places]
    assert sends == pytest.approx([0.5, 0.6, 0.7, 0.8], abs=0.005)  # the input cadence 0.5 s later (the delay eases back 1 ms a frame): no burst
    assert all(pl.deadline_met and pl.outcome is FrameOutcome.DELIVERED for pl in places)
    late = p.place(arrival=0.4, ready_at=1.5)  # due at 1.4
    assert late.send_at is None and late.outcome is FrameOutcome.DROPPED_DEADLINE
    flagged = PlayoutPacer(10.0, 1.0, LatePolicy.DELIVER_FLAGGED).place(0.0, 1.2)
    assert flagged.send_at == 1.2 and not flagged.deadline_met and flagged.outcome is FrameOutcome.LATE


class Cfg:
    def __init__(self, **kw):
        base = dict(prompt="a watercolor", seed=1, fps=8.0, width=0, height=0, steps=0, latency_budget_ms=0,
                    late_policy=0, encoding=0, noise_scale=0.0, motion_aware=True, similarity_threshold=0.0,
                    idle_timeout_ms=0, jpeg_quality=0)
        base.update(kw)
        self.__dict__.update(base)


def test_transform_config_validation_names_the_field():
    spec = validate_transform(Cfg(), SERVER, GEN)
    assert spec.video.noise_scale == 0.7 and spec.video.idle_timeout_s == SERVER.idle_timeout_s
    assert spec.max_frames == 0 and spec.video.motion_aware
    assert validate_transform(Cfg(idle_timeout_ms=2500, noise_scale=0.9), SERVER, GEN).video.idle_timeout_s == 2.5
    for field, value in [("noise_scale", 1.5), ("noise_scale", -0.1), ("noise_scale", math.nan),
                         ("similarity_threshold", 1.0), ("similarity_threshold", -0.5),
                         ("idle_timeout_ms", 10_000_000), ("fps", 0.0), ("width", 30)]:
        with pytest.raises(RequestError) as err:
            validate_transform(Cfg(**{field: value}), SERVER, GEN)
        assert err.value.reason is Rejection.INVALID and err.value.message.startswith(field), (field, err.value.message)


class Replica:
    def max_streams(self, fps, steps, video=False):
        return 4

    def predicted_chunk_latency(self, steps, video=False):
        return 0.2

    def load(self):
        return 0.0

    def active(self):
        return 0


def test_admission_counts_input_buffering_for_video_streams():
    adm = Admission(SERVER, chunk_frames=3)
    assert input_buffering_s(8.0, 3) == pytest.approx(11 / 8)
    ok = validate_transform(Cfg(latency_budget_ms=2000), SERVER, GEN)
    adm.decide(ok, [Replica()])  # 0.2 s + 1.375 s of input buffering fits in 2 s
    tight = validate_transform(Cfg(latency_budget_ms=1000), SERVER, GEN)
    with pytest.raises(RequestError) as err:
        adm.decide(tight, [Replica()])
    assert err.value.reason is Rejection.BUDGET
