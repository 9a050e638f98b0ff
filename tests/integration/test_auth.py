"""S-T4..S-T7, S-T11, S12: bearer tokens, roles, tenant isolation, quotas, the audit line and the canary,
against a real grpc.aio server on 127.0.0.1 (tiny model, one in-process stage)."""

import asyncio
import json
import logging
import os
import re
import secrets
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import generate_latest

from orchestrator.config import TenantQuota
from protos.streamgen.v1 import stream_pb2, stream_pb2_grpc
from tests import hygiene
from tests.secured import bearer, config, health, quotas, request, start, stub, write_tokens

SERVING = health_pb2.HealthCheckResponse.SERVING
CANARY = "canary" + secrets.token_hex(6)
TOKENS = {"tok-alice": ("a", "client"), "tok-bob": ("b", "client"), "tok-ops": ("ops", "operator"),
          "tok-quinn": ("q", "client"), "tok-rita": ("r", "client"), f"tok-{CANARY}": ("c", "client")}


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    tokens = write_tokens(tmp_path_factory.mktemp("auth") / "tokens.yaml", TOKENS)
    running = start(config(auth_tokens=str(tokens),
                           tenants=quotas(q=TenantQuota(max_streams=1), r=TenantQuota(starts_per_minute=2))))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def channel(authed):
    with grpc.insecure_channel(authed.target) as ch:
        yield ch


def sample(running, name: str, **labels) -> float:
    return running.service.metrics.registry.get_sample_value(name, labels) or 0.0


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


def test_missing_and_bad_tokens_are_unauthenticated_on_every_rpc_and_health_stays_open(authed, channel):
    s = stub(channel)
    calls = {
        "Generate": lambda md: list(s.Generate(request(max_frames=1), metadata=md, timeout=10)),
        "Control": lambda md: s.Control(stream_pb2.ControlRequest(stream_id="x", cancel=True), metadata=md, timeout=10),
        "GetCapacity": lambda md: s.GetCapacity(stream_pb2.CapacityRequest(), metadata=md, timeout=10),
        "Drain": lambda md: s.Drain(stream_pb2.DrainRequest(timeout_ms=1), metadata=md, timeout=10),
        "Transform": lambda md: list(s.Transform(iter([stream_pb2.TransformRequest(
            config=stream_pb2.TransformConfig(prompt="x", fps=8.0))]), metadata=md, timeout=10)),
    }
    bad = {"none": None, "unknown": bearer("tok-mallory"), "basic": (("authorization", "Basic dG9rLWFsaWNl"),),
           "empty": (("authorization", "Bearer "),), "two": bearer("tok-alice") + bearer("tok-alice")}
    for label, md in bad.items():
        for name, call in calls.items():
            err = rpc_error(lambda: call(md))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (label, name)
            assert re.fullmatch(r"[A-Za-z0-9_-]{16}", dict(err.trailing_metadata())["request-id"])
    assert health(channel) == SERVING and health(channel, "streamgen.v1.StreamService") == SERVING
    assert not authed.service.servicer.draining


def test_another_tenants_stream_id_is_not_found_exactly_like_an_unknown_one(authed, channel):
    s = stub(channel)
    call = s.Generate(request(), metadata=bearer("tok-alice"), timeout=60)
    sid = next(call).stream_id

    def refusal(stream_id, token, **kw):
        err = rpc_error(lambda: s.Control(stream_pb2.ControlRequest(stream_id=stream_id, **kw), metadata=bearer(token)))
        return err.code(), err.details(), sorted(k for k, _ in err.trailing_metadata())

    unknown = refusal(secrets.token_hex(16), "tok-bob", prompt="x")
    assert unknown[0] == grpc.StatusCode.NOT_FOUND
    assert refusal(sid, "tok-bob", prompt="x") == unknown
    assert refusal(sid, "tok-bob", cancel=True) == unknown
    assert refusal(sid, "tok-ops", cancel=True) == unknown  # an operator of another tenant neither
    # the owner's stream went on untouched, and its owner controls it
    reply = s.Control(stream_pb2.ControlRequest(stream_id=sid, prompt="a castle at night"), metadata=bearer("tok-alice"))
    assert reply.prompt_revision == 1
    assert next(call).stream_id == sid
    s.Control(stream_pb2.ControlRequest(stream_id=sid, cancel=True), metadata=bearer("tok-alice"))
    list(call)  # ends OK after the owner's cancel


