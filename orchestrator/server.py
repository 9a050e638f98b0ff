"""The gRPC front end (grpc.aio): the one module that imports grpc.

Every call first passes the guard (``auth.ServiceGuard``: token, role, call limit; ``current_caller()``).
Generate: validate -> tenant quota -> admit -> open on a replica -> pace frames out at the stream's fps ->
close in ``finally``. Transform (video-to-video): the same admission and end, with ``orchestrator/transform.py``
between them (input frames in, restyled frames out). Errors are status codes with plain messages (never
tracebacks or addresses), following RELIABILITY.md's contract, sent through ``auth.abort``: trailers carry the
request id, and ``retry-after-ms`` where a retry can help. A stream belongs to its caller's tenant:
``find_stream`` is the one lookup.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from orchestrator.config import MAX_STEPS
from orchestrator.admission import Admission, validate, validate_prompt, validate_steps, validate_transform
from orchestrator.audit import audit
from orchestrator.auth import HEALTH_RPCS, Security, ServiceGuard, abort, current_caller, load_security
from orchestrator.clock import Clock
from orchestrator.config import ServiceConfig, message_limits
from orchestrator.deadline import Pacer
from orchestrator.metrics import Metrics
from orchestrator.quota import TenantQuotas
from orchestrator.replica_client import ReplicaClient
from orchestrator.session import Session, State
from orchestrator.transform import VideoStream
from orchestrator.types import EndReason, FrameOutcome, Rejection, RequestError
from protos.streamgen.v1 import stream_pb2, stream_pb2_grpc
from workers.core_messages import FrameBatch, StreamFailed

log = logging.getLogger("streamgen.server")
SERVICE_NAME = "streamgen.v1.StreamService"
HAND_OFF_SETTLE_S = 5.0  # a replica in its own process hands its streams back asynchronously
DEADLINE_SLACK_S = 0.25  # a cancel this close to the call's deadline is the client's deadline expiring
# How a handler learns its call is gone: cancelled at an await, or closed at its ``yield`` when gRPC's task was
# cancelled while it wrote the frame just yielded (the generator is then closed, not cancelled).
CALL_GONE = (asyncio.CancelledError, GeneratorExit)

STATUS = {
    Rejection.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Rejection.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Rejection.CAPACITY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Rejection.QUOTA: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Rejection.BUDGET: grpc.StatusCode.FAILED_PRECONDITION,
    Rejection.DRAINING: grpc.StatusCode.UNAVAILABLE,
}


@dataclass(slots=True)
class LiveStream:
    """A running stream as the server holds it."""

    session: Session
    outbox: asyncio.Queue
    """Finished chunks (FrameBatch), a StreamFailed, or None (drain / cancel) for the stream's handler."""
    replica: ReplicaClient
    """The replica holding its caches (changes when the stream moves); controls and close go there."""
    tenant: str
    """The tenant that started it: only callers of that tenant find it."""
    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while output may flow (not paused, or ended)."""
    video: VideoStream | None = None
    """Video-to-video: its input side (orchestrator/transform.py)."""

    async def wait_resumed(self, ends_at: float, clock: Clock) -> None:
        """Wait while the stream is paused: until it resumes or ends, or until ``ends_at`` (its maximum duration
        applies paused too), when it ends MAX_DURATION."""
        try:
            await asyncio.wait_for(self.resumed.wait(), max(0.0, ends_at - clock.now()))
        except asyncio.TimeoutError:
            self.session.end(EndReason.MAX_DURATION)


class StreamService(stream_pb2_grpc.StreamServiceServicer):
    def __init__(self, cfg: ServiceConfig, replicas: list[ReplicaClient], metrics: Metrics, health_servicer,
                 clock: Clock | None = None, tenants: bool = True):
        """``tenants``: callers carry tenants (a tokens file), so tenant quotas apply."""
        self.cfg = cfg
        self.replicas = replicas
        self.metrics = metrics
        self.health = health_servicer
        self.clock = clock or Clock()
        self.admission = Admission(cfg.server, cfg.generation.sampler.chunk_frames)
        self.quotas = TenantQuotas(cfg.tenants, self.clock, cfg.server.retry_after_ms, enforce=tenants)
        self.streams: dict[str, LiveStream] = {}
        self._moves = threading.Lock()  # a stream's end against its move to another replica (an engine thread)
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's (streams are opened on it)
        self.draining = False
        self._drained = asyncio.Event()
        self.capacity_refusals = 0  # the autoscaler reads it

    @property
    def sessions(self) -> dict[str, Session]:
        return {sid: live.session for sid, live in self.streams.items()}

    # -- Generate ------------------------------------------------------------------------------------

    async def Generate(self, request, context):
        caller = current_caller()
        if request is MALFORMED:
            await self._reject(context, caller, Rejection.INVALID, "malformed", grpc.StatusCode.INTERNAL,
                               "request could not be parsed")
        start = self.clock.now()
        live = await self._admit(context, caller, lambda: validate(request, self.cfg.server, self.cfg.generation),
                                 start)
        reason = EndReason.INTERNAL  # stands if anything unexpected escapes
        try:
            async for frame in self._frames(live):
                yield frame
            reason = live.session.end_reason or EndReason.CLIENT_DONE
        except CALL_GONE:
            reason = self._cancelled(live, context)
            raise
        finally:
            self._release(live, reason, start, caller)
        await self._end_status(live, context)

    async def Transform(self, request_iterator, context):
        """Video-to-video: the first request is the config; then input frames and controls (transform.py)."""
        caller = current_caller()
        start = self.clock.now()
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            first = None
        if first is MALFORMED:
            await self._reject(context, caller, Rejection.INVALID, "malformed", grpc.StatusCode.INTERNAL,
                               "request could not be parsed")
        if first is None or first.WhichOneof("kind") != "config":
            await self._reject(context, caller, Rejection.INVALID, Rejection.INVALID.value,
                               grpc.StatusCode.INVALID_ARGUMENT, "first message must be config")
        live = await self._admit(context, caller, lambda: validate_transform(first.config, self.cfg.server,
                                                                             self.cfg.generation), start)
        video = live.video = VideoStream(self, live, context, self.cfg.generation.sampler.chunk_frames, MALFORMED,
                                         self.cfg.generation.model.vae_stride[0])
        reader = asyncio.create_task(video.read(requests))
        reason = EndReason.INTERNAL
        try:
            async for frame in video.frames():
                yield frame
            reason = live.session.end_reason or EndReason.CLIENT_DONE
        except CALL_GONE:
            reason = self._cancelled(live, context)
            raise
        finally:
            reader.cancel()
            video.finish()
            self._release(live, reason, start, caller)
        counts = tuple((f"input-{k.value.replace('_', '-')}", str(n)) for k, n in sorted(video.totals.items()))
        if video.ended is not None:
            code = _READER_END_CODES.get(video.ended.reason, grpc.StatusCode.INVALID_ARGUMENT)
            await abort(context, code, video.ended.message, trailers=counts)
        await self._end_status(live, context, counts)
        context.set_trailing_metadata(counts)

    async def _admit(self, context, caller, make_spec, start: float) -> LiveStream:
        """Validate (``make_spec``), check the tenant's quota, admit, and open the stream on the chosen replica;
        refusals abort the call (audited)."""
        tenant = caller.principal.tenant
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0.001:  # no time left for any frame: the budget reason
            await self._reject(context, caller, Rejection.BUDGET, "deadline", grpc.StatusCode.DEADLINE_EXCEEDED,
                               "deadline already expired")
        try:
            spec = make_spec()
            self.quotas.check(tenant)
            serving = [r for r in self.replicas if r.in_service and r.healthy]
            decision = self.admission.decide(spec, serving, self.draining)
        except RequestError as err:
            if err.reason is Rejection.CAPACITY:
                self.capacity_refusals += 1
            await self._reject(context, caller, err.reason, err.reason.value, STATUS[err.reason], err.message,
                               err.retry_after_ms)
        self.quotas.started(tenant)
        self.metrics.stream_starts.labels("admitted").inc()
        stream_id = secrets.token_hex(16)  # 128 random bits: ids are not guessable (tenancy is checked anyway)
        replica = serving[decision.replica]
        session = Session(stream_id, spec, replica.index, decision.utilisation, start)
        audit("stream_start", caller.request_id, tenant, "admitted", stream_id=stream_id)
        loop = self._loop = asyncio.get_running_loop()
        live = LiveStream(session, asyncio.Queue(maxsize=self.cfg.server.output_chunks_ahead + 8), replica, tenant)
        live.resumed.set()

        def sink(item):  # engine thread -> this loop
            loop.call_soon_threadsafe(self._offer, live, item)

        self.streams[stream_id] = live
        self.metrics.streams_active.inc()
        replica.open(stream_id, spec, sink)
        return live

    async def _reject(self, context, caller, reason: Rejection, outcome: str, code: grpc.StatusCode, message: str,
                      retry_after_ms: int | None = None) -> NoReturn:
        """A refused start, the one way: counted (a rejected start and its reason), audited as
        ``rejected:<outcome>``, aborted with ``code``."""
        self.metrics.stream_starts.labels("rejected").inc()
        self.metrics.stream_rejections.labels(reason.value).inc()
        audit("stream_start", caller.request_id, caller.principal.tenant, f"rejected:{outcome}")
        await abort(context, code, message, retry_after_ms)

    def _cancelled(self, live: LiveStream, context) -> EndReason:
        # The client's deadline fires first: its cancel reaches us a moment before our own copy of it expires.
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_S
        return live.session.end_reason or (EndReason.DEADLINE if expired else EndReason.CLIENT_CANCEL)

    def _release(self, live: LiveStream, reason: EndReason, start: float, caller) -> None:
        """The stream's one end: its replica frees it, its quota, session, metrics and audit line record it."""
        session = live.session
        with self._moves:  # once it is out of the table, a move that comes after closes it on its new replica
            self.streams.pop(session.stream_id, None)
            replica = live.replica
        replica.close(session.stream_id)
        session.end(reason)
        self.quotas.ended(live.tenant)
        self.metrics.streams_active.dec()
        self.metrics.streams_ended.labels(session.end_reason.value).inc()
        duration = self.clock.now() - start
        self.metrics.stream_duration.observe(duration)
        audit("stream_end", caller.request_id, live.tenant, session.end_reason.value, duration, session.stream_id)
        if self.draining and not self.streams:
            self._drained.set()

    async def _end_status(self, live: LiveStream, context, trailers: tuple = ()) -> None:
        """The status of a stream that ended on the server's side (draining, lost, silent, too long)."""
        reason = live.session.end_reason
        if reason in (EndReason.DRAIN, EndReason.WORKER_LOST, EndReason.NO_OUTPUT):
            await abort(context, grpc.StatusCode.UNAVAILABLE, _END_MESSAGES[reason], self.cfg.server.retry_after_ms,
                        trailers)
        if reason is EndReason.MAX_DURATION:
            await abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, _END_MESSAGES[reason], trailers=trailers)

    async def _frames(self, live: LiveStream):
        """Pace the stream's frames out; ends by returning (max_frames, drain) or by cancellation."""
        session, out = live.session, live.outbox
        spec, server = session.spec, self.cfg.server
        pacer = Pacer(spec.fps, spec.late_policy, server.stall_frames)
        slot = 0  # generated frames (sent or dropped): the pacer's frame number; wire indices have no gaps
        last_sent: float | None = None
        ends_at = session.started + server.max_stream_duration_s
        while not session.done and session.state is not State.ENDED:
            left = ends_at - self.clock.now()
            try:
                item = await asyncio.wait_for(out.get(), timeout=max(0.0, min(server.no_output_timeout_s, left)))
            except asyncio.TimeoutError:
                session.end(EndReason.NO_OUTPUT if left > server.no_output_timeout_s else EndReason.MAX_DURATION)
                return
            if item is None:  # drain or cancel
                return
            if isinstance(item, StreamFailed):
                session.end(EndReason.WORKER_LOST)
                return
            live.replica.consumed(session.stream_id)
            if item.prompt_revision < session.prompt_revision:  # made stale by a prompt change
                session.count(FrameOutcome.DROPPED_STALE, len(item.frames))
                self.metrics.frames.labels(FrameOutcome.DROPPED_STALE.value).inc(len(item.frames))
                continue
            for data in item.frames:
                if session.done or session.state is State.ENDED:  # max_frames, or ended by drain / cancel
                    break
                if session.state is State.PAUSED:  # output stops; the engine waits on its look-ahead bound
                    await live.wait_resumed(ends_at, self.clock)
                    if session.state is State.ENDED:
                        break
                    pacer.resume(slot, self.clock.now())
                if self.clock.now() >= ends_at:
                    session.end(EndReason.MAX_DURATION)
                    break
                placement = pacer.place(slot, max(item.ready_at, self.clock.now()))
                slot += 1
                if placement.lost:
                    session.count(FrameOutcome.LOST, placement.lost)
                    self.metrics.frames.labels(FrameOutcome.LOST.value).inc(placement.lost)
                if placement.send_at is None:
                    session.count(placement.outcome)
                    self.metrics.frames.labels(placement.outcome.value).inc()
                    continue
                delay = placement.send_at - self.clock.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = self.clock.now()
                frame = stream_pb2.Frame(
                    stream_id=session.stream_id, index=session.next_index, data=data,
                    encoding=stream_pb2.RAW_RGB if spec.encoding.value == "raw_rgb" else stream_pb2.JPEG,
                    width=item.width, height=item.height, due_unix_ns=self.clock.wall_ns(placement.due),
                    sent_unix_ns=self.clock.wall_ns(now), deadline_met=placement.deadline_met,
                    prompt_revision=item.prompt_revision, chunk=item.chunk)
                if session.first_frame_at is None:
                    self.metrics.ttff.observe(now - session.started)
                if last_sent is not None:
                    gap = now - last_sent
                    self.metrics.output_interval.observe(gap)
                    if gap >= max(3 / spec.fps, 1 / spec.fps + 0.15):
                        self.metrics.output_freezes.inc()
                last_sent = now
                session.on_frame(now)
                session.count(placement.outcome)
                self.metrics.frames.labels(placement.outcome.value).inc()
                self.metrics.frame_latency.observe(item.latency_s + max(0.0, now - item.ready_at))
                yield frame
        if session.done:
            session.end(EndReason.CLIENT_DONE)

    def check_steps(self, live: LiveStream, steps: int) -> None:
        """A steps change: in range, and admitted where the stream runs (its latency budget, its replica's
        headroom); raises RequestError."""
        validate_steps(steps)
        replica = live.replica
        self.admission.check_steps(live.session.spec, steps, replica, replica.share(live.session.stream_id))

    def rehome(self, stream_id: str, replica: ReplicaClient) -> bool:
        """The stream now lives on ``replica`` (a migration); controls and close go there. Thread-safe. False
        when the stream ended meanwhile: the caller closes it on ``replica``, which nothing else would."""
        with self._moves:
            live = self.streams.get(stream_id)
            if live is None:
                return False
            live.replica = replica
        if live.video is not None:  # the chunks the old replica held will not come back
            self._loop.call_soon_threadsafe(live.video.moved)
        return True

    def _offer(self, live: LiveStream, item) -> None:
        """Put without blocking (on the loop). The engine's look-ahead bound keeps the queue from filling;
        if it does fill, the oldest chunk goes: its frames are counted and its look-ahead slot given back."""
        try:
            live.outbox.put_nowait(item)
            return
        except asyncio.QueueFull:
            dropped = live.outbox.get_nowait()
            live.outbox.put_nowait(item)
        if isinstance(dropped, FrameBatch):
            live.session.count(FrameOutcome.DROPPED_OVERFLOW, len(dropped.frames))
            self.metrics.frames.labels(FrameOutcome.DROPPED_OVERFLOW.value).inc(len(dropped.frames))
            live.replica.consumed(live.session.stream_id)

    def _end(self, live: LiveStream, reason: EndReason) -> None:
        """End the stream from outside its handler (cancel, drain): the handler wakes and returns."""
        live.session.end(reason)
        live.resumed.set()
        self._offer(live, None)

    # -- Control, capacity, drain ----------------------------------------------------------------------

    def find_stream(self, stream_id: str) -> LiveStream | None:
        """The caller's running stream ``stream_id``. Another tenant's stream is None, exactly as an unknown
        id is: the one ownership check, for every RPC that names a stream."""
        live = self.streams.get(stream_id)
        if live is None or live.tenant != current_caller().principal.tenant:
            return None
        return live

    async def Control(self, request, context):
        if request is MALFORMED:
            await abort(context, grpc.StatusCode.INTERNAL, "request could not be parsed")
        live = self.find_stream(request.stream_id)
        if live is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "stream_id: no such running stream")
        session = live.session
        if request.cancel:
            self._end(live, EndReason.CLIENT_CANCEL)
            return stream_pb2.ControlReply(stream_id=request.stream_id, prompt_revision=session.prompt_revision)
        try:  # every change is checked before any is applied
            if request.HasField("prompt"):
                validate_prompt(request.prompt, self.cfg.server)
            if request.HasField("steps"):
                self.check_steps(live, request.steps)
        except RequestError as err:
            await abort(context, STATUS[err.reason], err.message, err.retry_after_ms)
        if request.HasField("prompt"):
            session.prompt_revision += 1
            live.replica.set_prompt(request.stream_id, request.prompt)
        if request.HasField("steps"):
            live.replica.set_steps(request.stream_id, request.steps)
        if request.HasField("paused"):
            if request.paused:
                session.pause()
                live.resumed.clear()
            else:
                session.resume()
                live.resumed.set()
        return stream_pb2.ControlReply(stream_id=request.stream_id, prompt_revision=session.prompt_revision)

    async def GetCapacity(self, request, context):
        if request is MALFORMED:
            await abort(context, grpc.StatusCode.INTERNAL, "request could not be parsed")
        fps = request.fps or self.cfg.server.default_fps
        steps = request.steps or self.cfg.generation.sampler.num_steps
        if fps <= 0 or fps != fps or not (1 <= steps <= MAX_STEPS):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "fps / steps out of range")
        serving = [r for r in self.replicas if r.in_service and r.healthy]
        video = bool(request.video)
        total = sum(min(r.max_streams(fps, steps, video), self.cfg.server.max_streams_per_replica) for r in serving)
        latency = min((r.predicted_chunk_latency(steps, video) for r in serving), default=0.0)
        states = [stream_pb2.ReplicaState(index=r.index, streams_active=r.active(), draining=r.draining,
                                          healthy=r.healthy) for r in self.replicas] \
            if current_caller().principal.operator else []  # replica details are for operators
        return stream_pb2.CapacityReply(streams_active=len(self.streams), streams_max=total,
                                        predicted_chunk_latency_s=latency, replicas=len(self.replicas),
                                        draining=self.draining, replica_states=states)

    async def Drain(self, request, context):
        if request is MALFORMED:
            await abort(context, grpc.StatusCode.INTERNAL, "request could not be parsed")
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self.cfg.server.drain_timeout_s
        if request.HasField("replica"):
            host = next((r for r in self.replicas if r.index == request.replica), None)
            if host is None:
                await abort(context, grpc.StatusCode.NOT_FOUND, f"no replica {request.replica} (GetCapacity lists them)")
            return stream_pb2.DrainReply(streams_active=await self.drain_replica(host, timeout))
        await self.drain(timeout)
        return stream_pb2.DrainReply(streams_active=len(self.streams))

    async def drain_replica(self, host: ReplicaClient, timeout: float) -> int:
        """No new streams on ``host``; streams still on it after ``timeout`` move to other replicas
        (re-cached from their recent clean latents) or end UNAVAILABLE. Returns the streams left on it."""
        host.draining = True
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, host.wait_empty, timeout):
            try:
                await loop.run_in_executor(None, host.hand_off, max(5.0, self.cfg.parallel.stage_call_timeout_s))
            except Exception:  # noqa: BLE001 - stuck or gone: the stage timeouts and recovery take over
                log.warning("replica %d did not hand its streams off", host.index, exc_info=True)
            await loop.run_in_executor(None, host.wait_empty, HAND_OFF_SETTLE_S)
        return host.active()

    async def set_ready(self, ready: bool) -> None:
        """Readiness of the stream service (liveness, the empty service name, stays SERVING)."""
        status = health_pb2.HealthCheckResponse.SERVING if ready and not self.draining else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(SERVICE_NAME, status)
        self.metrics.health_status.labels(SERVICE_NAME).set(int(status == health_pb2.HealthCheckResponse.SERVING))

    async def drain(self, timeout: float) -> None:
        """Stop admitting (readiness NOT_SERVING), let streams run until ``timeout``, then end them UNAVAILABLE."""
        if not self.draining:
            self.draining = True
            self.metrics.draining.set(1)
            await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
            self.metrics.health_status.labels(SERVICE_NAME).set(0)
        if not self.streams:
            return
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            for live in list(self.streams.values()):
                self._end(live, EndReason.DRAIN)
            try:  # each stream's handler notices within one frame interval and ends UNAVAILABLE
                await asyncio.wait_for(self._drained.wait(), 5.0)
            except asyncio.TimeoutError:
                log.warning("%d streams still open after drain", len(self.streams))


