"""One browser page's WebSocket (orchestrator/web.py serves the page): its messages become calls on the service's
own gRPC API, its frames go back to the page as JPEG.

    page --{"type": "start"}--> Generate (text) or Transform (camera), with the page's token as the bearer token
    Frames --> the newest waiting frame --> the page, at most ``web_frames_in_flight`` unacknowledged
    page --binary camera frames--> the Transform request stream (the newest wins) --> the server's ingress
    page --{"type": "control"}--> Control (text) or an in-band TransformControl (camera)
    page --{"type": "stop"}, or its socket closes--> the call is cancelled: the server frees the stream at once

Messages from the page are JSON objects with a ``type``. One that does not parse, names an unknown type or has a
value out of range is answered ``{"type": "error", "message": ...}`` and changes nothing: a running stream goes
on (a start is checked with the server's own ``validate`` before a running stream is replaced).

Wire formats: an output frame is a binary message ``u32 n | n bytes of JSON header | JPEG``; a camera frame is
``f64 capture time (ms since the epoch, the page's clock) | u16 width | u16 height | JPEG``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import struct
import time
from collections import deque

import grpc
from aiohttp import WSCloseCode, WSMsgType, web

from orchestrator._compat import ServerStatusCall
from orchestrator.admission import validate, validate_prompt, validate_steps, validate_transform
from orchestrator.config import MAX_STEPS, ServiceConfig
from orchestrator.metrics import Metrics
from orchestrator.types import RequestError
from protos.streamgen.v1 import stream_pb2

log = logging.getLogger("streamgen.web")

INPUT_HEADER = struct.Struct("<dHH")
FRAME_HEADER = struct.Struct("<I")
INPUT_AHEAD = 2  # camera frames waiting for the request stream; a newer one pushes the oldest out
TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")  # what an authorization header value may carry
CONTROL_TIMEOUT_S = 5.0
GENERIC = {  # for a status raised by the channel itself (its text may name the internal socket)
    grpc.StatusCode.UNAVAILABLE: "the service is unavailable; try again shortly",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the call took too long",
}


class BadMessage(Exception):
    """A page message that is refused (the reply names what is wrong)."""


class CameraInput:
    """The Transform request stream: the config, then controls in order and camera frames, the newest first
    to go when the stream has not taken them yet."""

    def __init__(self, config: stream_pb2.TransformConfig, metrics: Metrics):
        self.config, self.metrics = config, metrics
        self.frames: deque = deque()
        self.controls: deque = deque()
        self.wake = asyncio.Event()
        self.next_index = 0

    def frame(self, frame: stream_pb2.InputFrame) -> None:
        if len(self.frames) >= INPUT_AHEAD:
            self.frames.popleft()
            self.metrics.web_input_frames.labels("dropped").inc()
        self.frames.append(frame)
        self.wake.set()

    def control(self, control: stream_pb2.TransformControl) -> None:
        self.controls.append(control)
        self.wake.set()

    async def requests(self):
        yield stream_pb2.TransformRequest(config=self.config)
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.controls or self.frames:
                if self.controls:
                    yield stream_pb2.TransformRequest(control=self.controls.popleft())
                else:
                    self.metrics.web_input_frames.labels("forwarded").inc()
                    yield stream_pb2.TransformRequest(frame=self.frames.popleft())


class PageStream:
    """The page's running stream: its gRPC call and the frames on their way to the page."""

    def __init__(self, number: int, mode: str, call, metadata: tuple, inputs: CameraInput | None):
        self.number, self.mode, self.call, self.metadata, self.inputs = number, mode, call, metadata, inputs
        self.stream_id = ""
        self.pending: stream_pb2.Frame | None = None
        """The newest frame not yet sent (a newer one replaces it: the page gets the latest, not a backlog)."""
        self.sent = self.acked = self.dropped = 0
        self.revision = 0  # camera: prompt changes sent in band
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task] = []


