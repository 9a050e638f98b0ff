"""A video-to-video stream in the server (the Transform RPC, after it is admitted): one task reads the client's
requests (input frames into the ingress, controls, the half-close), the handler paces restyled frames out.

    request stream -> decode / crop / resize -> Ingress (bounded, subsampled to fps) -> PushInput (<= max_pending
    chunks in the engine) ... FrameBatch -> PlayoutPacer (due at input arrival + budget) -> Frame messages

Ends: the client half-closes (after the chunks in flight come back: OK), cancels, goes idle
(DEADLINE_EXCEEDED, reason idle), sends ``max_invalid_frames`` unusable frames in a row, a second config or a
control it cannot take (a bad value, or more steps than its pipeline has room or latency budget for)
(INVALID_ARGUMENT), the stream reaches its maximum duration, paused or not (DEADLINE_EXCEEDED), the server
drains or loses the stream (UNAVAILABLE), or reading the requests fails unexpectedly (INTERNAL).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from orchestrator.admission import validate_prompt
from orchestrator.deadline import PlayoutPacer
from orchestrator.ingress import Ingress, InputMeta, InvalidFrame, decode_frame
from orchestrator.session import State
from orchestrator.types import Encoding, EndReason, FrameOutcome, InputOutcome, Rejection, RequestError

log = logging.getLogger("streamgen.transform")


@dataclass(slots=True)
class Ended:
    """The reader ended the stream with a status (a bad request mid-stream, idle input)."""

    reason: EndReason
    message: str = ""


class VideoStream:
    """One admitted video-to-video stream: ``read`` (a task) feeds the replica, ``frames`` yields Frames."""

    def __init__(self, service, live, context, chunk_frames: int, malformed: object, frames_per_latent: int = 4):
        """``malformed``: what a request that does not parse arrives as (the server's sentinel)."""
        self.service, self.live, self.context, self.malformed = service, live, context, malformed
        spec = live.session.spec
        server = service.cfg.server
        self.ingress = Ingress(spec.fps, chunk_frames, frames_per_latent, max_pending=server.output_chunks_ahead)
        self.pacer = PlayoutPacer(spec.fps, spec.latency_budget_s, spec.late_policy)
        self.input_ended = False
        self.invalid_run = 0
        self.ended: Ended | None = None
        self.totals: dict[InputOutcome, int] = {}  # every input frame's outcome, for the end's trailers
        self._last_input_at = live.session.started

    # -- the request side ------------------------------------------------------------------------------

    async def read(self, requests) -> None:
        """Consume the client's requests until it half-closes, goes idle, or the stream ends."""
        session, server = self.live.session, self.service.cfg.server
        idle = session.spec.video.idle_timeout_s
        it = requests.__aiter__()
        nxt = None  # the pending read: kept across timeouts (cancelling a read would end the request stream)
        try:
            while session.state is not State.ENDED:
                # Wake at the idle end, or sooner when the frames queued make a chunk at a known time; a chunk
                # that waits for more frames (or, past its time, for the engine) needs no timer: a frame, or
                # the frames loop after the engine gives a chunk back, feeds it.
                wake = self._last_input_at + idle
                chunk_at = self.ingress.ready_at(self.service.clock.now())
                if chunk_at is not None:
                    wake = min(wake, chunk_at)
                nxt = nxt or asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait({nxt}, timeout=max(0.0, wake - self.service.clock.now()))
                if not done:
                    if self.service.clock.now() - self._last_input_at >= idle:
                        return self._end(Ended(EndReason.IDLE, f"idle: no input frame for {idle:g} s"))
                    self._feed()  # a chunk whose time has come
                    continue
                try:
                    request = nxt.result()
                except StopAsyncIteration:
                    break
                finally:
                    nxt = None
                kind = request.WhichOneof("kind") if request is not self.malformed else None
                if kind == "frame":
                    await self._frame(request.frame)
                elif kind == "control":
                    self._control(request.control)
                else:  # a second config, or a request that does not parse
                    return self._end(Ended(EndReason.INVALID_INPUT, "config: sent twice (it goes first, once)"
                                           if kind == "config" else "request could not be parsed"))
                if self.invalid_run >= server.max_invalid_frames:
                    return self._end(Ended(EndReason.INVALID_INPUT,
                                           f"frame.data: {self.invalid_run} unusable frames in a row"))
        except Exception:  # noqa: BLE001 - a bug: the stream ends INTERNAL (opaque), never as the client's OK end
            log.error("stream %s: reading its requests failed", session.stream_id[:8], exc_info=True)
            self._end(Ended(EndReason.INTERNAL, "internal error"))
        finally:
            if nxt is not None:
                nxt.cancel()
            self.input_ended = True
            if session.state is not State.ENDED:
                self._feed()  # the frames left make a last chunk
                self.live.replica.end_input(session.stream_id)
                self.service._offer(self.live, None)  # wakes the frames loop: it may be done

    async def _frame(self, frame) -> None:
        session = self.live.session
        now = self.service.clock.now()
        self._last_input_at = now
        if session.state is State.PAUSED:  # output stops; input is not queued up behind it
            self._input(InputOutcome.DROPPED_BACKLOG)
            return
        spec = session.spec
        encoding = Encoding.RAW_RGB if frame.encoding == 1 else Encoding.JPEG
        try:  # off the event loop: a 4096 x 4096 JPEG takes a while to decode
            image = await asyncio.get_running_loop().run_in_executor(
                None, decode_frame, frame.data, encoding, frame.width, frame.height, spec.width, spec.height)
        except InvalidFrame as err:
            self.invalid_run += 1
            self._input(InputOutcome.DROPPED_INVALID)
            log.debug("stream %s: frame %d dropped: %s", session.stream_id[:8], frame.index, err)
            return
        self.invalid_run = 0
        self.ingress.offer(InputMeta(int(frame.index), int(frame.capture_unix_ns), now), image)  # counts a drop
        self._feed()

    def _feed(self) -> None:
        """Push every chunk the ingress may build now (after the input ended: its last frames too)."""
        while True:
            got = self.ingress.take(self.service.clock.now(), final=self.input_ended)
            if got is None:
                break
            frames, metas = got
            due = metas[0].arrival + self.live.session.spec.latency_budget_s
            self.live.replica.push_input(self.live.session.stream_id, frames, metas, due)
        self._flush_counts()

    def _control(self, control) -> None:
        session, replica = self.live.session, self.live.replica
        try:  # every change is checked before any is applied
            if control.HasField("prompt"):
                validate_prompt(control.prompt, self.service.cfg.server)
            if control.HasField("steps"):
                self.service.check_steps(self.live, control.steps)
            if control.HasField("noise_scale") and not 0 < control.noise_scale <= 1:
                raise RequestError(Rejection.INVALID, "noise_scale: must be in (0, 1]")
        except RequestError as err:
            return self._end(Ended(EndReason.INVALID_INPUT, err.message))
        if control.HasField("prompt"):
            session.prompt_revision += 1
            replica.set_prompt(session.stream_id, control.prompt)
        if control.HasField("steps"):
            replica.set_steps(session.stream_id, control.steps)
        if control.HasField("noise_scale"):
            replica.set_noise_scale(session.stream_id, control.noise_scale)
        if control.HasField("paused"):
            if control.paused:
                session.pause()
                self.live.resumed.clear()
            else:
                session.resume()
                self.live.resumed.set()

    def _end(self, ended: Ended) -> None:
        if self.live.session.end(ended.reason):  # the first end stands (a drain or cancel may have come first)
            self.ended = ended
        self.live.resumed.set()
        self.service._offer(self.live, None)

    def _input(self, outcome: InputOutcome, n: int = 1) -> None:
        self.ingress.count(outcome, n)
        self._flush_counts()

    def _flush_counts(self) -> None:
        """Input outcomes counted since the last flush go to the metric."""
        for outcome, n in self.ingress.counts.items():
            if n:
                self.service.metrics.input_frames.labels(outcome.value).inc(n)
                self.totals[outcome] = self.totals.get(outcome, 0) + n
        self.ingress.counts.clear()

    # -- the response side -----------------------------------------------------------------------------

    async def frames(self):
        """Restyled frames, paced: each due at its input's arrival + the budget."""
        from protos.streamgen.v1 import stream_pb2

        session, live, metrics, clock = self.live.session, self.live, self.service.metrics, self.service.clock
        spec, server = session.spec, self.service.cfg.server
        ends_at = session.started + server.max_stream_duration_s
        while session.state is not State.ENDED:
            if self.input_ended and self.ingress.pending == 0:
                session.end(EndReason.CLIENT_DONE)
                return
            left = ends_at - clock.now()
            try:
                item = await asyncio.wait_for(live.outbox.get(), timeout=max(0.0, min(server.no_output_timeout_s,
                                                                                        left)))
            except asyncio.TimeoutError:
                if left <= server.no_output_timeout_s:
                    session.end(EndReason.MAX_DURATION)
                    return
                if self.ingress.pending:  # the engine holds chunks and gives nothing back
                    session.end(EndReason.NO_OUTPUT)
                    return
                continue
            if item is None:  # an end (drain, cancel, the reader) or a wake-up
                if session.state is State.ENDED:
                    return
                continue
            if not hasattr(item, "frames"):  # StreamFailed
                session.end(EndReason.WORKER_LOST)
                return
            live.replica.consumed(session.stream_id)
            self.ingress.delivered(item.repeated)
            self._flush_counts()
            self._feed()
            stale = item.prompt_revision < session.prompt_revision
            for data, meta in zip(item.frames, item.input or []):
                if meta is None:  # the padding of the input's last chunk
                    continue
                if stale:
                    session.count(FrameOutcome.DROPPED_STALE)
                    metrics.frames.labels(FrameOutcome.DROPPED_STALE.value).inc()
                    continue
                if session.state is State.PAUSED:
                    await live.wait_resumed(ends_at, clock)
                if session.state is State.ENDED:
                    return
                placement = self.pacer.place(meta.arrival, max(item.ready_at, clock.now()))
                if placement.send_at is None:
                    session.count(placement.outcome)
                    metrics.frames.labels(placement.outcome.value).inc()
                    continue
                delay = placement.send_at - clock.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = clock.now()
                frame = stream_pb2.Frame(
                    stream_id=session.stream_id, index=session.next_index, data=data,
                    encoding=stream_pb2.RAW_RGB if spec.encoding is Encoding.RAW_RGB else stream_pb2.JPEG,
                    width=item.width, height=item.height, due_unix_ns=clock.wall_ns(placement.due),
                    sent_unix_ns=clock.wall_ns(now), deadline_met=placement.deadline_met,
                    prompt_revision=item.prompt_revision, chunk=item.chunk, input_index=meta.index,
                    capture_unix_ns=meta.capture_unix_ns)
                if session.first_frame_at is None:
                    metrics.ttff.observe(now - session.started)
                session.on_frame(now)
                session.count(placement.outcome)
                metrics.frames.labels(placement.outcome.value).inc()
                metrics.frame_latency.observe(now - meta.arrival)
                yield frame

    def moved(self) -> None:
        """The stream continues on another replica: the chunks the old one held will not come back."""
        self.ingress.finish_pending()
        self._flush_counts()

    def finish(self) -> None:
        """The stream ended: what the ingress still held is counted."""
        self.ingress.finish()
        self._flush_counts()