_READER_END_CODES = {  # a Transform's reader ended it: idle input, a bug; otherwise bad input (INVALID_ARGUMENT)
    EndReason.IDLE: grpc.StatusCode.DEADLINE_EXCEEDED,
    EndReason.INTERNAL: grpc.StatusCode.INTERNAL,
}

_END_MESSAGES = {
    EndReason.DRAIN: "server is draining; reconnect elsewhere",
    EndReason.WORKER_LOST: "the pipeline serving this stream failed",
    EndReason.NO_OUTPUT: "no output within the no-output timeout",
    EndReason.MAX_DURATION: "the stream reached the server's maximum duration; start a new one to go on",
}


MALFORMED = object()  # what a request that does not parse deserialises to


def _parser(message_cls):
    """Deserialiser that never raises: grpc.aio would answer UNKNOWN naming the exception class."""
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError, invalid UTF-8, ...: answered INTERNAL
            log.debug("malformed %s", message_cls.__name__, exc_info=True)
            return MALFORMED
    return parse


def _handlers(service: StreamService) -> grpc.GenericRpcHandler:
    pb = stream_pb2
    methods = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, _parser(pb.GenerateRequest), pb.Frame.SerializeToString),
        "Transform": grpc.stream_stream_rpc_method_handler(
            service.Transform, _parser(pb.TransformRequest), pb.Frame.SerializeToString),
        "Control": grpc.unary_unary_rpc_method_handler(
            service.Control, _parser(pb.ControlRequest), pb.ControlReply.SerializeToString),
        "GetCapacity": grpc.unary_unary_rpc_method_handler(
            service.GetCapacity, _parser(pb.CapacityRequest), pb.CapacityReply.SerializeToString),
        "Drain": grpc.unary_unary_rpc_method_handler(
            service.Drain, _parser(pb.DrainRequest), pb.DrainReply.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)