class PageSession:
    def __init__(self, ws: web.WebSocketResponse, stub, cfg: ServiceConfig, metrics: Metrics, auth: bool,
                 internal: str):
        """``auth``: the server checks tokens (the page asks for one). ``internal``: the channel's target, kept out
        of every message to the page."""
        self.ws, self.stub, self.cfg, self.metrics, self.auth, self.internal = ws, stub, cfg, metrics, auth, internal
        self.window = cfg.server.web_frames_in_flight
        self.stream: PageStream | None = None
        self._streams = 0
        self._send_lock = asyncio.Lock()

    async def run(self) -> None:
        """Serve the page until its socket closes; its stream (if any) is cancelled on the way out."""
        server, gen = self.cfg.server, self.cfg.generation
        await self._send({"type": "hello", "auth": self.auth, "fps": server.default_fps, "max_fps": server.max_fps,
                          "steps": gen.sampler.num_steps, "max_steps": MAX_STEPS, "width": gen.width,
                          "height": gen.height, "budget_ms": server.default_latency_budget_ms,
                          "max_prompt_bytes": server.max_prompt_bytes, "server_ms": time.time() * 1e3})
        try:
            async for msg in self.ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await self._on_camera_frame(msg.data)
        finally:
            await self._stop()

    async def close(self) -> None:
        await self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    # -- messages from the page ------------------------------------------------------------------------------

    async def _on_text(self, text: str) -> None:
        try:
            try:
                message = json.loads(text)
            except ValueError:
                raise BadMessage("the message is not JSON") from None
            if not isinstance(message, dict):
                raise BadMessage("a message is a JSON object with a type")
            handler = {"start": self._start, "stop": self._on_stop, "control": self._control, "ack": self._ack,
                       "ping": self._ping}.get(message.get("type"))
            if handler is None:
                raise BadMessage(f"type: unknown message type {str(message.get('type'))[:40]!r}")
            await handler(message)
        except (BadMessage, RequestError) as err:
            self.metrics.web_bad_messages.inc()
            await self._send({"type": "error", "message": str(err) if isinstance(err, BadMessage) else err.message})

    async def _start(self, m: dict) -> None:
        """Start a stream (a running one is replaced, once the new settings have passed the server's checks)."""
        mode = m.get("mode", "text")
        if mode not in ("text", "camera"):
            raise BadMessage("mode: text or camera")
        kw = dict(prompt=_string(m, "prompt"), seed=_integer(m, "seed", 0, 2**64 - 1), fps=_number(m, "fps"),
                  steps=_integer(m, "steps", 0, MAX_STEPS), late_policy=stream_pb2.DELIVER_FLAGGED,
                  encoding=stream_pb2.JPEG, latency_budget_ms=_integer(m, "latency_budget_ms", 0, 3_600_000))
        server, gen = self.cfg.server, self.cfg.generation
        if mode == "text":
            request = stream_pb2.GenerateRequest(**kw)
            validate(request, server, gen)  # the server's own checks: a bad start leaves a running stream alone
        else:
            config = stream_pb2.TransformConfig(**kw)
            validate_transform(config, server, gen)
        metadata = self._metadata(m.get("token"))
        await self._stop()
        self._streams += 1
        if mode == "text":
            stream = PageStream(self._streams, mode, self.stub.Generate(request, metadata=metadata), metadata, None)
        else:
            inputs = CameraInput(config, self.metrics)
            call = ServerStatusCall(self.stub.Transform(inputs.requests(), metadata=metadata))
            stream = PageStream(self._streams, mode, call, metadata, inputs)
        self.stream = stream
        stream.tasks = [asyncio.create_task(self._pump(stream)), asyncio.create_task(self._forward(stream))]
        await self._send({"type": "starting", "mode": mode, "stream": stream.number})

    def _metadata(self, token) -> tuple:
        """The page's token as the call's bearer token; the guard decides (none, on a server with tokens, is
        refused there, UNAUTHENTICATED, like any gRPC call without one)."""
        if token in (None, ""):
            return ()
        if not isinstance(token, str) or not TOKEN.fullmatch(token):
            raise BadMessage("token: printable ASCII without spaces")
        return (("authorization", f"Bearer {token}"),)

    async def _on_stop(self, m: dict) -> None:
        if await self._stop():
            await self._send({"type": "ended", "code": "CANCELLED", "message": "stopped"})

    async def _control(self, m: dict) -> None:
        stream = self.stream
        if stream is None:
            raise BadMessage("no stream is running")
        prompt = validate_prompt(_string(m, "prompt"), self.cfg.server) if "prompt" in m else None
        steps = validate_steps(_integer(m, "steps", 1, MAX_STEPS)) if "steps" in m else None
        unknown = set(m) - {"type", "prompt", "steps"}
        if unknown:
            raise BadMessage(f"control: {sorted(unknown)[0][:40]!r} cannot change mid-stream (Start again with it)")
        if prompt is None and steps is None:
            raise BadMessage("control: give a prompt or steps")
        if stream.mode == "camera":  # in band, after the frames already sent
            stream.revision += prompt is not None
            stream.inputs.control(stream_pb2.TransformControl(prompt=prompt, steps=steps))
            await self._send({"type": "revision", "revision": stream.revision})
            return
        if not stream.stream_id:
            raise BadMessage("the stream has no frame yet: change the prompt once it shows")
        request = stream_pb2.ControlRequest(stream_id=stream.stream_id, prompt=prompt, steps=steps)
        try:
            reply = await self.stub.Control(request, metadata=stream.metadata, timeout=CONTROL_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            raise BadMessage(self._message(err)) from None
        await self._send({"type": "revision", "revision": reply.prompt_revision})

    async def _ack(self, m: dict) -> None:
        """The page has shown frames up to ``seq`` of stream ``stream``: room for more."""
        stream = self.stream
        if stream is not None and m.get("stream") == stream.number:
            stream.acked = max(stream.acked, min(_integer(m, "seq", 0, 2**53), stream.sent))
            stream.wake.set()

    async def _ping(self, m: dict) -> None:
        """For the page's clock offset (text-to-video latency compares the server's due times with its own)."""
        await self._send({"type": "pong", "t": _number(m, "t"), "server_ms": time.time() * 1e3})

    async def _on_camera_frame(self, data: bytes) -> None:
        stream = self.stream
        if stream is None or stream.inputs is None:
            return  # a frame still in flight after a stop: nothing to do with it
        if len(data) <= INPUT_HEADER.size:
            self.metrics.web_bad_messages.inc()
            await self._send({"type": "error", "message": "a camera frame is a header and a JPEG"})
            return
        capture_ms, width, height = INPUT_HEADER.unpack_from(data)
        capture_ns = int(capture_ms * 1e6) if math.isfinite(capture_ms) and 0 < capture_ms < 1e14 else 0
        inputs = stream.inputs
        inputs.frame(stream_pb2.InputFrame(index=inputs.next_index, data=data[INPUT_HEADER.size:],
                                           encoding=stream_pb2.JPEG, width=width, height=height,
                                           capture_unix_ns=capture_ns))
        inputs.next_index += 1

    # -- the stream ------------------------------------------------------------------------------------------

    async def _pump(self, stream: PageStream) -> None:
        """Frames from the call into the page's one waiting slot; at the end, the status goes to the page."""
        code, message = "OK", "the stream ended"
        try:
            async for frame in stream.call:
                if not stream.stream_id:
                    stream.stream_id = frame.stream_id
                    await self._send({"type": "started", "stream_id": frame.stream_id, "stream": stream.number})
                if stream.pending is not None:
                    stream.dropped += 1
                    self.metrics.web_frames.labels("dropped").inc()
                stream.pending = frame
                stream.wake.set()
        except grpc.aio.AioRpcError as err:
            code, message = err.code().name, self._message(err)
        if self.stream is stream:  # ended by the server, not by the page: forget it and say why
            self.stream = None
            stream.tasks[1].cancel()
            await self._send({"type": "ended", "code": code, "message": message, "stream": stream.number})

    async def _forward(self, stream: PageStream) -> None:
        """Send the waiting frame whenever the page has room (fewer than ``window`` unacknowledged)."""
        while True:
            await stream.wake.wait()
            stream.wake.clear()
            while stream.pending is not None and stream.sent - stream.acked < self.window:
                frame, stream.pending = stream.pending, None
                stream.sent += 1
                header = json.dumps({
                    "stream": stream.number, "seq": stream.sent, "index": frame.index,
                    "revision": frame.prompt_revision, "met": frame.deadline_met, "due_ms": frame.due_unix_ns / 1e6,
                    "capture_ms": frame.capture_unix_ns / 1e6, "input_index": frame.input_index,
                    "dropped": stream.dropped, "width": frame.width, "height": frame.height}).encode()
                await self._send_bytes(FRAME_HEADER.pack(len(header)) + header + frame.data)
                self.metrics.web_frames.labels("sent").inc()

    async def _stop(self) -> bool:
        """Cancel the running stream (the server ends it CLIENT_CANCEL and frees it). Whether one ran."""
        stream, self.stream = self.stream, None
        if stream is None:
            return False
        stream.call.cancel()
        for task in stream.tasks:
            task.cancel()
        await asyncio.gather(*stream.tasks, return_exceptions=True)
        return True

    # -- to the page ---------------------------------------------------------------------------------------

    def _message(self, err: grpc.aio.AioRpcError) -> str:
        """The status as the page shows it: the server's own plain text, unless the channel made it up."""
        details = err.details() or ""
        if self.internal in details or "unix:" in details:
            return GENERIC.get(err.code(), "the call failed")
        return details or err.code().name.lower().replace("_", " ")

    async def _send(self, message: dict) -> None:
        if self.ws.closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_str(json.dumps(message))
            except ConnectionError:  # the page went away; run() ends with the socket
                pass

    async def _send_bytes(self, data: bytes) -> None:
        if self.ws.closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_bytes(data)
            except ConnectionError:
                pass


def _string(m: dict, key: str) -> str:
    value = m.get(key, "")
    if not isinstance(value, str):
        raise BadMessage(f"{key}: must be a string")
    return value


def _number(m: dict, key: str) -> float:
    value = m.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadMessage(f"{key}: must be a number")
    return float(value)


def _integer(m: dict, key: str, low: int, high: int) -> int:
    value = m.get(key, low)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadMessage(f"{key}: must be a whole number in [{low}, {high}]")
    return value
