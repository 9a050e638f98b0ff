"""The error-hygiene sweep (RELIABILITY S7 / S-T10) over every non-OK status the test suite's gRPC clients see.

``install()`` (from tests/conftest.py, for the whole session) wraps grpc's four public channel factories so
every channel a test opens, directly or through ``orchestrator.client``, carries a client interceptor that
records each non-OK status: code, details, trailers. Tests added later are covered without doing anything.
``violations()`` is the rule set: no traceback, file path, exception class name, Ray id or internal address
in a detail or trailer, no UNKNOWN (an exception escaped a handler), and every INTERNAL carries an opaque
``request-id``. conftest checks each test's statuses at its teardown and all of them at the session's end.

Only streamgen's API and grpc's own services (health, reflection) are swept, and channels that libraries
open for themselves (Ray's) are left as they are. An address the client itself dialled (its channel's
target) may appear in the client library's own connection errors; only that one is allowed.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sys
import threading
from dataclasses import dataclass

import grpc

from orchestrator._compat import masks_server_status, server_status, settled_status

TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]*\", line \d+")
EXCEPTION_CLASS = re.compile(r"\b[A-Z][A-Za-z0-9_]*(?:Error|Exception|Exit|Interrupt)\b|Exception calling application"
                             r"|<class '")
PATH = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*|\b[A-Za-z]:\\|\.py\b|site-packages")
GRPC_METHOD = re.compile(r"^/[\w.]+\.[A-Z]\w*/[A-Z]\w*$")
RAY_ID = re.compile(r"(?<![\w.])(?=[0-9]*[a-fA-F])[0-9a-fA-F]{16,}(?!\w|[+-]\d)|\b(?:ActorID|NodeID|WorkerID|TaskID|JobID|ObjectRef|PlacementGroupID)\b"
                    r"|ray::")
ADDRESS = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b(?:ipv4|ipv6|unix|unix-abstract|dns):|\blocalhost\b"
                     r"|\[[0-9a-fA-F]*:[0-9a-fA-F:]*\]|\b[A-Za-z][\w.-]*:\d{2,5}\b")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
SWEPT = ("/streamgen.", "/grpc.")
"""Method prefixes whose statuses are swept: the service's API (any RPC added later too), health, reflection."""


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str], ...]
    target: str
    method: str


_lock = threading.Lock()
_seen: list[Status] = []
_pending: set = set()  # tasks waiting for a server's status behind grpc.aio's masked one (a loop holds tasks weakly)


def seen() -> list[Status]:
    with _lock:
        return list(_seen)


def count() -> int:
    with _lock:
        return len(_seen)


def _record(status: Status) -> None:
    if status.code is not None and status.code != grpc.StatusCode.OK and status.method.startswith(SWEPT):
        with _lock:
            _seen.append(status)


def violations(status: Status) -> list[str]:
    """What is wrong with one status (empty: clean)."""
    problems = []
    if status.code == grpc.StatusCode.UNKNOWN:
        problems.append("UNKNOWN: an exception escaped a handler (answer INTERNAL with a request-id)")
    texts = [("details", status.details or "")] + [(f"trailer {k}", v if isinstance(v, str) else repr(v))
                                                    for k, v in status.trailers if k != "request-id"]
    own = [status.target, f"ipv4:{status.target}", f"ipv6:{status.target}"] if status.target else []
    for where, text in texts:
        for mine in sorted(own, key=len, reverse=True):
            text = text.replace(mine, "<target>")
        for name, rule in (("traceback", TRACEBACK), ("exception class", EXCEPTION_CLASS), ("Ray id", RAY_ID),
                           ("internal address", ADDRESS)):
            if m := rule.search(text):
                problems.append(f"{where}: {name} {m.group(0)!r}")
        for m in PATH.finditer(text):
            if not GRPC_METHOD.match(m.group(0)):
                problems.append(f"{where}: path {m.group(0)!r}")
                break
    ids = [v for k, v in status.trailers if k == "request-id"]
    if status.code == grpc.StatusCode.INTERNAL and not ids:
        problems.append("INTERNAL without a request-id trailer")
    problems += [f"request-id {v!r} is not opaque" for v in ids if not (isinstance(v, str) and REQUEST_ID.match(v))]
    return problems


def report(statuses: list[Status]) -> list[str]:
    return [f"{s.method} {s.code.name} {s.details!r}: {'; '.join(p)}"
            for s in statuses if (p := violations(s))]


# -- the client interceptors --------------------------------------------------------------------------------


