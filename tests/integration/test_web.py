"""The browser page's endpoint without a browser (an aiohttp client speaks the page's protocol): it serves its files
with their headers, it is the same service as gRPC (ids, admission, control, metrics), a bad message is answered
and the stream goes on, a page that stops acknowledging gets the latest frame rather than a backlog, tokens are
the guard's, and the endpoint keeps to loopback or TLS and to its own origin."""

import asyncio
import io
import json
import ssl
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from PIL import Image

from orchestrator.config import ServerConfig
from protos.streamgen.v1 import stream_pb2
from tests.secured import bearer, request, start, stub, write_tokens
from tests.tls_certs import CA
from tests.web_helpers import FPS, wait_for, web_config


@pytest.fixture(scope="module")
def server():
    running = start(web_config(max_streams_per_replica=2))
    try:
        yield running
    finally:
        running.stop()


def frame_of(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:4], "little")
    return json.loads(data[4:4 + n]), data[4 + n:]


class Socket:
    """The page's WebSocket, from a test: JSON messages one way and the other, frames split from their header."""

    def __init__(self, ws):
        self.ws, self.texts, self.frames = ws, [], []

    async def send(self, **message):
        await self.ws.send_str(json.dumps(message))

    async def next(self, kind: str | None = None, timeout: float = 15.0, ack: bool = True):
        """The next text message (of ``kind``), keeping (and acknowledging) the frames that come before it."""
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive(timeout=max(0.01, deadline - time.monotonic()))
            if msg.type == aiohttp.WSMsgType.BINARY:
                header, jpeg = frame_of(msg.data)
                self.frames.append((time.time() * 1e3, header, jpeg))
                if ack:
                    await self.send(type="ack", stream=header["stream"], seq=header["seq"])
                continue
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            message = json.loads(msg.data)
            self.texts.append(message)
            if kind is None or message["type"] == kind:
                return message

    async def frames_for(self, seconds: float, ack: bool = True) -> list:
        start = len(self.frames)
        try:
            await self.next("never", timeout=seconds, ack=ack)
        except asyncio.TimeoutError:
            pass
        return self.frames[start:]


async def page(address: str, run, **headers):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(address + "ws", headers=headers) as ws:
            socket = Socket(ws)
            hello = await socket.next("hello")
            return await run(socket, hello)


def test_the_page_and_its_files_are_served_with_their_headers(server):
    address = server.service.web.address

    async def fetch():
        async with aiohttp.ClientSession() as session:
            got = {}
            for path in ("", "static/page.js", "static/page.css", "static/../config.py", "static/nope.js"):
                async with session.get(address + path) as r:
                    got[path] = (r.status, r.content_type, await r.read(), r.headers)
            async with session.get(address, headers={"Host": "rebound.example:80"}) as r:
                got["rebound"] = r.status
            async with session.get(address + "ws", headers={"Origin": "http://evil.example"}) as r:
                got["foreign"] = r.status
            return got

    got = asyncio.run(fetch())
    status, kind, body, headers = got[""]
    assert status == 200 and kind == "text/html" and b'src="/static/page.js"' in body
    assert b"http://" not in body and b"https://" not in body  # nothing from elsewhere: no CDN
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"]
    assert got["static/page.js"][:2] == (200, "text/javascript") and b"new WebSocket" in got["static/page.js"][2]
    assert got["static/page.css"][:2] == (200, "text/css")
    assert got["static/../config.py"][0] == 404 and got["static/nope.js"][0] == 404
    assert got["rebound"] == 403  # a DNS-rebinding page: its Host is not a loopback name
    assert got["foreign"] == 403  # another site's script cannot open the socket from a visitor's browser