def server_options(cfg: ServiceConfig) -> list[tuple[str, int]]:
    """The grpc channel arguments every abuse limit of ``server`` sets (S5, S6), each from the config."""
    server = cfg.server
    receive, send = message_limits(cfg)
    return [
        ("grpc.max_receive_message_length", receive), ("grpc.max_send_message_length", send),
        ("grpc.keepalive_time_ms", round(server.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(server.keepalive_timeout_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", round(server.min_recv_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", server.max_ping_strikes),
    ]


async def start_server(cfg: ServiceConfig, replicas: list, metrics: Metrics, security: Security | None = None,
                       internal_listen: str | None = None) -> tuple[grpc.aio.Server, StreamService, int]:
    """Build and start the grpc.aio server; returns (server, servicer, bound port). The TLS and tokens files
    are read before anything binds (``security``, or loaded here). ``internal_listen``: a unix socket the same
    server also serves, plaintext, for the browser page's endpoint (orchestrator/web.py); the guard still checks
    every call on it."""
    security = security or load_security(cfg.server)
    guard = ServiceGuard(security.tokens, cfg.server, metrics)  # first: interceptors added later go after it
    # The guard bounds the service's calls and, apart, health's; the library's bound is their sum, so a health
    # Check still answers while the service is at its limit, and no flood of health calls crowds the service.
    server = grpc.aio.server(interceptors=[guard], options=server_options(cfg),
                             maximum_concurrent_rpcs=cfg.server.maximum_concurrent_rpcs + HEALTH_RPCS)
    health_servicer = health.aio.HealthServicer()
    service = StreamService(cfg, replicas, metrics, health_servicer, tenants=security.tokens is not None)
    server.add_generic_rpc_handlers((_handlers(service),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if cfg.server.reflection:
        from grpc_reflection.v1alpha import reflection

        names = (stream_pb2.DESCRIPTOR.services_by_name["StreamService"].full_name, reflection.SERVICE_NAME,
                 health.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    if security.certificates is not None:
        port = server.add_secure_port(cfg.server.listen, security.certificates.credentials())
    else:
        port = server.add_insecure_port(cfg.server.listen)
    if port == 0:
        raise RuntimeError(f"could not bind {cfg.server.listen}")
    if internal_listen and server.add_insecure_port(internal_listen) == 0:
        raise RuntimeError("could not bind the page's internal socket")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    metrics.health_status.labels(SERVICE_NAME).set(1)
    log.info("streamgen listening on %s", cfg.server.listen.rsplit(":", 1)[0] + f":{port}")
    return server, service, port


async def start_health_server(listen: str, health_servicer) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with only grpc.health.v1 (``server.health_listen``), sharing the main server's
    statuses: for probes that present neither a certificate nor a token (kubelet, Docker HEALTHCHECK)."""
    server = grpc.aio.server(maximum_concurrent_rpcs=HEALTH_RPCS)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"could not bind {listen}")
    await server.start()
    return server, port
