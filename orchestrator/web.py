"""The browser page (``server.web_listen``, ``streamgen serve --web-listen``): one HTML page with its script and
style (package data in ``orchestrator/static``: no build step, no CDN), and one WebSocket per open page.

The page is not a second pipeline. Each page's WebSocket (``orchestrator/web_session.py``) is a gRPC client of
this very server, over a unix socket the server also listens on (in a directory only this user can enter), and
sends the page's token as its bearer token: the guard, tenants, admission, quotas, pacing, deadlines, metrics
and stream ids are those of every gRPC call, because these are gRPC calls.

    browser --HTTP(S)--> WebServer: GET / and /static/*; GET /ws upgrades to the page's WebSocket
    PageSession --unix socket, gRPC--> StreamService (Generate / Transform / Control), as any client

Security: the endpoint binds loopback unless TLS is configured (the gRPC server's certificate and key, and its
client CA for mutual TLS; config.py refuses the rest). A WebSocket must come from this page's own origin (no
other site can drive it from a visitor's browser), and on a loopback bind the Host must be a loopback name (a
DNS-rebinding page cannot reach it either). Every response forbids framing and scripts from elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import tempfile
from importlib import resources
from urllib.parse import urlsplit

import grpc
from aiohttp import web

from orchestrator.auth import Security
from orchestrator.config import LOOPBACK_HOSTS, ServiceConfig, is_loopback, message_limits
from orchestrator.metrics import Metrics
from orchestrator.web_session import PageSession
from protos.streamgen.v1 import stream_pb2_grpc

log = logging.getLogger("streamgen.web")

ASSETS = {"index.html": "text/html", "page.js": "text/javascript", "page.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
HEARTBEAT_S = 10.0  # a page that vanished without closing its socket is noticed within about twice this
TLS_CHECK_S = 2.0  # how often the certificate files are checked for a rotation (one stat each)


class WebServer:
    def __init__(self, cfg: ServiceConfig, metrics: Metrics, security: Security):
        self.cfg, self.metrics, self.security = cfg, metrics, security
        self._dir = tempfile.mkdtemp(prefix="streamgen-web-")  # mode 0700: other users cannot reach the socket
        self.internal_target = f"unix:{self._dir}/grpc.sock"
        """What the gRPC server also listens on (start_server's ``internal_listen``)."""
        self.port: int | None = None
        self.scheme = "https" if cfg.server.tls_cert else "http"
        self.pages: set[PageSession] = set()
        self._assets = {name: resources.files("orchestrator").joinpath("static", name).read_bytes()
                        for name in ASSETS}
        self._runner: web.AppRunner | None = None
        self._reload: asyncio.Task | None = None
        self._current_tls: ssl.SSLContext | None = None  # what a new connection's handshake uses
        self._channel: grpc.aio.Channel | None = None
        self._loopback = is_loopback(cfg.server.web_listen)

    @property
    def address(self) -> str:
        """The page's URL (with the bound port)."""
        host = self.cfg.server.web_listen.rpartition(":")[0]
        return f"{self.scheme}://{host}:{self.port}/"

    async def start(self) -> "WebServer":
        _, send = message_limits(self.cfg)
        self._channel = grpc.aio.insecure_channel(self.internal_target,
                                                  options=[("grpc.max_receive_message_length", send)])
        self.stub = stream_pb2_grpc.StreamServiceStub(self._channel)
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/ws", self._socket)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        host, _, port = self.cfg.server.web_listen.rpartition(":")
        context = self._current_tls = self._tls()
        if context is not None:
            context.sni_callback = self._handshake  # called for every ClientHello, SNI or not
        site = web.TCPSite(self._runner, host.strip("[]"), int(port), ssl_context=context)
        await site.start()
        if context is not None:
            self._reload = asyncio.create_task(self._reload_tls())
        self.port = self._runner.addresses[0][1]
        log.info("browser page on %s", self.address)
        return self

    def _tls(self) -> ssl.SSLContext | None:
        """The gRPC server's certificate and key (and client CA: mutual TLS), read now."""
        server = self.cfg.server
        if not server.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(server.tls_cert, server.tls_key)
        if server.tls_client_ca:
            context.load_verify_locations(server.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _tls_files(self) -> tuple:
        """The certificate files' identities (inode, size, mtime), as orchestrator/tls.py compares them."""
        stamps = []
        for path in (self.cfg.server.tls_cert, self.cfg.server.tls_key, self.cfg.server.tls_client_ca):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            stamps.append(st and (st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def _handshake(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        """Each new connection takes the context loaded last: a whole new one per rotation, because a context's
        trust store only grows (loading a rotated client CA into it would keep trusting the old one)."""
        if self._current_tls is not context:
            connection.context = self._current_tls

    async def _reload_tls(self) -> None:
        """Rotated files become a new context for new handshakes (open pages keep theirs), as the gRPC port
        reloads its own; files that do not load keep the current certificate in service."""
        stamp = self._tls_files()
        while True:
            await asyncio.sleep(TLS_CHECK_S)
            now = self._tls_files()
            if now == stamp:
                continue
            try:
                self._current_tls = self._tls()
            except (OSError, ssl.SSLError):
                log.warning("the page's TLS files changed but cannot be used yet; keeping the current certificate")
                continue
            stamp = now
            log.info("the page's TLS certificate reloaded")

    async def stop(self) -> None:
        """Close every page (its stream is cancelled: the server frees it), then the endpoint and the channel."""
        if self._reload is not None:
            self._reload.cancel()
            self._reload = None
        await asyncio.gather(*(page.close() for page in list(self.pages)), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- HTTP ----------------------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if self._loopback and (request.url.host or "").strip("[]") not in LOOPBACK_HOSTS:
            raise web.HTTPForbidden(text="this page is served to loopback names only")
        response = await handler(request)
        if not response.prepared:  # a WebSocket's headers went out with its upgrade
            response.headers.update(HEADERS)
        return response

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._assets["index.html"], content_type=ASSETS["index.html"], charset="utf-8")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS or name == "index.html":
            raise web.HTTPNotFound()
        return web.Response(body=self._assets[name], content_type=ASSETS[name], charset="utf-8")

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            raise web.HTTPForbidden(text="a WebSocket from another site's page is refused")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, compress=False,
                                   max_msg_size=self.cfg.server.max_receive_message_bytes)
        await ws.prepare(request)
        page = PageSession(ws, self.stub, self.cfg, self.metrics, auth=self.security.tokens is not None,
                           internal=self.internal_target)
        self.pages.add(page)
        self.metrics.web_pages.inc()
        try:
            await page.run()
        finally:
            self.pages.discard(page)
            self.metrics.web_pages.dec()
        return ws
