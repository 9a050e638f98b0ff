"""The service configuration and its root, ``ServiceConfig`` (torch-free).

The data-plane schemas (model, sampler, cache, engine, generation, parallel) live in ``workers/config.py``;
this module adds the service schemas (gRPC server and admission limits, autoscaling, the replica fleet)
and composes the root that ``streamgen serve`` runs with. The data-plane classes are re-exported so the
control plane has one place to import configuration from. ``load_service_config`` reads the one YAML
file that carries every knob (``deploy/streamgen.yaml``) through pydantic: unknown keys and bad values
fail with their dotted path.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from workers.config import (CACHE_POLICIES, CONFIG, KERNEL_BACKENDS, MAX_STEPS, MODEL_CONFIGS, SAMPLER_MODES,
                            CacheConfig, EngineConfig, GenerationConfig, ModelConfig, ParallelConfig, SamplerConfig,
                            check_topology, get_config)

__all__ = [
    "ModelConfig",
    "SamplerConfig",
    "CacheConfig",
    "GenerationConfig",
    "EngineConfig",
    "ParallelConfig",
    "AutoscalingConfig",
    "ServerConfig",
    "TenantQuota",
    "TenantsConfig",
    "ServiceConfig",
    "get_config",
    "load_service_config",
    "read_config_file",
    "service_config_from",
    "message_limits",
    "is_loopback",
    "MAX_STEPS",
    "MODEL_CONFIGS",
    "SAMPLER_MODES",
    "CACHE_POLICIES",
    "KERNEL_BACKENDS",
]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Tenant ids (tokens file, ``tenants.by_tenant``): short, printable, safe in logs."""

Seconds = Annotated[float, Field(gt=0, le=86400)]
Bytes = Annotated[int, Field(ge=1, le=1 << 31)]
Fps = Annotated[float, Field(gt=0, le=1000)]


def _host_port(value: str, name: str) -> tuple[str, int]:
    """HOST:PORT with the host named: an empty host (``:9464``) would bind every interface unasked."""
    host, sep, port = value.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not (0 <= int(port) < 65536):
        raise ValueError(f"{name} must be HOST:PORT with the host named (127.0.0.1, or 0.0.0.0 for every "
                         f"interface), got {value!r}")
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    """Whether a HOST:PORT binds only the loopback interface."""
    return address.rpartition(":")[0].strip("[]") in LOOPBACK_HOSTS


