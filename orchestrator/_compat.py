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
SERVER_STATUS_POLL_S = 0.002


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


async def server_status(call) -> tuple:
    """A grpc.aio call's status (code, details, trailing metadata, debug string) once it is not the masked one
    (see ``ServerStatusCall``): the server's status replaces it a few event-loop turns later, with no done
    callback, so it is polled, for up to ``SERVER_STATUS_WAIT_S``. After that, the masked status is returned."""
    status = await _read_status(call)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + SERVER_STATUS_WAIT_S
    while masks_server_status(status) and loop.time() < give_up:
        await asyncio.sleep(SERVER_STATUS_POLL_S)
        status = await _read_status(call)
    return status


class ServerStatusCall:
    """A grpc.aio stream-stream call whose end reports the status the server sent, also when a client write
    races that end.

    Why: grpcio's ``_StreamRequestMixin._write`` (1.85 here) calls ``set_internal_error`` when a write fails
    because the server has just ended the call. That overwrites the server's status (or comes first), so the
    response iterator raises INTERNAL "Internal error from Core" (debug string ``Failed "execute_batch":
    (SendMessageOperation,)``) and the server's code, details and trailers are lost: grpc/grpc#36066, fix
    proposed in grpc/grpc#43486. A live video-to-video client writes until the server ends the stream, so
    this hits it (measured: 73 of 200 ends with the writer unpaced; 1 CI run with a 16 fps writer).

    How: grpcio runs a call's done callbacks once, when its first status is set; a status set later replaces
    the first without them (measured over 200 ends: 129 settled masked first, then read the server's; 66 settled
    with the server's, then read masked). So a done callback added at the start keeps the first status: the
    server's, when it came first. When the masked one came first, grpcio's status task
    (``_handle_status_once_received``, never cancelled on a finished call) sets the server's a few event-loop
    turns later, and ``server_status`` polls for it (a CI run read the masked status before then: 1 of 200
    ends). Remove when grpcio ships #43486's fix:
    ``tests/unit/orchestrator/test_client.py::test_a_write_racing_the_servers_end_reports_the_servers_status``
    then passes with ``StreamgenClient.transform`` returning the bare call.
    """

    def __init__(self, call):
        self._call = call
        self._first = None  # (code, details, trailing metadata, debug string) the call settled with first
        call.add_done_callback(self._on_done)

    def _on_done(self, call) -> None:
        self._first = settled_status(call)

    async def _status(self) -> tuple:
        await self._call.code()  # the call has ended, so its done callback has kept the first status
        if self._first is not None and not masks_server_status(self._first):
            return self._first  # the server's came first: a masked one may have replaced it since
        return await server_status(self._call)

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