class _Sync(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
            grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Records a call's status when it ends (sync calls are futures: done callbacks read it directly)."""

    def __init__(self, target: str):
        self.target = target

    def _watch(self, details, call):
        def done(c):
            _record(Status(c.code(), c.details() or "", tuple(c.trailing_metadata() or ()), self.target,
                           _text(details.method)))
        call.add_done_callback(done)
        return call

    def intercept_unary_unary(self, continuation, details, request):
        return self._watch(details, continuation(details, request))

    def intercept_unary_stream(self, continuation, details, request):
        return self._watch(details, continuation(details, request))

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return self._watch(details, continuation(details, request_iterator))

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return self._watch(details, continuation(details, request_iterator))


class _Aio:
    """The same for grpc.aio calls, whose status accessors are coroutines: read once the call is done."""

    def __init__(self, target: str):
        self.target = target

    def _done(self, method: str, call) -> None:
        status = settled_status(call)
        if status is None:
            raise RuntimeError("the call's status is not ready")
        if masks_server_status(status):  # made by grpc.aio here, never sent (grpc#36066): sweep the server's
            task = asyncio.get_running_loop().create_task(self._record_server_status(method, call))
            _pending.add(task)
            task.add_done_callback(_pending.discard)
            return
        self._record(method, status)

    async def _record_server_status(self, method: str, call) -> None:
        status = await server_status(call)
        if not masks_server_status(status):  # none came: nothing the server sent to sweep
            self._record(method, status)

    def _record(self, method: str, status: tuple) -> None:
        code, details, trailers, _ = status
        _record(Status(code, details or "", tuple(trailers or ()), self.target, method))

    def _watch(self, details, call):
        call.add_done_callback(functools.partial(self._done, _text(details.method)))
        return call


class _AioUnaryUnary(_Aio, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return self._watch(details, await continuation(details, request))


class _AioUnaryStream(_Aio, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return self._watch(details, await continuation(details, request))


class _AioStreamUnary(_Aio, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return self._watch(details, await continuation(details, request_iterator))


class _AioStreamStream(_Aio, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return self._watch(details, await continuation(details, request_iterator))


def _aio(target: str) -> list:
    """One interceptor per kind: a grpc.aio channel files each under the first kind it is an instance of."""
    return [cls(target) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


def _text(method) -> str:
    return method.decode() if isinstance(method, bytes) else str(method)


# -- wiring: grpc's public channel factories, wrapped for the session --------------------------------------

_originals: dict[str, object] = {}


def install() -> None:
    """Every channel opened from now on records its non-OK statuses (idempotent)."""
    if _originals:
        return
    _originals.update(insecure=grpc.insecure_channel, secure=grpc.secure_channel,
                      aio_insecure=grpc.aio.insecure_channel, aio_secure=grpc.aio.secure_channel)

    def insecure_channel(target, options=None, compression=None):
        channel = _originals["insecure"](target, options, compression)
        return channel if _library_caller() else grpc.intercept_channel(channel, _Sync(target))

    def secure_channel(target, credentials, options=None, compression=None):
        channel = _originals["secure"](target, credentials, options, compression)
        return channel if _library_caller() else grpc.intercept_channel(channel, _Sync(target))

    def aio_insecure_channel(target, options=None, compression=None, interceptors=None):
        extra = [] if _library_caller() else _aio(target)
        return _originals["aio_insecure"](target, options, compression, [*(interceptors or ()), *extra] or None)

    def aio_secure_channel(target, credentials, options=None, compression=None, interceptors=None):
        extra = [] if _library_caller() else _aio(target)
        return _originals["aio_secure"](target, credentials, options, compression,
                                        [*(interceptors or ()), *extra] or None)

    grpc.insecure_channel, grpc.secure_channel = insecure_channel, secure_channel
    grpc.aio.insecure_channel, grpc.aio.secure_channel = aio_insecure_channel, aio_secure_channel


def _library_caller() -> bool:
    """The channel is opened by a library for itself (Ray's agents and clients), not by a test or streamgen."""
    module = sys._getframe(2).f_globals.get("__name__", "")
    return module.split(".")[0] in ("ray", "grpc")


def uninstall() -> None:
    if not _originals:
        return
    grpc.insecure_channel, grpc.secure_channel = _originals["insecure"], _originals["secure"]
    grpc.aio.insecure_channel, grpc.aio.secure_channel = _originals["aio_insecure"], _originals["aio_secure"]
    _originals.clear()


async def settled() -> None:
    """Wait for the sweeps still waiting for a server's status behind grpc.aio's masked one (``_Aio._done``)."""
    await asyncio.gather(*_pending)


class expected:
    """``with hygiene.expected() as got:`` statuses recorded inside are taken out of the sweep (a test that
    makes a leaky server on purpose, to show the sweep catches it) and handed to the test in ``got``."""

    def __enter__(self) -> list[Status]:
        self._start, self.got = count(), []
        return self.got

    def __exit__(self, *exc) -> None:
        with _lock:
            self.got.extend(_seen[self._start:])
            del _seen[self._start:]