def test_the_page_is_a_client_of_the_same_service(server):
    """Its stream has a server stream id, obeys a gRPC Control, counts in the same admission and metrics."""
    service = server.service
    starts = service.metrics.stream_starts.labels("admitted")._value.get()
    socket_dir = Path(service.web.internal_target.removeprefix("unix:")).parent
    assert socket_dir.stat().st_mode & 0o777 == 0o700  # only this user reaches the internal socket

    async def run(socket, hello):
        assert hello["auth"] is False and hello["max_fps"] == 60.0 and hello["width"] == 96
        await socket.send(type="start", prompt="a red fox", fps=FPS, seed=3)
        assert (await socket.next("starting"))["mode"] == "text"
        stream_id = (await socket.next("started"))["stream_id"]
        assert list(service.servicer.streams) == [stream_id]
        assert service.metrics.stream_starts.labels("admitted")._value.get() == starts + 1
        # the same id space: a gRPC client changes the page's stream by its id
        loop = asyncio.get_running_loop()
        with grpc.insecure_channel(server.target) as channel:
            reply = await loop.run_in_executor(None, lambda: stub(channel).Control(
                stream_pb2.ControlRequest(stream_id=stream_id, prompt="a grey wolf"), timeout=5))
            assert reply.prompt_revision == 1
            await socket.frames_for(2.0)
            assert socket.frames[-1][1]["revision"] == 1
            # the same admission: a gRPC stream takes the last slot (cap 2), then a second page is refused
            call = stub(channel).Generate(request(fps=FPS), timeout=30)
            await loop.run_in_executor(None, lambda: next(call))

            async def second(other, _):
                await other.send(type="start", prompt="a second one", fps=FPS)
                return await other.next("ended")

            ended = await page(service.web.address, second)
            assert ended["code"] == "RESOURCE_EXHAUSTED" and "capacity" in ended["message"]
            assert len(service.servicer.streams) == 2 and stream_id in service.servicer.streams
            call.cancel()
        return stream_id

    stream_id = asyncio.run(page(service.web.address, run))
    assert wait_for(lambda: not service.servicer.streams, 2.0)
    replica = service.replicas[0]
    assert wait_for(lambda: replica.active() == 0 and sum(replica.cache_bytes()) == 0, 2.0)
    assert stream_id and service.metrics.web_frames.labels("sent")._value.get() > 0


def test_bad_messages_are_answered_and_the_stream_goes_on(server):
    bad = server.service.metrics.web_bad_messages

    async def run(socket, hello):
        await socket.send(type="start", prompt="a lighthouse", fps=FPS)
        stream_id = (await socket.next("started"))["stream_id"]
        before = bad._value.get()
        replies = []
        for raw in ("{not json", "[1, 2]", json.dumps({"type": "launch"}),
                    json.dumps({"type": "start", "prompt": "x", "fps": 1000}),
                    json.dumps({"type": "start", "prompt": "x", "fps": "fast"}),
                    json.dumps({"type": "start", "prompt": "x", "fps": FPS, "steps": 99}),
                    json.dumps({"type": "control", "fps": 30}), json.dumps({"type": "control", "prompt": 7}),
                    json.dumps({"type": "control", "prompt": "x" * 5000}),
                    json.dumps({"type": "start", "prompt": "x", "fps": FPS, "token": "two words"})):
            await socket.ws.send_str(raw)
            replies.append((await socket.next("error"))["message"])
        assert replies[0] == "the message is not JSON" and "JSON object" in replies[1]
        assert "unknown message type 'launch'" in replies[2]
        assert replies[3].startswith("fps: must be in [1, 60]") and replies[4] == "fps: must be a number"
        assert replies[5].startswith("steps:") and "cannot change mid-stream" in replies[6]
        assert replies[7] == "prompt: must be a string" and replies[8].startswith("prompt:")
        assert replies[9].startswith("token:")
        assert bad._value.get() == before + len(replies)
        got = await socket.frames_for(1.5)
        assert len(got) >= FPS, "frames stopped after bad messages"
        assert list(server.service.servicer.streams) == [stream_id]  # the same stream went on
        await socket.send(type="stop")
        assert (await socket.next("ended"))["code"] == "CANCELLED"

    asyncio.run(page(server.service.web.address, run))
    assert wait_for(lambda: not server.service.servicer.streams, 2.0)


