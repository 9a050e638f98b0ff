"""Helpers for the security tests: a small in-process service (tiny model, one in-process stage, no Ray),
tokens files, channels with TLS / tokens."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.config import (CacheConfig, GenerationConfig, ParallelConfig, SamplerConfig, ServerConfig,
                                 ServiceConfig, TenantQuota, TenantsConfig, get_config)
from orchestrator.tokens import token_sha256
from protos.streamgen.v1 import stream_pb2, stream_pb2_grpc
from tests.integration.test_server import Running

OWN_POOL = ("grpc.use_local_subchannel_pool", 1)  # a channel of its own: a new connection, a new handshake


def config(tenants: TenantsConfig | None = None, **server) -> ServiceConfig:
    gen = GenerationConfig(model=get_config("tiny"), sampler=SamplerConfig(chunk_frames=3), cache=CacheConfig())
    base = dict(listen="127.0.0.1:0", metrics_listen="", probe_period_s=0, max_streams_per_replica=8)
    return ServiceConfig(generation=gen, server=ServerConfig(**{**base, **server}),
                         parallel=ParallelConfig(stages=1, backend="local"),
                         tenants=tenants or TenantsConfig())


@functools.cache
def _warm() -> None:
    """The first engine of a process calibrates its latency model on cold kernels (several times too slow),
    and admission then refuses 16 fps: start and drop one first."""
    Running(config()).stop()


def start(cfg: ServiceConfig) -> Running:
    _warm()
    return Running(cfg)


def write_tokens(path: Path, tokens: dict[str, tuple[str, str]]) -> Path:
    """{token: (tenant, role)} -> a tokens file holding their hashes (labels: the tenant and role)."""
    lines = [f"- {{name: {tenant}-{role}, tenant: {tenant}, role: {role}, sha256: {token_sha256(token)}}}"
             for token, (tenant, role) in tokens.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def quotas(**by_tenant: TenantQuota) -> TenantsConfig:
    return TenantsConfig(by_tenant=by_tenant)


def secure_channel(target: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                         cert.read_bytes() if cert else None)
    return grpc.secure_channel(target, creds, options=[OWN_POOL])


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def health(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                     timeout=timeout).status


def stub(channel: grpc.Channel) -> stream_pb2_grpc.StreamServiceStub:
    return stream_pb2_grpc.StreamServiceStub(channel)


def request(**kw) -> stream_pb2.GenerateRequest:
    return stream_pb2.GenerateRequest(**{**dict(prompt="a red fox in the snow", fps=16.0, seed=1), **kw})


def with_server(cfg: ServiceConfig, **changes) -> ServiceConfig:
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, **changes))