@dataclass(frozen=True, config=CONFIG)
class ServerConfig:
    """The gRPC front end: addresses, request limits, pacing and admission."""

    listen: str = "127.0.0.1:50051"
    """gRPC HOST:PORT (port 0 picks a free one)."""
    metrics_listen: str = "127.0.0.1:9464"
    """Prometheus /metrics HOST:PORT; empty disables the endpoint."""
    allow_plaintext_non_loopback: bool = False
    """Serve plaintext on a non-loopback listen / web_listen (only behind a TLS-terminating mesh: tokens in clear)."""
    tls_cert: str = ""
    """PEM certificate chain for TLS on the gRPC port (with tls_key); re-read when the file changes."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    tls_client_ca: str = ""
    """PEM CA bundle: set, every client must present a certificate it signed (mutual TLS)."""
    auth_tokens: str = ""
    """YAML list of {name, tenant, role, sha256} bearer tokens, re-read on change; empty: the server runs open."""
    health_listen: str = ""
    """Plaintext HOST:PORT serving only grpc.health.v1 (kubelet and Docker probes); empty: off."""
    reflection: bool = False
    """Serve gRPC reflection (off by default)."""
    web_listen: str = ""
    """HOST:PORT of the browser page (HTTP and a WebSocket; HTTPS with tls_cert); empty: off. Loopback unless TLS."""
    web_frames_in_flight: Annotated[int, Field(ge=1, le=64)] = 2
    """Frames a browser page may have unacknowledged; a newer frame replaces one waiting (no lag builds up)."""
    default_fps: Fps = 16.0
    """Frame rate of a stream whose request gives 0."""
    min_fps: Fps = 1.0
    """Lowest frame rate a request may ask for (RELIABILITY S4: [1, 60]; a slower stream outlives its calls)."""
    max_fps: Fps = 60.0
    """Highest frame rate a request may ask for."""
    default_latency_budget_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 10_000
    """Per-frame budget when a request gives 0: the longest a chunk may take from dispatch to frames."""
    max_prompt_bytes: Bytes = 4096
    """Longest prompt accepted, in UTF-8 bytes."""
    max_frames: Annotated[int, Field(ge=1, le=1 << 40)] = 1_000_000
    """Most frames one stream may ask for."""
    max_width: Annotated[int, Field(ge=1, le=1 << 14)] = 1920
    """Widest video a request may ask for, in pixels."""
    max_height: Annotated[int, Field(ge=1, le=1 << 14)] = 1920
    """Tallest video a request may ask for, in pixels."""
    max_streams_per_replica: Annotated[int, Field(ge=1, le=4096)] = 8
    """Hard cap per pipeline replica; the latency model may admit fewer."""
    admission_headroom: Annotated[float, Field(gt=0, le=8)] = 0.9
    """Admit while the modelled utilisation stays at or below this fraction (above 1 overcommits: benchmarks)."""
    retry_after_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 1000
    """Hint sent with RESOURCE_EXHAUSTED / UNAVAILABLE."""
    output_chunks_ahead: Annotated[int, Field(ge=1, le=1024)] = 2
    """Chunks a stream may have generated but not yet sent (bounded output queue)."""
    no_output_timeout_s: Seconds = 30.0
    """A running stream with no frame for this long ends UNAVAILABLE (no silent stalls)."""
    drain_timeout_s: Seconds = 10.0
    """On SIGTERM / Drain: how long streams may run on before they end UNAVAILABLE."""
    max_receive_message_bytes: Bytes = 4 * 1024 * 1024
    """Largest gRPC message the server accepts (at least one raw frame + message_overhead_bytes)."""
    message_overhead_bytes: Annotated[int, Field(ge=1024, le=1 << 24)] = 64 * 1024
    """Room beyond one raw RGB frame in the message limits (the send limit is frame + this)."""
    max_stream_duration_s: Seconds = 4 * 3600.0
    """A stream is ended DEADLINE_EXCEEDED after this long (the client may reconnect)."""
    maximum_concurrent_rpcs: Annotated[int, Field(ge=1, le=1 << 20)] = 512
    """RPCs of the stream service in progress at once (streams count); more get RESOURCE_EXHAUSTED."""
    keepalive_time_s: Seconds = 20.0
    """The server pings a connection this often to find dead peers."""
    keepalive_timeout_s: Seconds = 10.0
    """A connection whose ping goes unanswered this long is closed."""
    min_recv_ping_interval_s: Annotated[float, Field(ge=0, le=86400)] = 10.0
    """Client pings closer together than this (with no data between) count as strikes."""
    max_ping_strikes: Annotated[int, Field(ge=0, le=1000)] = 2
    """Strikes before the server sends GOAWAY (too_many_pings); 0: never."""
    stall_frames: Annotated[float, Field(gt=0, le=1e6)] = 1.0
    """A frame later than this many intervals past its due time re-anchors the pacing clock."""
    idle_timeout_s: Seconds = 10.0
    """A video-to-video stream with no input frame for this long ends (DEADLINE_EXCEEDED, reason idle)."""
    max_idle_timeout_s: Seconds = 300.0
    """The longest idle timeout a TransformConfig may ask for."""
    max_invalid_frames: Annotated[int, Field(ge=1, le=1 << 20)] = 30
    """Unusable input frames in a row that end a video-to-video stream (INVALID_ARGUMENT naming frame.data)."""
    probe_period_s: Annotated[float, Field(ge=0, le=86400)] = 5.0
    """Readiness: every replica runs a real forward on every stage this often (0 disables probing)."""
    probe_timeout_s: Seconds = 5.0
    """A probe that takes longer fails: a replica passes only with a fresh, successful probe."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        _host_port(value, "ServerConfig.listen")
        return value

    @field_validator("metrics_listen", "health_listen", "web_listen")
    @classmethod
    def _optional_listen(cls, value: str, info) -> str:
        if value:
            _host_port(value, f"ServerConfig.{info.field_name}")
        return value

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("ServerConfig.tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("ServerConfig.tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if not is_loopback(self.listen) and not self.tls_cert and not self.allow_plaintext_non_loopback:
            raise ValueError(f"ServerConfig.listen {self.listen!r} is not loopback, so it needs TLS: set tls_cert "
                             "and tls_key (--tls-cert, --tls-key), or listen on 127.0.0.1")
        if self.web_listen and not is_loopback(self.web_listen) and not self.tls_cert and \
                not self.allow_plaintext_non_loopback:
            raise ValueError(f"ServerConfig.web_listen {self.web_listen!r} is not loopback, so it needs TLS: set "
                             "tls_cert and tls_key (the page is then served over HTTPS), or listen on 127.0.0.1")
        if not self.min_fps <= self.default_fps <= self.max_fps:
            raise ValueError("ServerConfig needs min_fps <= default_fps <= max_fps")
        return self


@dataclass(frozen=True, config=CONFIG)
class AutoscalingConfig:
    """Pipeline replicas between min and max on admitted-stream utilisation (orchestrator/autoscale.py)."""

    min_replicas: Annotated[int, Field(ge=1, le=4096)] = 1
    """Replicas kept in service at least (the fleet's floor)."""
    max_replicas: Annotated[int, Field(ge=1, le=4096)] = 1
    """Replicas the autoscaler may run at most."""
    target_utilisation: Annotated[float, Field(gt=0, le=1)] = 0.7
    """Per-replica share of the latency model's capacity to aim for."""
    upscale_delay_s: Annotated[float, Field(ge=0, le=86400)] = 2.0
    """Load must stay above target this long before a replica is added."""
    downscale_delay_s: Annotated[float, Field(ge=0, le=86400)] = 10.0
    """Load must stay below target this long before a replica is drained."""
    period_s: Annotated[float, Field(gt=0, le=3600)] = 0.5
    """How often the policy runs (the fleet loop sleeps this long between steps)."""

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"AutoscalingConfig needs min_replicas <= max_replicas, got "
                             f"{self.min_replicas}, {self.max_replicas}")
        return self