def test_a_page_that_stops_acknowledging_gets_the_latest_frame_not_a_backlog(server):
    window = server.service.cfg.server.web_frames_in_flight
    dropped = server.service.metrics.web_frames.labels("dropped")

    async def run(socket, hello):
        before = dropped._value.get()
        await socket.send(type="start", prompt="a busy street", fps=FPS)
        await socket.next("started")
        await socket.frames_for(1.0)
        # a page that stalls: nothing acknowledged for 2 s, so at most `window` frames come
        stalled = await socket.frames_for(2.0, ack=False)
        assert len(stalled) <= window, len(stalled)
        last = stalled[-1][1] if stalled else socket.frames[-1][1]
        await socket.send(type="ack", stream=last["stream"], seq=last["seq"])
        resumed = await socket.frames_for(1.0)
        assert resumed, "no frame after the page caught up"
        header = resumed[0][1]
        assert header["index"] >= last["index"] + FPS  # the newest frame: the stalled seconds were skipped
        assert header["dropped"] >= FPS and dropped._value.get() >= before + FPS
        lag = [received - h["due_ms"] for received, h, _ in resumed]
        assert max(lag) < 500, lag  # no lag built up: each frame arrives near its due time
        await socket.send(type="stop")
        await socket.next("ended")

    asyncio.run(page(server.service.web.address, run))


def test_camera_frames_go_through_transform_and_come_back_with_their_capture_time(server):
    accepted = server.service.metrics.input_frames.labels("accepted")

    async def run(socket, hello):
        before = accepted._value.get()
        w, h = hello["width"], hello["height"]
        await socket.send(type="start", mode="camera", prompt="a watercolor painting", fps=FPS)
        await socket.next("starting")
        for i in range(int(3 * FPS)):
            buf = io.BytesIO()
            Image.fromarray(np.full((h, w, 3), (i * 9) % 256, np.uint8)).save(buf, format="JPEG")
            captured = time.time() * 1e3
            await socket.ws.send_bytes(np.array([captured], "<f8").tobytes() + np.array([w, h], "<u2").tobytes()
                                       + buf.getvalue())
            await socket.frames_for(1 / FPS)
        await socket.ws.send_bytes(b"short")
        assert (await socket.next("error"))["message"].startswith("a camera frame is")
        got = socket.frames
        assert len(got) >= FPS, len(got)
        assert all(0 < received - header["capture_ms"] < 4000 for received, header, _ in got)
        assert accepted._value.get() > before
        await socket.send(type="stop")
        await socket.next("ended")

    asyncio.run(page(server.service.web.address, run))
    assert wait_for(lambda: not server.service.servicer.streams, 2.0)


