"""Async Python client for streamgen's gRPC API, plus the per-stream summary the CLI prints.

``Connection`` is how any client reaches a server (target, TLS trust, client certificate, bearer token);
``Connection.channel()`` opens a grpc.aio channel that sends the token on every call of every RPC.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from orchestrator._compat import ServerStatusCall
from orchestrator.config import is_loopback
from protos.streamgen.v1 import stream_pb2, stream_pb2_grpc


@dataclass(frozen=True)
class Connection:
    """Where a server is and how to reach it. TLS is on when ``tls_ca`` (or a client certificate) is
    given; a token is sent as ``authorization: Bearer``, and never in plaintext beyond loopback."""

    target: str
    """HOST:PORT of the server."""
    tls_ca: str | None = None
    """PEM CA bundle that signed the server's certificate (None with a client certificate: system roots)."""
    tls_cert: str | None = None
    """PEM client certificate for mutual TLS (with tls_key)."""
    tls_key: str | None = None
    """PEM private key of tls_cert."""
    token: str | None = None
    """Bearer token (the server's tokens file holds its SHA-256)."""

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.token and not self.secure and not is_loopback(self.target):
            raise ValueError(f"a token is not sent in plaintext to {self.target}: give --tls-ca")

    @property
    def secure(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None, flag: str) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as err:
                raise ValueError(f"{flag}: cannot read {path}: {err.strerror}") from None

        return grpc.ssl_channel_credentials(read(self.tls_ca, "--tls-ca"), read(self.tls_key, "--tls-key"),
                                            read(self.tls_cert, "--tls-cert"))

    def channel(self, options: list[tuple[str, object]] | None = None) -> grpc.aio.Channel:
        interceptors = bearer_token_interceptors(self.token) if self.token else None
        if self.secure:
            return grpc.aio.secure_channel(self.target, self.credentials(), options, interceptors=interceptors)
        return grpc.aio.insecure_channel(self.target, options, interceptors=interceptors)


