"""S-T2 and the security knobs of the config: refused start-ups happen before any socket opens (nothing here
binds: the non-loopback address is TEST-NET-1, which no interface has, should a check ever regress)."""

import sys

import pytest

from orchestrator.auth import load_security
from orchestrator.cli import main
from orchestrator.config import ServerConfig, ServiceConfig, TenantsConfig, message_limits, service_config_from
from orchestrator.server import server_options

UNBINDABLE = "192.0.2.1:50051"
_sockets: list | None = None


def _audit(event, args):
    if _sockets is not None and event.startswith("socket."):
        _sockets.append(event)


sys.addaudithook(_audit)  # hooks cannot be removed: it records only while _sockets is a list


def sockets_opened_by(fn):
    global _sockets
    _sockets = []
    try:
        result = fn()
    finally:
        seen, _sockets = _sockets, None
    return result, [e for e in seen if e in ("socket.__new__", "socket.bind", "socket.connect")]


def test_a_non_loopback_listen_without_tls_fails_at_start_before_any_socket(capsys):
    rc, opened = sockets_opened_by(lambda: main(["serve", "--listen", UNBINDABLE, "--metrics-listen", "127.0.0.1:0"]))
    assert rc == 2 and opened == []
    err = capsys.readouterr().err
    assert "not loopback" in err and "tls_cert" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="needs TLS"):
        ServerConfig(listen="0.0.0.0:50051")


def test_unreadable_tls_or_token_files_fail_at_start_before_any_socket(tmp_path, capsys):
    missing = str(tmp_path / "missing.pem")
    argv = ["serve", "--listen", UNBINDABLE, "--metrics-listen", "127.0.0.1:0", "--backend", "local",
            "--stages", "1", "--tls-cert", missing, "--tls-key", missing]
    rc, opened = sockets_opened_by(lambda: main(argv))
    assert rc == 2 and "server.tls_cert: cannot read" in capsys.readouterr().err
    assert "socket.bind" not in opened  # neither /metrics nor gRPC came up
    not_pem = tmp_path / "key.pem"
    not_pem.write_text("hello")
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="server.tls_key: .* holds no PEM PRIVATE KEY"):
        load_security(ServerConfig(tls_cert=str(cert), tls_key=str(not_pem)))
    with pytest.raises(ValueError, match="server.auth_tokens: cannot read"):
        load_security(ServerConfig(auth_tokens=missing))


def test_listen_addresses_name_their_host_and_metrics_stay_on_loopback_unless_named():
    for field in ("listen", "metrics_listen", "health_listen"):
        with pytest.raises(ValueError, match="host named"):
            ServerConfig(**{field: ":9464"})
    tls = dict(tls_cert="c.pem", tls_key="k.pem")
    public = ServerConfig(listen="0.0.0.0:50051", **tls)
    assert public.metrics_listen == "127.0.0.1:9464" and public.health_listen == ""
    assert ServerConfig(listen="0.0.0.0:50051", metrics_listen="0.0.0.0:9464", **tls).metrics_listen == "0.0.0.0:9464"
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(tls_cert="c.pem")
    with pytest.raises(ValueError, match="mutual TLS"):
        ServerConfig(tls_client_ca="ca.pem")


def test_every_abuse_limit_is_a_config_key_that_reaches_the_server_options():
    cfg = service_config_from({"server": {"keepalive_time_s": 7, "keepalive_timeout_s": 3, "min_recv_ping_interval_s": 4,
                                          "max_ping_strikes": 5, "message_overhead_bytes": 4096,
                                          "max_receive_message_bytes": 1 << 20}})
    options = dict(server_options(cfg))
    frame = cfg.generation.width * cfg.generation.height * 3
    assert options["grpc.max_send_message_length"] == frame + 4096 == message_limits(cfg)[1]
    assert options["grpc.max_receive_message_length"] == 1 << 20
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (7000, 3000)
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 4000
    assert options["grpc.http2.max_ping_strikes"] == 5
    with pytest.raises(ValueError, match="server.max_receive_message_bytes must hold one raw"):
        service_config_from({"generation": {"width": 1920, "height": 1088}})  # 6.3 MB frames > the 4 MiB default
    with pytest.raises(ValueError, match=r"server\.maximum_concurrent_rpcs"):
        service_config_from({"server": {"maximum_concurrent_rpcs": 0}})
    with pytest.raises(ValueError, match=r"server\.max_stream_duration_s"):
        service_config_from({"server": {"max_stream_duration_s": 0}})


def test_tenant_quotas_have_a_default_and_named_overrides():
    cfg = service_config_from({"tenants": {"default": {"max_streams": 4},
                                           "by_tenant": {"acme": {"starts_per_minute": 9}}}})
    assert cfg.tenants.quota("acme").starts_per_minute == 9 and cfg.tenants.quota("acme").max_streams == 32
    assert cfg.tenants.quota("other").max_streams == 4
    assert ServiceConfig().tenants == TenantsConfig()
    with pytest.raises(ValueError, match=r"tenants\.by_tenant\.bad tenant"):
        service_config_from({"tenants": {"by_tenant": {"bad tenant": {}}}})
    with pytest.raises(ValueError, match=r"tenants\.default\.max_stream: unknown key"):
        service_config_from({"tenants": {"default": {"max_stream": 3}}})
