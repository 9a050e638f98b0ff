"""The stream table every ReplicaClient shares: admission load, and what a moved stream replays."""

from types import SimpleNamespace

import pytest

from orchestrator.replica_client import ReplicaClient, StreamRecord
from orchestrator.types import Encoding, LatePolicy, StreamSpec
from workers.core_messages import OpenStream, RestoreStream, SetPrompt, SetSteps


class FakeClient(ReplicaClient):
    """Capacity from a table; messages recorded instead of sent."""

    broken = False

    def __init__(self, capacity: dict[int, int]):
        super().__init__(index=0)
        self.capacity, self.sent = capacity, []

    def max_streams(self, fps, steps, video=False):
        return self.capacity[steps]

    def predicted_chunk_latency(self, steps, video=False):
        return 0.1

    def consumed(self, stream_id):
        pass

    def probe(self, timeout_s):
        return True

    def hand_off(self, timeout_s):
        pass

    def shutdown(self):
        pass

    def _start(self, record):
        self.sent += record.start_messages()

    def _stop(self, stream_id):
        pass

    def _send(self, msg):
        self.sent.append(msg)


def spec(steps=4, prompt="a fox") -> StreamSpec:
    return StreamSpec(prompt, 7, 96, 64, 16.0, steps, 1.0, LatePolicy.DROP, 0, Encoding.JPEG, 90)


def test_a_steps_change_updates_the_streams_admission_load():
    client = FakeClient({4: 4, 1: 10})
    client.open("s", spec(steps=4), sink=lambda item: None)
    assert client.load() == pytest.approx(1 / 4)
    client.set_steps("s", 1)
    assert client.load() == pytest.approx(1 / 10)
    assert client.sent[-1] == SetSteps("s", 1)


def test_an_adopted_stream_is_restored_and_replays_what_its_checkpoint_lacks():
    record = StreamRecord("s", spec(steps=4), sink=lambda item: None, load=0.0, prompt="an owl", revision=3, steps=2)
    record.checkpoint = SimpleNamespace(revision=1, sampler=SimpleNamespace(num_steps=4))
    target = FakeClient({2: 5, 4: 4})
    target.adopt(record)
    first, *rest = target.sent
    assert isinstance(first, RestoreStream) and first.checkpoint is record.checkpoint
    assert rest == [SetPrompt("s", "an owl"), SetPrompt("s", "an owl"), SetSteps("s", 2)]
    assert target.load() == pytest.approx(1 / 5)  # its share on the new replica, at its current steps


def test_a_stream_moved_before_its_first_chunk_starts_over_with_every_switch_replayed():
    record = StreamRecord("s", spec(steps=4), sink=lambda item: None, load=0.0, prompt="an owl", revision=2, steps=4)
    target = FakeClient({4: 4})
    target.adopt(record)
    first, *rest = target.sent
    assert isinstance(first, OpenStream) and (first.prompt, first.steps) == ("a fox", 4)
    assert rest == [SetPrompt("s", "an owl")] * 2


def test_close_empties_the_table_and_wakes_a_waiter():
    client = FakeClient({4: 4})
    client.open("s", spec(), sink=lambda item: None)
    assert client.holds("s") and not client.wait_empty(0.01)
    client.close("s")
    assert not client.holds("s") and client.wait_empty(0.01) and client.active() == 0