class _BearerToken:
    """Adds ``authorization: Bearer <token>`` to a call's metadata."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


class _TokenUnaryUnary(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._with_token(details), request)


class _TokenUnaryStream(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._with_token(details), request)


class _TokenStreamUnary(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._with_token(details), request_iterator)


class _TokenStreamStream(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._with_token(details), request_iterator)


def bearer_token_interceptors(token: str) -> list:
    """The token on every call, whatever its cardinality. One object per kind: a grpc.aio channel files each
    interceptor under the first kind it is an instance of, so one object of all four would see unary calls only."""
    return [cls(token) for cls in (_TokenUnaryUnary, _TokenUnaryStream, _TokenStreamUnary, _TokenStreamStream)]


class StreamgenClient:
    def __init__(self, target: str | Connection, max_message_bytes: int = 64 * 1024 * 1024):
        connection = target if isinstance(target, Connection) else Connection(target)
        self.channel = connection.channel([("grpc.max_receive_message_length", max_message_bytes)])
        self.stub = stream_pb2_grpc.StreamServiceStub(self.channel)

    async def __aenter__(self) -> "StreamgenClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def generate(self, prompt: str, seed: int = 0, fps: float = 16.0, steps: int = 0, max_frames: int = 0,
                 latency_budget_ms: int = 0, late_policy: str = "drop", encoding: str = "jpeg",
                 width: int = 0, height: int = 0, jpeg_quality: int = 0, timeout: float | None = None):
        """Start a text-to-video stream; iterate the returned call for Frames (``call.cancel()`` ends it)."""
        request = stream_pb2.GenerateRequest(
            prompt=prompt, seed=seed, fps=fps, steps=steps, max_frames=max_frames,
            latency_budget_ms=latency_budget_ms, width=width, height=height, jpeg_quality=jpeg_quality,
            late_policy=stream_pb2.DELIVER_FLAGGED if late_policy == "deliver_flagged" else stream_pb2.DROP,
            encoding=stream_pb2.RAW_RGB if encoding == "raw_rgb" else stream_pb2.JPEG)
        return self.stub.Generate(request, timeout=timeout)

    def transform(self, frames, prompt: str, fps: float, seed: int = 0, steps: int = 0, latency_budget_ms: int = 0,
                  late_policy: str = "drop", encoding: str = "jpeg", noise_scale: float = 0.0,
                  motion_aware: bool = True, similarity_threshold: float = 0.0, idle_timeout_ms: int = 0,
                  input_encoding: str = "jpeg", input_fps: float | None = None, controls=None,
                  timeout: float | None = None):
        """Start a video-to-video stream; iterate the returned call for restyled Frames (``call.cancel()`` ends
        it). ``frames``: an iterable (or async iterable) of uint8 RGB frames [H, W, 3] or (frame,
        capture_unix_ns) pairs, sent as ``input_encoding`` and, with ``input_fps``, paced at that rate (a live
        source); the request stream half-closes after the last. The call ends with the server's status even
        when a write races that end (``_compat.ServerStatusCall``). ``controls``: an optional asyncio.Queue of
        ``TransformControl`` kwargs dicts sent as they come (None ends the controls)."""
        config = stream_pb2.TransformConfig(
            prompt=prompt, seed=seed, fps=fps, steps=steps, latency_budget_ms=latency_budget_ms,
            late_policy=stream_pb2.DELIVER_FLAGGED if late_policy == "deliver_flagged" else stream_pb2.DROP,
            encoding=stream_pb2.RAW_RGB if encoding == "raw_rgb" else stream_pb2.JPEG, noise_scale=noise_scale,
            motion_aware=motion_aware, similarity_threshold=similarity_threshold, idle_timeout_ms=idle_timeout_ms)
        return ServerStatusCall(self.stub.Transform(
            _transform_requests(config, frames, input_encoding, input_fps, controls), timeout=timeout))

    async def control(self, stream_id: str, prompt: str | None = None, steps: int | None = None,
                      paused: bool | None = None, cancel: bool = False) -> stream_pb2.ControlReply:
        req = stream_pb2.ControlRequest(stream_id=stream_id, cancel=cancel)
        if prompt is not None:
            req.prompt = prompt
        if steps is not None:
            req.steps = steps
        if paused is not None:
            req.paused = paused
        return await self.stub.Control(req)

    async def capacity(self, fps: float = 0.0, steps: int = 0, video: bool = False) -> stream_pb2.CapacityReply:
        """Streams the fleet admits at ``fps`` / ``steps`` (0: the server's defaults), for video-to-video
        streams with ``video``."""
        return await self.stub.GetCapacity(stream_pb2.CapacityRequest(fps=fps, steps=steps, video=video))

    async def drain(self, timeout_ms: int = 0) -> stream_pb2.DrainReply:
        return await self.stub.Drain(stream_pb2.DrainRequest(timeout_ms=timeout_ms))


async def _transform_requests(config, frames, input_encoding: str, input_fps: float | None, controls):
    """The Transform request stream: the config, then each input frame (paced at ``input_fps``) and control."""
    import asyncio

    yield stream_pb2.TransformRequest(config=config)
    if controls is not None:
        pending = asyncio.ensure_future(controls.get())
    start = time.monotonic()
    items = frames if hasattr(frames, "__aiter__") else _aiter(frames)
    index = 0
    async for item in items:
        image, capture_ns = item if isinstance(item, tuple) else (item, time.time_ns())
        if input_fps:
            delay = start + index / input_fps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            capture_ns = time.time_ns()  # a live source: captured as it is sent
        while controls is not None and pending is not None and pending.done():
            kw = pending.result()
            pending = None if kw is None else asyncio.ensure_future(controls.get())
            if kw is not None:
                yield stream_pb2.TransformRequest(control=stream_pb2.TransformControl(**kw))
        yield stream_pb2.TransformRequest(frame=encode_input(image, index, capture_ns, input_encoding))
        index += 1
    if controls is not None and pending is not None:
        pending.cancel()


async def _aiter(iterable):
    for item in iterable:
        yield item


def encode_input(image: np.ndarray, index: int, capture_unix_ns: int, encoding: str = "jpeg",
                 quality: int = 90) -> stream_pb2.InputFrame:
    """An uint8 RGB frame [H, W, 3] as an InputFrame (JPEG or raw RGB)."""
    h, w = image.shape[:2]
    if encoding == "raw_rgb":
        data, enc = np.ascontiguousarray(image, dtype=np.uint8).tobytes(), stream_pb2.RAW_RGB
    else:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
        data, enc = buf.getvalue(), stream_pb2.JPEG
    return stream_pb2.InputFrame(index=index, data=data, encoding=enc, width=w, height=h,
                                 capture_unix_ns=capture_unix_ns)


def decode_frame(frame: stream_pb2.Frame) -> np.ndarray:
    """A Frame's pixels as uint8 [H, W, 3]."""
    if frame.encoding == stream_pb2.RAW_RGB:
        return np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.height, frame.width, 3)
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(frame.data)).convert("RGB"))


@dataclass
class StreamSummary:
    """What a client saw of one stream."""

    started: float = field(default_factory=time.monotonic)
    received: list[float] = field(default_factory=list)  # monotonic receive times
    lateness_s: list[float] = field(default_factory=list)  # receive (wall) - due (wall)
    indices: list[int] = field(default_factory=list)
    missed: int = 0  # frames sent flagged late
    revisions: list[int] = field(default_factory=list)

    def add(self, frame: stream_pb2.Frame) -> None:
        self.received.append(time.monotonic())
        self.lateness_s.append((time.time_ns() - frame.due_unix_ns) / 1e9)
        self.indices.append(frame.index)
        self.revisions.append(frame.prompt_revision)
        if not frame.deadline_met:
            self.missed += 1

    @property
    def frames(self) -> int:
        return len(self.received)

    @property
    def ttff_s(self) -> float:
        return self.received[0] - self.started if self.received else float("nan")

    @property
    def achieved_fps(self) -> float:
        if len(self.received) < 2:
            return float("nan")
        return (len(self.received) - 1) / (self.received[-1] - self.received[0])

    def latency_percentile(self, q: float) -> float:
        if not self.lateness_s:
            return float("nan")
        v = sorted(self.lateness_s)
        return v[min(len(v) - 1, round(q / 100 * (len(v) - 1)))]

    def report(self) -> str:
        return (f"frames {self.frames}, achieved {self.achieved_fps:.2f} fps, TTFF {self.ttff_s * 1e3:.0f} ms, "
                f"latency vs due p50 {self.latency_percentile(50) * 1e3:.1f} ms / "
                f"p99 {self.latency_percentile(99) * 1e3:.1f} ms, deadline misses {self.missed}")