def test_tokens_are_checked_by_the_guard_and_the_tenant_owns_the_stream(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.yaml", {"tok-a": ("a", "client"), "tok-b": ("b", "client")})
    running = start(web_config(auth_tokens=str(tokens)))
    service = running.service
    try:
        def control(stream_id: str, token: str):
            with grpc.insecure_channel(running.target) as channel:
                try:
                    return stub(channel).Control(stream_pb2.ControlRequest(stream_id=stream_id, prompt="y"),
                                                 metadata=bearer(token), timeout=5).prompt_revision
                except grpc.RpcError as err:
                    return err.code()

        async def run(socket, hello):
            assert hello["auth"] is True
            await socket.send(type="start", prompt="x", fps=FPS)
            no_token = await socket.next("ended")
            assert not service.servicer.streams and service.replicas[0].opened == 0
            await socket.send(type="start", prompt="x", fps=FPS, token="tok-a")
            stream_id = (await socket.next("started"))["stream_id"]
            assert service.servicer.streams[stream_id].tenant == "a"
            loop = asyncio.get_running_loop()
            other = await loop.run_in_executor(None, control, stream_id, "tok-b")
            mine = await loop.run_in_executor(None, control, stream_id, "tok-a")
            return no_token, other, mine

        no_token, other, mine = asyncio.run(page(service.web.address, run))
        assert no_token["code"] == "UNAUTHENTICATED" and "bearer token" in no_token["message"]
        assert service.metrics.auth_failures.labels("missing")._value.get() == 1
        assert other == grpc.StatusCode.NOT_FOUND and mine == 1  # tenant a's stream, as for its gRPC streams
        assert wait_for(lambda: not service.servicer.streams, 2.0)  # the socket closed: the stream went with it
    finally:
        socket_dir = Path(service.web.internal_target.removeprefix("unix:")).parent
        running.stop()
    assert not socket_dir.exists()  # stopping removes the internal socket


def test_the_endpoint_binds_loopback_unless_tls_and_then_serves_https(tmp_path):
    with pytest.raises(ValueError, match="web_listen '0.0.0.0:8080' is not loopback, so it needs TLS"):
        ServerConfig(web_listen="0.0.0.0:8080")
    with pytest.raises(ValueError, match="web_listen must be HOST:PORT"):
        ServerConfig(web_listen=":8080")
    ca = CA(tmp_path, "ca")
    leaf = ca.issue("server")
    running = start(web_config(tls_cert=str(leaf.cert), tls_key=str(leaf.key)))
    try:
        address = running.service.web.address
        assert address.startswith("https://127.0.0.1:")

        async def fetch():
            trust = ssl.create_default_context(cafile=str(ca.pem))
            async with aiohttp.ClientSession() as session:
                async with session.get(address, ssl=trust) as r:
                    ok = r.status
                async with session.ws_connect(address + "ws", ssl=trust) as ws:
                    hello = json.loads((await ws.receive()).data)
                with pytest.raises(aiohttp.ClientError):
                    await session.get(address.replace("https:", "http:"), ssl=False)  # no plaintext page
            return ok, hello

        ok, hello = asyncio.run(fetch())
        assert ok == 200 and hello["type"] == "hello"

        # rotation: new files renamed over the old ones are served to new connections, without a restart
        rotated = CA(tmp_path, "ca2").issue("server2")
        rotated.key.rename(leaf.key)
        rotated.cert.rename(leaf.cert)

        async def trusted_by_new_ca() -> bool:
            trust = ssl.create_default_context(cafile=str(tmp_path / "ca2.crt"))
            try:
                async with aiohttp.ClientSession() as session, session.get(address, ssl=trust) as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        assert wait_for(lambda: asyncio.run(trusted_by_new_ca()), 6.0, period=0.5)
    finally:
        running.stop()


def test_a_rotated_client_ca_replaces_the_old_one_on_the_page(tmp_path):
    """Mutual TLS on the page: once the client CA file is rotated, certificates of the new CA are let in and
    those of the old one are refused (a context's trust store only grows: each rotation is a new context)."""
    server_ca, old_ca = CA(tmp_path, "server-ca"), CA(tmp_path, "clients-old")
    leaf, client_ca_file = server_ca.issue("server"), tmp_path / "client-ca.crt"
    client_ca_file.write_bytes(old_ca.pem.read_bytes())
    old_client = old_ca.issue("old-client", server=False)
    running = start(web_config(tls_cert=str(leaf.cert), tls_key=str(leaf.key), tls_client_ca=str(client_ca_file)))
    try:
        address = running.service.web.address

        async def status(client) -> int | None:
            trust = ssl.create_default_context(cafile=str(server_ca.pem))
            trust.load_cert_chain(str(client.cert), str(client.key))
            try:
                async with aiohttp.ClientSession() as session, session.get(address, ssl=trust) as r:
                    return r.status
            except aiohttp.ClientError:
                return None

        assert asyncio.run(status(old_client)) == 200
        new_ca = CA(tmp_path, "clients-new")
        new_client = new_ca.issue("new-client", server=False)
        rotated = tmp_path / "client-ca.new"
        rotated.write_bytes(new_ca.pem.read_bytes())
        rotated.rename(client_ca_file)
        assert wait_for(lambda: asyncio.run(status(new_client)) == 200, 6.0, period=0.5)
        assert asyncio.run(status(old_client)) is None
    finally:
        running.stop()


def test_streamgen_serve_web_listen_prints_the_page_and_serves_it():
    import re
    import urllib.request

    from tests.integration.test_server import serve_process

    with serve_process("--web-listen", "127.0.0.1:0", "--backend", "local", "--model", "tiny", "--stages", "1") \
            as (proc, _, lines):
        line = proc.stdout.readline()
        m = re.search(r"browser page on (http://127\.0\.0\.1:\d+/)", line)
        assert m, "".join(lines + [line])[-2000:]
        with urllib.request.urlopen(m.group(1), timeout=10) as r:
            assert r.status == 200 and b"<title>streamgen" in r.read()
        proc.terminate()  # SIGTERM: drain, then the page and its socket go
        assert proc.wait(60) == 0