@dataclass(frozen=True, config=CONFIG)
class TenantQuota:
    """What one tenant may use at once and how fast it may start streams."""

    max_streams: Annotated[int, Field(ge=1, le=1 << 20)] = 32
    """Streams the tenant may have running at once."""
    starts_per_minute: Annotated[int, Field(ge=1, le=1 << 20)] = 300
    """Streams the tenant may start in any 60 s window."""


TenantId = Annotated[str, Field(pattern=TENANT_PATTERN)]


@dataclass(frozen=True, config=CONFIG)
class TenantsConfig:
    """Per-tenant quotas: over one, a start gets RESOURCE_EXHAUSTED "quota"; other tenants are unaffected."""

    default: TenantQuota = dataclasses.field(default_factory=TenantQuota)
    """The quota of every tenant without its own entry (an open server has no tenants: no quota applies)."""
    by_tenant: dict[TenantId, TenantQuota] = dataclasses.field(default_factory=dict)
    """Tenant id -> its own quota (replaces the default; fields it omits take their built-in defaults)."""

    def quota(self, tenant: str) -> TenantQuota:
        return self.by_tenant.get(tenant, self.default)


@dataclass(frozen=True, config=CONFIG)
class ServiceConfig:
    """The root: everything `streamgen serve` runs with.

    ``generation``, ``engine`` and ``parallel`` are the data plane's (``workers/config.py``) and are what
    a replica's engine is built from; the rest is the service's: the front end and the replica fleet.
    """

    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    """What every stream generates with: model, sampler, cache, video size and weights."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """How each replica's engine batches and re-plans."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """Each replica's pipeline layout: stages, decode workers, backend, device, dtype, resources and timeouts."""
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    """The gRPC front end: addresses, request limits, pacing and admission."""
    replicas: Annotated[int, Field(ge=1, le=4096)] = 1
    """Pipeline replicas of a fixed fleet (with autoscaling, min_replicas is the floor instead)."""
    replica_host: Literal["driver", "serve"] = "driver"
    """Where each replica's engine loop runs: driver (an orchestrator thread) or serve (a Ray Serve replica)."""
    ray_address: str = ""
    """Empty: start a local Ray bound to loopback. auto or an address: join that cluster."""
    repair_period_s: Seconds = 5.0
    """How often the fleet loop replaces replicas that left service, and how long it backs off after a failure."""
    local_ray_gpus: Annotated[float, Field(ge=0, le=4096)] | None = None
    """Logical GPUs a local Ray advertises (tests); None = what the machine has."""
    autoscaling: AutoscalingConfig | None = None
    """None: a fixed fleet of replicas. Set: start with min_replicas and scale up to max_replicas."""
    tenants: TenantsConfig = dataclasses.field(default_factory=TenantsConfig)
    """Per-tenant stream quotas (tenants come from the tokens file; an open server has none)."""

    @model_validator(mode="after")
    def _check(self) -> ServiceConfig:
        check_topology(self.parallel, self.generation.model)
        frame = raw_frame_bytes(self.generation)
        if self.server.max_receive_message_bytes < frame + self.server.message_overhead_bytes:
            raise ValueError(f"ServiceConfig.server.max_receive_message_bytes must hold one raw "
                             f"{self.generation.width}x{self.generation.height} frame ({frame} bytes) plus "
                             f"message_overhead_bytes ({self.server.message_overhead_bytes})")
        if self.replica_host == "serve" and self.parallel.backend != "ray":
            raise ValueError("ServiceConfig.replica_host 'serve' needs parallel.backend 'ray' "
                             "(stage actors in its bundles)")
        return self


