"""Workarounds for library versions, each with its reason and when to remove it.

Only code that depends on a library's private behaviour, or works around its bugs, goes here, so there is one
place to look when upgrading Ray or grpcio.
"""

from __future__ import annotations

import asyncio
import os

import grpc


def loopback_serve_replica_grpc() -> None:
    """Bind a Ray Serve replica's inter-deployment gRPC server to 127.0.0.1 on a loopback-only Ray.

    Why: Ray 2.60's ``Replica._on_initialized`` (``ray/serve/_private/replica.py``) calls
    ``add_port_to_grpc_server(self._server, "[::]:0")`` with the address hard-coded: no ``serve.start``,
    ``http_options``/``grpc_options`` field, deployment option or ``RAY_SERVE_*`` variable changes it, so
    every Serve replica listens on every interface. On streamgen's own local Ray (bound to loopback:
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, inherited by replica processes) nothing off this machine may
    reach it, so the name that module imported is wrapped to bind 127.0.0.1 instead. On a real cluster
    (variable unset) nothing changes: other nodes must reach the replicas.

    Called by the deployment's constructor, which Serve runs before ``_on_initialized`` opens the port.
    Remove when Ray Serve lets the replica's gRPC bind address be configured (check each Ray upgrade:
    ``grep -n '"\\[::\\]:0"' ray/serve/_private/replica.py``).
    """
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    from ray.serve._private import replica as serve_replica

    bind = serve_replica.add_port_to_grpc_server
    if getattr(bind, "streamgen_loopback", False):
        return

    def loopback(server, address: str):
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    loopback.streamgen_loopback = True
    serve_replica.add_port_to_grpc_server = loopback


_MASKED_DETAILS = "Internal error from Core"
SERVER_STATUS_WAIT_S = 5.0  # the server's status lands a few event-loop turns after the masked one


def masks_server_status(status: tuple) -> bool:
    """Whether a grpc.aio call's status (code, details, trailing metadata, debug string) is the INTERNAL one
    grpc.aio sets itself when a client write fails as the call ends (see ``ServerStatusCall``), not one the
    server sent."""
    code, details, _, debug = status
    return code == grpc.StatusCode.INTERNAL and details == _MASKED_DETAILS and "SendMessageOperation" in (debug or "")


async def _read_status(call) -> tuple:
    return await call.code(), await call.details(), await call.trailing_metadata(), await call.debug_error_string()


def settled_status(call) -> tuple | None:
    """A finished grpc.aio call's status (code, details, trailing metadata, debug string), read at once, e.g.
    in a done callback: its status coroutines return without suspending then. None if they would suspend (a
    grpcio that changed that)."""
    coro = _read_status(call)
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    return None


class ServerStatusCall:
    """A grpc.aio stream-stream call whose end reports the status the server sent, also when a client write
    races that end.

    Why: grpcio's ``_StreamRequestMixin._write`` (1.85 here) calls ``set_internal_error`` when a write fails
    because the server has just ended the call. That overwrites the server's status (or comes first), so the
    response iterator raises INTERNAL "Internal error from Core" (debug string ``Failed "execute_batch":
    (SendMessageOperation,)``) and the server's code, details and trailers are lost: grpc/grpc#36066, fix
    proposed in grpc/grpc#43486. A live video-to-video client writes until the server ends the stream, so
    this hits it (measured: 73 of 200 ends with the writer unpaced; 1 CI run with a 16 fps writer).

    How: a done callback added at the start reads each status the call settles with, at once. grpcio's status
    task (``_handle_status_once_received``) still sets the server's status after the masked one, since a
    finished call is never cancelled locally, so the callback runs again then. Whoever reads a masked status
    waits for the server's, up to ``SERVER_STATUS_WAIT_S`` (a CI run read the masked status before the
    server's had landed: 1 of 200 ends). Remove when grpcio ships #43486's fix:
    ``tests/unit/orchestrator/test_client.py::test_a_write_racing_the_servers_end_reports_the_servers_status``
    then passes with ``StreamgenClient.transform`` returning the bare call.
    """

    def __init__(self, call):
        self._call = call
        self._server = None  # (code, details, trailing metadata, debug string) the server sent, once settled
        self._server_settled = asyncio.Event()
        call.add_done_callback(self._on_done)

    def _on_done(self, call) -> None:  # runs once per status grpcio sets: the masked one, the server's
        status = settled_status(call)
        if status is not None and not masks_server_status(status) and self._server is None:
            self._server = status
            self._server_settled.set()

    async def _status(self) -> tuple:
        now = await _read_status(self._call)
        if not masks_server_status(now):
            return now
        try:
            await asyncio.wait_for(self._server_settled.wait(), SERVER_STATUS_WAIT_S)
        except TimeoutError:
            return now  # no status came after the masked one: report what grpcio has
        return self._server

    async def _responses(self):
        try:
            async for response in self._call:
                yield response
        except grpc.aio.AioRpcError as err:
            if not masks_server_status((err.code(), err.details(), None, err.debug_error_string())):
                raise
            code, details, trailers, debug = await self._status()
            if code == grpc.StatusCode.OK:
                return
            raise grpc.aio.AioRpcError(code, err.initial_metadata(), trailers, details, debug) from None

    def __aiter__(self):
        return self._responses()

    async def code(self) -> grpc.StatusCode:
        return (await self._status())[0]

    async def details(self) -> str:
        return (await self._status())[1]

    async def trailing_metadata(self):
        return (await self._status())[2]

    async def debug_error_string(self) -> str:
        return (await self._status())[3]

    def __getattr__(self, name):  # cancel, done, cancelled, write, done_writing, initial_metadata, ...
        return getattr(self._call, name)
