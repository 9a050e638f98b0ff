"""ReplicaClient: how the orchestrator (server, app) talks to one pipeline replica, whoever hosts its core.

A pipeline replica is one engine core (``workers.core.EngineCore``) with its P stages. Two implementations:

* ``LocalReplicaClient`` (``replica_client_local``): the core runs in this process (the embedded default);
* ``ServeReplicaClient`` (``replica_client_serve``): the core runs inside a Ray Serve replica process.

Both keep the same per-stream record here (spec, sink, admission load, the prompt and steps its controls
asked for, its latest checkpoint), so moving a stream is one mechanism for both: ``adopt`` a record on
another replica, which restores it from its checkpoint and replays the controls the checkpoint lacks.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from orchestrator.admission import stream_share
from orchestrator.types import StreamSpec
from workers.core_messages import (ControlMessage, EndInput, FrameBatch, OpenStream, OutputFormat, PushInput,
                                   RestoreStream, SetNoiseScale, SetPrompt, SetSteps, StreamFailed)
from workers.v2v import VideoParams
from workers.engine import StreamCheckpoint

Sink = Callable[[FrameBatch | StreamFailed], None]
"""Where a stream's outputs go (called on any thread; the server hops them onto its loop)."""


@dataclass(slots=True)
class StreamRecord:
    """One stream as its replica client holds it; the unit a move carries to another replica."""

    stream_id: str
    spec: StreamSpec
    sink: Sink
    load: float
    """Its admission load on the replica holding it: 1 / max_streams(fps, steps, video-to-video or not)."""
    prompt: str
    """The prompt its controls asked for last."""
    revision: int = 0
    """Prompt switches its controls asked for (the server's prompt revision)."""
    steps: int = 0
    """The denoising steps its controls asked for last."""
    checkpoint: StreamCheckpoint | None = None
    """Its latest recovery point (None: nothing finished yet, it starts over)."""

    @property
    def output(self) -> OutputFormat:
        return OutputFormat(self.spec.encoding.value, self.spec.jpeg_quality)

    def start_messages(self) -> list[ControlMessage]:
        """What a replica needs to continue the stream: open it (or restore its checkpoint), then the prompt
        switches and the steps change the checkpoint does not hold, so revisions match the server's."""
        spec, ckpt = self.spec, self.checkpoint
        if ckpt is None:
            video = None if spec.video is None else VideoParams(spec.video.noise_scale, spec.video.motion_aware,
                                                                spec.video.similarity_threshold)
            msgs: list[ControlMessage] = [OpenStream(self.stream_id, spec.prompt, spec.seed, spec.fps, spec.steps,
                                                     self.output, video)]
            revision, steps = 0, spec.steps
        else:
            msgs = [RestoreStream(ckpt, self.output)]
            revision, steps = ckpt.revision, ckpt.sampler.num_steps
        msgs += [SetPrompt(self.stream_id, self.prompt) for _ in range(self.revision - revision)]
        if self.steps != steps:
            msgs.append(SetSteps(self.stream_id, self.steps))
        return msgs


Rehome = Callable[["ReplicaClient", list[StreamRecord]], None]


