"""The guard interceptor on a real grpc.aio server (127.0.0.1) with RPCs the service does not have yet: a
bidirectional ``Transform`` is authenticated and sees its caller with no code of its own, an operator RPC is
refused to clients, and an exception escaping a handler becomes an opaque INTERNAL with a request id."""

import asyncio
import logging
import re
from typing import NamedTuple

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from orchestrator.auth import ServiceGuard, current_caller
from orchestrator.config import ServerConfig
from orchestrator.metrics import Metrics
from orchestrator.tokens import TokenFile, token_sha256
from tests.aio_server import ThreadedServer

SERVICE = "streamgen.v1.StreamService"


async def transform(requests, context):  # what a later bidirectional RPC would look like: it names no auth
    tenant = current_caller().principal.tenant
    async for frame in requests:
        yield f"{tenant}:{frame}".encode()


async def boom(request, context):
    raise RuntimeError("/srv/streamgen/secret.py: 10.0.0.7:6379 refused")


async def drain(request, context):
    return b"drained"


def guarded_server(tokens: TokenFile, metrics: Metrics) -> ThreadedServer:
    identity = (lambda b: b, lambda b: b)
    return ThreadedServer(SERVICE, {
        "Transform": grpc.stream_stream_rpc_method_handler(transform, lambda b: b.decode("utf-8"), lambda b: b),
        "Boom": grpc.unary_unary_rpc_method_handler(boom, *identity),
        "Drain": grpc.unary_unary_rpc_method_handler(drain, *identity)},
        interceptors=[ServiceGuard(tokens, ServerConfig(), metrics)],
        setup=lambda server: health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    path = tmp_path_factory.mktemp("guard") / "tokens.yaml"
    path.write_text(f"- {{name: c, tenant: acme, role: client, sha256: {token_sha256('tok-c')}}}\n"
                    f"- {{name: o, tenant: ops, role: operator, sha256: {token_sha256('tok-o')}}}\n")
    metrics = Metrics()
    server = guarded_server(TokenFile(str(path)), metrics)
    server.metrics = metrics
    try:
        yield server
    finally:
        server.stop()


def call(guarded, method, kind, payload, token=None):
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as ch:
        rpc = getattr(ch, kind)(f"/{SERVICE}/{method}", lambda b: b, lambda b: b)
        md = (("authorization", f"Bearer {token}"),) if token else None
        result = rpc(payload, metadata=md, timeout=10)
        return list(result) if kind == "stream_stream" else result


def test_a_new_bidirectional_rpc_is_authenticated_and_knows_its_caller(guarded):
    for token in (None, "tok-wrong"):
        with pytest.raises(grpc.RpcError) as err:
            call(guarded, "Transform", "stream_stream", iter([b"f0", b"f1"]), token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert call(guarded, "Transform", "stream_stream", iter([b"f0", b"f1"]), "tok-c") == [b"acme:f0", b"acme:f1"]


def test_operator_rpcs_need_the_operator_role(guarded):
    with pytest.raises(grpc.RpcError) as err:
        call(guarded, "Drain", "unary_unary", b"", "tok-c")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert call(guarded, "Drain", "unary_unary", b"", "tok-o") == b"drained"
    assert guarded.metrics.registry.get_sample_value("streamgen_auth_failures_total", {"reason": "forbidden"}) == 1


def test_an_escaping_exception_is_an_opaque_internal_with_a_request_id_that_the_log_carries(guarded, caplog):
    caplog.set_level(logging.ERROR, logger="streamgen.auth")
    with pytest.raises(grpc.RpcError) as err:
        call(guarded, "Boom", "unary_unary", b"", "tok-c")
    assert err.value.code() == grpc.StatusCode.INTERNAL and err.value.details() == "internal error"
    request_id = dict(err.value.trailing_metadata())["request-id"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", request_id)
    (record,) = [r for r in caplog.records if r.name == "streamgen.auth"]
    assert request_id in record.getMessage() and record.exc_info[0] is RuntimeError  # the details stay in the log


def test_requests_that_do_not_parse_are_an_opaque_internal_for_every_service(guarded):
    cases = [("/grpc.health.v1.Health/Check", "unary_unary", b"\xff\xff\xff", None),  # open to all, still guarded
             (f"/{SERVICE}/Transform", "stream_stream", iter([b"ok", b"\xc3\x28"]), "tok-c")]  # invalid UTF-8
    for method, kind, payload, token in cases:
        with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as ch:
            rpc = getattr(ch, kind)(method, lambda b: b, lambda b: b)
            md = (("authorization", f"Bearer {token}"),) if token else None
            with pytest.raises(grpc.RpcError) as err:
                result = rpc(payload, metadata=md, timeout=10)
                list(result) if kind == "stream_stream" else result
        assert err.value.code() == grpc.StatusCode.INTERNAL, method
        assert err.value.details() == "request could not be parsed"
        assert "request-id" in dict(err.value.trailing_metadata())


class CallDetails(NamedTuple):  # what grpc hands an interceptor
    method: str
    invocation_metadata: tuple


def test_closing_a_guarded_stream_closes_its_handler_at_once():
    """gRPC closes the generator it iterates (the guard's) when a call goes mid-write; the handler's generator
    inside closes with it, so the stream it holds is released now, not on a later loop turn or at a GC."""
    closed = []

    async def frames(request, context):
        try:
            while True:
                yield b"frame"
        finally:
            closed.append(current_caller().request_id)

    async def continuation(_):
        return grpc.unary_stream_rpc_method_handler(frames)

    async def run():
        guard = ServiceGuard(None, ServerConfig(), Metrics())
        details = CallDetails(f"/{SERVICE}/Generate", ())
        outer = (await guard.intercept_service(continuation, details)).unary_stream(b"", None)
        assert await outer.__anext__() == b"frame" and guard.calls.inflight == 1
        await outer.aclose()
        return list(closed), guard.calls.inflight  # before this task yields to the loop again

    closed_at_once, inflight = asyncio.run(run())
    assert len(closed_at_once) == 1 and inflight == 0