def raw_frame_bytes(gen: GenerationConfig) -> int:
    """Bytes of one raw RGB frame at the generated size: the largest payload in either direction (a JPEG
    of it is smaller but for a few hundred header bytes, which the message overhead covers)."""
    return gen.width * gen.height * 3


def message_limits(cfg: ServiceConfig) -> tuple[int, int]:
    """(receive, send) gRPC message limits in bytes: receive as configured (it holds one raw frame plus
    the overhead, checked above), send exactly one raw frame plus the overhead."""
    return cfg.server.max_receive_message_bytes, raw_frame_bytes(cfg.generation) + cfg.server.message_overhead_bytes


def _explain(err: ValidationError, where: str) -> ValueError:
    """One line per problem, each naming its dotted path (``server.listen``)."""
    lines = []
    for e in err.errors(include_url=False):
        path = ".".join(str(part) for part in e["loc"])
        why = "unknown key" if e["type"] in ("unexpected_keyword_argument", "extra_forbidden") else \
            e["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {why}" if path else why)
    return ValueError(f"{where}: " + "; ".join(lines))


_ROOT = TypeAdapter(ServiceConfig)


def service_config_from(data: dict[str, Any], where: str = "config") -> ServiceConfig:
    """The validated root from a nested mapping (a loaded YAML file, possibly with CLI overrides)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    try:
        return _ROOT.validate_python(data)
    except ValidationError as err:
        raise _explain(err, where) from None


def read_config_file(path: str) -> dict[str, Any]:
    """The raw mapping of a YAML config file (an empty file is an empty mapping)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as err:  # missing, a directory, unreadable
        raise ValueError(f"{path}: cannot read it ({err.strerror or type(err).__name__})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


def load_service_config(path: str) -> ServiceConfig:
    """The one file that carries every knob (``deploy/streamgen.yaml`` documents them all)."""
    return service_config_from(read_config_file(path), path)