def test_a_client_token_may_not_drain_or_see_replica_details(authed, channel):
    s = stub(channel)
    forbidden = sample(authed, "streamgen_auth_failures_total", reason="forbidden")
    for req in (stream_pb2.DrainRequest(timeout_ms=1), stream_pb2.DrainRequest(timeout_ms=1, replica=0)):
        err = rpc_error(lambda: s.Drain(req, metadata=bearer("tok-alice")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert sample(authed, "streamgen_auth_failures_total", reason="forbidden") == forbidden + 2
    assert not authed.service.servicer.draining and not authed.service.replicas[0].draining
    client_view = s.GetCapacity(stream_pb2.CapacityRequest(), metadata=bearer("tok-alice"))
    assert client_view.streams_max > 0 and len(client_view.replica_states) == 0
    operator_view = s.GetCapacity(stream_pb2.CapacityRequest(), metadata=bearer("tok-ops"))
    assert [r.index for r in operator_view.replica_states] == [0]
    # the operator passes the guard (a replica that does not exist: nothing is drained)
    err = rpc_error(lambda: s.Drain(stream_pb2.DrainRequest(timeout_ms=1, replica=99), metadata=bearer("tok-ops")))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_a_thousand_unauthenticated_attempts_reach_no_admission_and_no_engine(authed, caplog):
    caplog.set_level(logging.WARNING, logger="streamgen.auth")
    replica = authed.service.replicas[0]
    counters = ["streamgen_stream_starts_total", "streamgen_stream_rejections_total", "streamgen_streams_ended_total"]

    def admission_state():
        samples = {(m.name, tuple(sorted(x.labels.items()))): x.value
                   for m in authed.service.metrics.registry.collect() for x in m.samples
                   if x.name in counters}
        return samples, replica.opened, sample(authed, "streamgen_streams_active"), authed.service.servicer.quotas._starts

    failures = sum(sample(authed, "streamgen_auth_failures_total", reason=r) for r in ("missing", "invalid", "malformed"))
    before = admission_state()

    async def flood():
        async with grpc.aio.insecure_channel(authed.target) as ch:
            s = stream_pb2_grpc.StreamServiceStub(ch)

            async def attempt(i):
                md = [None, bearer(f"tok-guess-{i}"), (("authorization", "Token x"),)][i % 3]
                try:
                    if i % 2:
                        async for _ in s.Generate(request(max_frames=1), metadata=md, timeout=20):
                            pass
                    else:
                        await s.Control(stream_pb2.ControlRequest(stream_id="x", prompt="y"), metadata=md, timeout=20)
                except grpc.aio.AioRpcError as err:
                    return err.code()
                return grpc.StatusCode.OK

            codes = []
            for batch in range(10):
                codes += await asyncio.gather(*(attempt(batch * 100 + i) for i in range(100)))
            return codes

    started = time.monotonic()
    codes = asyncio.run(flood())
    elapsed = time.monotonic() - started
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 1000
    assert admission_state() == before  # no start counted, no engine open, no quota touched
    after = sum(sample(authed, "streamgen_auth_failures_total", reason=r) for r in ("missing", "invalid", "malformed"))
    assert after - failures == 1000
    logged = [r for r in caplog.records if r.name == "streamgen.auth"]
    assert len(logged) <= 5 * (1 + int(elapsed // 10))  # rate-limited: at most 5 lines per 10 s, not 1,000
    assert elapsed < 60, elapsed


def test_stream_ids_are_128_random_bits(authed, channel):
    ids = {list(stub(channel).Generate(request(max_frames=1, seed=i), metadata=bearer("tok-bob"), timeout=30))[0].stream_id
           for i in range(8)}
    assert len(ids) == 8 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len({i[12] for i in ids}) > 1  # not a uuid4 (whose version nibble is always 4: 122 random bits)


def test_the_concurrent_stream_quota_refuses_that_tenant_only(authed, channel):
    s = stub(channel)
    rejected = sample(authed, "streamgen_stream_rejections_total", reason="quota")
    first = s.Generate(request(), metadata=bearer("tok-quinn"), timeout=60)
    sid = next(first).stream_id
    err = rpc_error(lambda: list(s.Generate(request(), metadata=bearer("tok-quinn"), timeout=10)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.details().startswith("quota")
    assert int(dict(err.trailing_metadata())["retry-after-ms"]) > 0
    assert sample(authed, "streamgen_stream_rejections_total", reason="quota") == rejected + 1
    assert len(list(s.Generate(request(max_frames=2), metadata=bearer("tok-alice"), timeout=30))) == 2  # unaffected
    s.Control(stream_pb2.ControlRequest(stream_id=sid, cancel=True), metadata=bearer("tok-quinn"))
    list(first)
    assert len(list(s.Generate(request(max_frames=1), metadata=bearer("tok-quinn"), timeout=30))) == 1  # slot back


def test_the_start_rate_quota_refuses_that_tenant_only(authed, channel):
    s = stub(channel)
    for _ in range(2):
        assert len(list(s.Generate(request(max_frames=1), metadata=bearer("tok-rita"), timeout=30))) == 1
    err = rpc_error(lambda: list(s.Generate(request(max_frames=1), metadata=bearer("tok-rita"), timeout=10)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.details().startswith("quota")
    assert 0 < int(dict(err.trailing_metadata())["retry-after-ms"]) <= 60_000
    assert len(list(s.Generate(request(max_frames=1), metadata=bearer("tok-alice"), timeout=30))) == 1  # unaffected


def test_each_stream_start_and_end_writes_one_audit_line(authed, channel, caplog):
    caplog.set_level(logging.INFO, logger="streamgen.audit")
    s = stub(channel)
    frames = list(s.Generate(request(max_frames=2), metadata=bearer("tok-alice"), timeout=30))
    rpc_error(lambda: list(s.Generate(request(width=50), metadata=bearer("tok-bob"), timeout=10)))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "streamgen.audit"]
    mine = [line for line in lines if line["stream_id"] == frames[0].stream_id]
    assert [(m["event"], m["tenant"], m["outcome"]) for m in mine] == \
        [("stream_start", "a", "admitted"), ("stream_end", "a", "client_done")]
    assert mine[0]["request_id"] == mine[1]["request_id"] and re.fullmatch(r"[A-Za-z0-9_-]{16}", mine[0]["request_id"])
    assert mine[1]["duration_s"] > 0
    refused = [line for line in lines if line["tenant"] == "b"]
    assert [(r["event"], r["outcome"]) for r in refused] == [("stream_start", "rejected:invalid")]


def test_canaries_in_the_prompt_and_the_token_never_reach_logs_metrics_or_errors(authed, channel, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    start = hygiene.count()
    s, token = stub(channel), f"tok-{CANARY}"
    prompt = f"a lighthouse at dusk, {CANARY}"
    call = s.Generate(request(prompt=prompt), metadata=bearer(token), timeout=60)
    sid = next(call).stream_id
    s.Control(stream_pb2.ControlRequest(stream_id=sid, prompt=f"{prompt} in fog"), metadata=bearer(token))
    rpc_error(lambda: s.Control(stream_pb2.ControlRequest(stream_id=sid, prompt=f"{CANARY}\x07"), metadata=bearer(token)))
    s.Control(stream_pb2.ControlRequest(stream_id=sid, cancel=True), metadata=bearer(token))
    list(call)
    refusals = [lambda: list(s.Generate(request(prompt=f"{CANARY}\x07"), metadata=bearer(token), timeout=10)),
                lambda: list(s.Generate(request(prompt=CANARY * 1000), metadata=bearer(token), timeout=10)),
                lambda: list(s.Generate(request(prompt=prompt), metadata=bearer(token + "x"), timeout=10)),
                lambda: s.Control(stream_pb2.ControlRequest(stream_id=CANARY), metadata=bearer(token)),
                lambda: list(channel.unary_stream("/streamgen.v1.StreamService/Generate", lambda b: b, lambda b: b)(
                    b"\x0a\x18" + CANARY.encode()[:16] + b"\xc3\x28" * 3 + b"\x00" * 2, metadata=bearer(token),
                    timeout=10))]
    codes = [rpc_error(r).code() for r in refusals]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT,
                     grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL]

    statuses = hygiene.seen()[start:]
    errors = " ".join(f"{x.details} {x.trailers}" for x in statuses)
    logs = caplog.text
    metrics = generate_latest(authed.service.metrics.registry).decode()
    output = "".join(capfd.readouterr())
    assert len(statuses) >= 6 and '"tenant": "c"' in logs and "streamgen_frames_total" in metrics  # all were seen
    for where, text in (("error details", errors), ("logs", logs), ("metrics", metrics), ("process output", output)):
        assert CANARY not in text, where


def test_a_revoked_token_is_refused_at_once_without_a_restart(tmp_path):
    path = write_tokens(tmp_path / "tokens.yaml", {"tok-old": ("a", "client")})
    running = start(config(auth_tokens=str(path)))
    try:
        with grpc.insecure_channel(running.target) as ch:
            s = stub(ch)
            assert s.GetCapacity(stream_pb2.CapacityRequest(), metadata=bearer("tok-old")).streams_max > 0
            os.replace(write_tokens(tmp_path / "next.yaml", {"tok-new": ("a", "client")}), path)
            err = rpc_error(lambda: s.GetCapacity(stream_pb2.CapacityRequest(), metadata=bearer("tok-old")))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert s.GetCapacity(stream_pb2.CapacityRequest(), metadata=bearer("tok-new")).streams_max > 0
    finally:
        running.stop()
