"""A grpc.aio server on 127.0.0.1 with handlers a test writes, on its own event-loop thread (the tests' clients
are blocking)."""

from __future__ import annotations

import asyncio
import threading

import grpc


class ThreadedServer:
    def __init__(self, service: str, methods: dict[str, grpc.RpcMethodHandler], interceptors=(), setup=None):
        """``setup(server)`` may add more servicers before it starts."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = asyncio.run_coroutine_threadsafe(
            self._start(service, methods, interceptors, setup), self.loop).result(10)
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self, service, methods, interceptors, setup):
        server = grpc.aio.server(interceptors=list(interceptors))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
        if setup is not None:
            setup(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
