"""The first server interceptor: authentication, roles, the server-wide call limit, opaque errors.

Every RPC of every service the server hosts passes ``ServiceGuard`` before any of its handler code runs
(even before its request is parsed). ``grpc.health.v1`` stays open for probes, with a call limit of its own
(``HEALTH_RPCS``), so unauthenticated Watch streams cannot crowd out the service. The guard is generic over
methods and their cardinality, so an RPC added later (e.g. a bidirectional ``Transform``) is covered with no
code of its own:

1. a bearer token (``authorization: Bearer <token>``) is checked against the tokens file's hashes
   (``tokens.TokenFile``, re-read when it changes); missing or unknown -> UNAUTHENTICATED;
2. a method in ``OPERATOR_METHODS`` needs the operator role -> else PERMISSION_DENIED;
3. at most ``server.maximum_concurrent_rpcs`` calls run at once -> else RESOURCE_EXHAUSTED + retry-after-ms;
4. the handler runs with its ``Caller`` (principal, request id) in a context variable: ``current_caller()``;
   an exception escaping it, or a request that does not parse, is answered INTERNAL with a plain message and
   the ``request-id`` trailer (the exception is logged with that id): no traceback, class name, path or
   address reaches the client.

Without a tokens file the server is open: every caller is ``tokens.OPEN`` (one tenant, operator role).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NoReturn

import grpc

from orchestrator.audit import RateLimitedLog
from orchestrator.clock import Clock
from orchestrator.config import ServerConfig
from orchestrator.metrics import Metrics
from orchestrator.tls import CertificateFiles
from orchestrator.tokens import ANONYMOUS, OPEN, AuthFailure, Principal, TokenFile, bearer_token

log = logging.getLogger("streamgen.auth")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
HEALTH_RPCS = 32
"""Health calls in progress at once (open to anyone: bounded apart from the service's calls)."""
OPERATOR_METHODS = frozenset({"/streamgen.v1.StreamService/Drain"})
"""RPCs only the operator role may call (GetCapacity is open to clients, its replica details are not)."""
REQUEST_ID = "request-id"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made the RPC this task serves, and the opaque id its logs and error trailers carry."""

    principal: Principal
    request_id: str


_CALLER: ContextVar[Caller] = ContextVar("streamgen_caller")


def current_caller() -> Caller:
    """The caller of the RPC being served. Outside a guarded RPC it raises LookupError (fail closed)."""
    return _CALLER.get()


def new_request_id() -> str:
    return secrets.token_urlsafe(12)  # 16 characters, 96 random bits: opaque


async def abort(context, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None,
                trailers: tuple = ()) -> NoReturn:
    """End the RPC with ``code`` and a plain ``message``; the trailers carry the request id (and the retry hint,
    and any ``trailers`` given)."""
    trailers = list(trailers)
    caller = _CALLER.get(None)
    if caller is not None:
        trailers.append((REQUEST_ID, caller.request_id))
    if retry_after_ms is not None:
        trailers.append(("retry-after-ms", str(retry_after_ms)))
    context.set_trailing_metadata(tuple(trailers))
    await context.abort(code, message)


@dataclass(frozen=True)
class Security:
    """What the server checks callers with, loaded and validated before any socket opens."""

    tokens: TokenFile | None
    certificates: CertificateFiles | None

    def describe(self) -> str:
        tls = "off" if self.certificates is None else \
            "mutual TLS" if self.certificates.client_ca else "TLS"
        auth = "OPEN (no auth_tokens: every caller may call every RPC)" if self.tokens is None else \
            f"{len(self.tokens)} tokens, {len(self.tokens.tenants)} tenants"
        return f"transport {tls}; auth {auth}"


def load_security(server: ServerConfig) -> Security:
    """Read the TLS files and the tokens file; ValueError naming the config field if one is unusable."""
    certificates = CertificateFiles(server.tls_cert, server.tls_key, server.tls_client_ca) \
        if server.tls_cert else None
    tokens = None
    if server.auth_tokens:
        try:
            tokens = TokenFile(server.auth_tokens)
        except OSError as err:
            raise ValueError(f"server.auth_tokens: cannot read {server.auth_tokens}: {err.strerror}") from None
        except ValueError as err:
            raise ValueError(f"server.auth_tokens: {err}") from None
    return Security(tokens, certificates)


def _handler_like(handler: grpc.RpcMethodHandler, behavior, request_deserializer) -> grpc.RpcMethodHandler:
    """A method handler of the same cardinality as ``handler`` with another behavior."""
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](
        behavior, request_deserializer=request_deserializer, response_serializer=handler.response_serializer)


def _behavior(handler: grpc.RpcMethodHandler):
    return (handler.stream_stream if handler.request_streaming else handler.unary_stream) \
        if handler.response_streaming else (handler.stream_unary if handler.request_streaming else handler.unary_unary)


def _skip(data: bytes) -> None:
    """A refused call's request is never parsed."""
    return None


_UNPARSED = object()


def _tolerant(deserializer):
    """The handler's deserializer, answering ``_UNPARSED`` instead of raising: grpc would answer UNKNOWN
    naming the exception class."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError, invalid UTF-8, ...: answered INTERNAL
            log.debug("a request did not parse", exc_info=True)
            return _UNPARSED
    return parse


async def _parsed(requests, context):
    async for request in requests:
        if request is _UNPARSED:
            await abort(context, grpc.StatusCode.INTERNAL, "request could not be parsed")
        yield request


class Slots:
    """Calls in progress against a bound (the event loop is the only writer: no lock)."""

    def __init__(self, limit: int):
        self.limit, self.inflight = limit, 0


class ServiceGuard(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenFile | None, server: ServerConfig, metrics: Metrics, clock: Clock | None = None):
        self.tokens, self.metrics = tokens, metrics
        self.retry_after_ms = server.retry_after_ms
        self.calls = Slots(server.maximum_concurrent_rpcs)
        self.health_calls = Slots(HEALTH_RPCS)
        self._refusals = RateLimitedLog(log, clock or Clock())

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)  # a table lookup: no handler code runs
        if handler is None:
            return None
        request_id = new_request_id()
        if details.method.startswith(HEALTH_PREFIX):
            return self._guarded(handler, Caller(ANONYMOUS, request_id), self.health_calls)
        principal, failure = self._authenticate(details.invocation_metadata)
        if failure is None and details.method in OPERATOR_METHODS and not principal.operator:
            failure = AuthFailure.FORBIDDEN
        if failure is not None:
            return self._refusal(handler, details.method, failure, request_id)
        return self._guarded(handler, Caller(principal, request_id), self.calls)

    def _authenticate(self, metadata) -> tuple[Principal | None, AuthFailure | None]:
        if self.tokens is None:
            return OPEN, None
        token, failure = bearer_token([value for key, value in metadata or () if key == "authorization"])
        if failure is not None:
            return None, failure
        principal = self.tokens.authenticate(token)
        return (principal, None) if principal is not None else (None, AuthFailure.INVALID)

    def _refusal(self, handler, method: str, failure: AuthFailure, request_id: str) -> grpc.RpcMethodHandler:
        self.metrics.auth_failures.labels(failure.value).inc()
        self._refusals.warning("refused %s: %s token (request %s)", method, failure.value, request_id)
        code, message = (grpc.StatusCode.PERMISSION_DENIED, "this RPC needs the operator role") \
            if failure is AuthFailure.FORBIDDEN else (grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

        async def refuse(request, context):
            _CALLER.set(Caller(ANONYMOUS, request_id))  # only for the request-id trailer
            await abort(context, code, message)

        return _handler_like(handler, refuse, _skip)

    def _guarded(self, handler: grpc.RpcMethodHandler, caller: Caller, slots: Slots) -> grpc.RpcMethodHandler:
        behavior = _behavior(handler)
        guard = self

        streaming_requests = handler.request_streaming

        async def admit(request, context):
            """Set the caller, take a slot (or refuse); the request, checked to have parsed."""
            _CALLER.set(caller)  # each RPC runs in its own task: this call's alone
            if streaming_requests:
                request = _parsed(request, context)
            elif request is _UNPARSED:
                await abort(context, grpc.StatusCode.INTERNAL, "request could not be parsed")
            await guard._enter(context, slots)
            return request

        if inspect.isasyncgenfunction(behavior):
            async def run(request, context):
                request = await admit(request, context)
                try:
                    # gRPC closes this generator (not the handler's) when the call goes mid-write: close the
                    # handler's now, so its stream ends at once and not when the garbage collector gets to it
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as err:  # noqa: BLE001 - logged with the request id, answered opaquely
                    await guard._internal(context, caller, err)
                finally:
                    slots.inflight -= 1
        elif inspect.iscoroutinefunction(behavior):
            async def run(request, context):
                request = await admit(request, context)
                try:
                    return await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as err:  # noqa: BLE001 - logged with the request id, answered opaquely
                    await guard._internal(context, caller, err)
                finally:
                    slots.inflight -= 1
        else:
            raise TypeError(f"{behavior!r}: the grpc.aio server needs async handlers")
        return _handler_like(handler, run, _tolerant(handler.request_deserializer))

    async def _enter(self, context, slots: Slots) -> None:
        if slots.inflight >= slots.limit:
            self.metrics.concurrent_rpc_refusals.inc()
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: too many calls in progress",
                        self.retry_after_ms)
        slots.inflight += 1

    async def _internal(self, context, caller: Caller, err: Exception) -> NoReturn:
        log.error("internal error (request %s, tenant %r)", caller.request_id, caller.principal.tenant, exc_info=err)
        await abort(context, grpc.StatusCode.INTERNAL, "internal error")