class ReplicaClient(ABC):
    """One pipeline replica. Stream methods are called from the server's event loop (or the thread that
    re-homes streams); they never block on the replica. The stream table is thread-safe."""

    index: int
    draining: bool = False
    """No new streams (an autoscaler's or operator's drain, or out of service); retired once empty."""
    healthy: bool = True
    """The last readiness probe passed."""
    rehome: Rehome | None = None
    """Set by the service: continues streams that leave this replica elsewhere (or ends them)."""

    def __init__(self, index: int):
        self.index = index
        self.opened = 0  # streams ever opened here (tests: bad input makes zero engine calls)
        self._streams: dict[str, StreamRecord] = {}
        self._changed = threading.Condition()

    # -- streams (the shared part) --------------------------------------------------------------------

    def open(self, stream_id: str, spec: StreamSpec, sink: Sink) -> None:
        """Start a new stream here; its frame batches (then at most one StreamFailed) go to ``sink``."""
        record = StreamRecord(stream_id, spec, sink, stream_share(self, spec.fps, spec.steps, spec.is_video),
                              spec.prompt, steps=spec.steps)
        self._register(record)
        self.opened += 1
        self._start(record)

    def adopt(self, record: StreamRecord) -> None:
        """Continue a stream that left another replica, from its checkpoint (or from its start), with the
        controls that checkpoint lacks replayed in order. Its outputs go on to the same sink."""
        record.load = stream_share(self, record.spec.fps, record.steps, record.spec.is_video)
        self._register(record)
        self._start(record)

    def close(self, stream_id: str) -> None:
        """End the stream here and free its caches (a no-op for a stream this replica does not hold)."""
        if self._unregister(stream_id) is not None:
            self._stop(stream_id)

    def set_prompt(self, stream_id: str, prompt: str) -> None:
        """Switch the stream's prompt; its revision goes up by one (unfinished chunks restart under it)."""
        with self._changed:
            record = self._streams.get(stream_id)
            if record is None:
                return
            record.prompt, record.revision = prompt, record.revision + 1
        self._send(SetPrompt(stream_id, prompt))

    def set_steps(self, stream_id: str, steps: int) -> None:
        """Change the stream's denoising steps from its next unfinished chunk on; its admission load
        follows (1 / max_streams at the new steps)."""
        with self._changed:
            record = self._streams.get(stream_id)
            if record is None:
                return
            record.steps, record.load = steps, stream_share(self, record.spec.fps, steps, record.spec.is_video)
        self._send(SetSteps(stream_id, steps))

    def push_input(self, stream_id: str, frames, meta=None, due: float | None = None) -> None:
        """Video-to-video: the stream's next input chunk, uint8 [N, H, W, 3] (``meta`` comes back on its
        FrameBatch; ``due``: when its first output frame is due, for earliest-deadline-first scheduling)."""
        if self.holds(stream_id):
            self._send(PushInput(stream_id, frames, meta, due))

    def end_input(self, stream_id: str) -> None:
        """Video-to-video: no more input (the client half-closed); the chunks in flight still come out."""
        if self.holds(stream_id):
            self._send(EndInput(stream_id))

    def set_noise_scale(self, stream_id: str, noise_scale: float) -> None:
        """Video-to-video: the noise controller's s_init from the next input chunk on."""
        if self.holds(stream_id):
            self._send(SetNoiseScale(stream_id, noise_scale))

    @abstractmethod
    def consumed(self, stream_id: str) -> None:
        """The server took one finished chunk of the stream off its queue (frees one look-ahead slot)."""

    def holds(self, stream_id: str) -> bool:
        """The stream lives here now."""
        with self._changed:
            return stream_id in self._streams

    def share(self, stream_id: str) -> float:
        """The stream's admission load here (0 when it does not live here)."""
        with self._changed:
            record = self._streams.get(stream_id)
            return record.load if record is not None else 0.0

    def load(self) -> float:
        """Admission load: sum over its streams of 1 / max_streams(their fps, steps, kind)."""
        with self._changed:
            return sum(r.load for r in self._streams.values())

    def active(self) -> int:
        """Streams open here."""
        with self._changed:
            return len(self._streams)

    def wait_empty(self, timeout_s: float) -> bool:
        """Block until no stream is left here (or ``timeout_s``); True when empty."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._streams, timeout_s)

    # -- capacity, health, lifecycle --------------------------------------------------------------------

    @property
    @abstractmethod
    def broken(self) -> bool:
        """Its stages could not be rebuilt, or failed again and again: out of service for good."""

    @property
    def in_service(self) -> bool:
        """Takes new and moved streams and counts toward the fleet's floor: neither draining nor broken (the
        fleet retires it once its streams are gone, and starts a replacement)."""
        return not self.draining and not self.broken

    @abstractmethod
    def max_streams(self, fps: float, steps: int, video: bool = False) -> int:
        """Streams of ``fps`` at ``steps`` the latency model says this replica sustains (``video``: all
        video-to-video, each chunk's encode on stage 0 included)."""

    @abstractmethod
    def predicted_chunk_latency(self, steps: int, video: bool = False) -> float:
        """Seconds from a chunk's first forward to its clean latents at ``steps`` (``video``: from its encode),
        from the latency model."""

    @abstractmethod
    def probe(self, timeout_s: float) -> bool:
        """Readiness (sets ``healthy``): a real forward on every stage within ``timeout_s``. Also exports
        the stats the core measured meanwhile. Blocking: call it off the event loop."""

    @abstractmethod
    def hand_off(self, timeout_s: float) -> None:
        """An operator's drain: the replica finishes what is in flight, then every stream leaves with its
        checkpoint through ``rehome`` (asynchronously for a remote core: ``wait_empty`` to see it done).
        Blocking: call it off the event loop."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the core and free its stages. Blocking."""

    # -- for the implementations ------------------------------------------------------------------------

    @abstractmethod
    def _start(self, record: StreamRecord) -> None:
        """Send ``record.start_messages()`` to the core, and route its outputs to ``record.sink``."""

    @abstractmethod
    def _stop(self, stream_id: str) -> None:
        """Close the stream in the core."""

    @abstractmethod
    def _send(self, msg: ControlMessage) -> None:
        """A control message to the core (fire and forget: failures surface in the stream)."""

    def _register(self, record: StreamRecord) -> None:
        with self._changed:
            self._streams[record.stream_id] = record

    def _unregister(self, stream_id: str) -> StreamRecord | None:
        with self._changed:
            record = self._streams.pop(stream_id, None)
            self._changed.notify_all()
        return record

    def _record(self, stream_id: str) -> StreamRecord | None:
        with self._changed:
            return self._streams.get(stream_id)

    def _fail(self, stream_id: str, item: StreamFailed) -> None:
        """The stream ended in the core: forget it, tell its sink."""
        record = self._unregister(stream_id)
        if record is not None:
            record.sink(item)

    def _send_away(self, stream_id: str, checkpoint: StreamCheckpoint | None) -> None:
        """The stream left this replica: the service continues it elsewhere (or ends it)."""
        record = self._unregister(stream_id)
        if record is None:
            return
        if checkpoint is not None:
            record.checkpoint = checkpoint
        if self.rehome is None:
            record.sink(StreamFailed(stream_id, "replica lost"))
        else:
            self.rehome(self, [record])
