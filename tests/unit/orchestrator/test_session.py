from orchestrator.session import Session, State
from orchestrator.types import EndReason, Encoding, FrameOutcome, LatePolicy, StreamSpec

SPEC = StreamSpec("p", 0, 96, 64, 16.0, 4, 1.0, LatePolicy.DROP, 3, Encoding.JPEG, 90)


def test_lifecycle_has_exactly_one_end_reason():
    s = Session("id", SPEC, 0, 0.1, started=0.0)
    assert s.state is State.ADMITTED
    s.on_frame(1.0)
    assert s.state is State.RUNNING and s.first_frame_at == 1.0
    s.pause()
    assert s.state is State.PAUSED
    s.resume()
    assert s.state is State.RUNNING
    s.on_frame(1.1)
    s.on_frame(1.2)
    assert s.done
    assert s.end(EndReason.CLIENT_DONE) and not s.end(EndReason.INTERNAL)
    assert s.end_reason is EndReason.CLIENT_DONE and s.state is State.ENDED
    s.count(FrameOutcome.LATE)
    s.count(FrameOutcome.LATE)
    assert s.outcomes[FrameOutcome.LATE] == 2
