"""S-T1 / S-T3: TLS and mutual TLS on the gRPC port with a CA this test makes (`cryptography`), certificate
reload without a restart, and the client side (`streamgen generate` / `health` with --tls-ca and a token)."""

import os
import shutil
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2

from orchestrator.cli import main
from tests.integration.test_server import serve_process
from tests.secured import OWN_POOL, bearer, config, health, request, secure_channel, start, stub, write_tokens
from tests.tls_certs import CA

SERVING = health_pb2.HealthCheckResponse.SERVING
TOKEN = "tok-tls-client"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA(d, "ca"), CA(d, "other-ca")
    return SimpleNamespace(dir=d, ca=ca, other=other, server=ca.issue("server"), server_other=other.issue("server-2"),
                           client=ca.issue("client", server=False), stranger=other.issue("stranger", server=False),
                           expired=ca.issue("expired", server=False, expired=True),
                           tokens=write_tokens(d / "tokens.yaml", {TOKEN: ("t", "client")}))


@pytest.fixture(scope="module")
def tls_server(pki):
    running = start(config(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key), auth_tokens=str(pki.tokens),
                           health_listen="127.0.0.1:0"))
    try:
        yield running
    finally:
        running.stop()


def refused(channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        health(channel)
    return err.value.code()


def test_a_client_trusting_the_ca_streams_and_plaintext_or_the_wrong_ca_fail(tls_server, pki):
    with secure_channel(tls_server.target, pki.ca.pem) as ch:
        assert health(ch) == SERVING
        frames = list(stub(ch).Generate(request(max_frames=3), metadata=bearer(TOKEN), timeout=30))
        assert [f.index for f in frames] == [0, 1, 2]
    with grpc.insecure_channel(tls_server.target, options=[OWN_POOL]) as ch:
        assert refused(ch) == grpc.StatusCode.UNAVAILABLE
    with secure_channel(tls_server.target, pki.other.pem) as ch:
        assert refused(ch) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_valid_client_certificate(pki):
    running = start(config(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key), tls_client_ca=str(pki.ca.pem)))
    try:
        with secure_channel(running.target, pki.ca.pem, pki.client.cert, pki.client.key) as ch:
            assert health(ch) == SERVING
            assert len(list(stub(ch).Generate(request(max_frames=2), timeout=30))) == 2
        with secure_channel(running.target, pki.ca.pem) as ch:  # no client certificate
            assert refused(ch) == grpc.StatusCode.UNAVAILABLE
        with secure_channel(running.target, pki.ca.pem, pki.expired.cert, pki.expired.key) as ch:
            assert refused(ch) == grpc.StatusCode.UNAVAILABLE
        with secure_channel(running.target, pki.ca.pem, pki.stranger.cert, pki.stranger.key) as ch:  # other CA
            assert refused(ch) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_a_new_certificate_is_served_to_new_handshakes_and_a_running_stream_goes_on(pki, tmp_path):
    live = SimpleNamespace(cert=tmp_path / "tls.crt", key=tmp_path / "tls.key")
    shutil.copy(pki.server.cert, live.cert)
    shutil.copy(pki.server.key, live.key)
    running = start(config(tls_cert=str(live.cert), tls_key=str(live.key)))
    try:
        with secure_channel(running.target, pki.ca.pem) as streaming:
            call = stub(streaming).Generate(request(max_frames=40), timeout=60)
            before = [next(call) for _ in range(8)]
            with secure_channel(running.target, pki.other.pem) as ch:
                assert refused(ch) == grpc.StatusCode.UNAVAILABLE  # the other CA's certificate is not served yet

            # rotate as a Secret volume does: new files beside the old, renamed over them
            for src, dst in ((pki.server_other.cert, live.cert), (pki.server_other.key, live.key)):
                shutil.copy(src, dst.with_suffix(".new"))
                os.replace(dst.with_suffix(".new"), dst)

            with secure_channel(running.target, pki.other.pem) as ch:
                assert health(ch) == SERVING  # a new handshake gets the new certificate
            with secure_channel(running.target, pki.ca.pem) as ch:
                assert refused(ch) == grpc.StatusCode.UNAVAILABLE  # and no longer the old one
            after = list(call)  # the stream opened under the old certificate runs to its end
        assert running.service.security.certificates.reloads == 1
        assert [f.index for f in before + after] == list(range(40))
    finally:
        running.stop()


def test_the_cli_reaches_a_tls_server_with_a_token_from_the_environment(tls_server, pki, tmp_path, monkeypatch,
                                                                        capsys):
    out = tmp_path / "v.mp4"
    args = ["generate", "--target", tls_server.target, "--tls-ca", str(pki.ca.pem), "--frames", "3", "--out", str(out)]
    assert main(args) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("STREAMGEN_TOKEN", TOKEN)
    assert main(args) == 0 and out.stat().st_size > 0
    assert "frames 3" in capsys.readouterr().out
    assert main(["health", "--target", tls_server.target, "--tls-ca", str(pki.ca.pem)]) == 0
    # the plaintext health port answers probes that carry no certificate, and serves nothing else
    health_target = f"127.0.0.1:{tls_server.service.health_port}"
    assert main(["health", "--target", health_target, "--service", "streamgen.v1.StreamService"]) == 0
    with grpc.insecure_channel(health_target, options=[OWN_POOL]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            list(stub(ch).Generate(request(max_frames=1), metadata=bearer(TOKEN), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_client_never_sends_a_token_in_plaintext_beyond_loopback():
    from orchestrator.client import Connection

    with pytest.raises(ValueError, match="plaintext"):
        Connection("10.1.2.3:50051", token="secret")
    assert Connection("127.0.0.1:50051", token="secret").token == "secret"
    with pytest.raises(ValueError, match="go together"):
        Connection("127.0.0.1:50051", tls_ca="ca.pem", tls_cert="c.pem")


def test_the_start_line_says_once_how_callers_are_checked(pki):
    """Open (no tokens) is said in the start line, once; with TLS and tokens, so are they."""
    small = ["--backend", "local", "--stages", "1", "--model", "tiny"]
    with serve_process(*small) as (proc, _, lines):
        start = [line for line in lines if "serving on" in line]
    assert len(start) == 1 and "transport off; auth OPEN" in start[0]
    assert sum("OPEN" in line for line in lines) == 1
    with serve_process(*small, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                       "--auth-tokens", str(pki.tokens)) as (proc, _, lines):
        start = [line for line in lines if "serving on" in line]
    assert "transport TLS; auth 1 tokens, 1 tenants" in start[0] and "OPEN" not in "".join(lines)
