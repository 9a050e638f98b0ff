"""Service composition: Ray (local or a cluster), pipeline replicas, the gRPC server and /metrics.

The one place that starts and stops everything, in order, and undoes it in reverse on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from orchestrator.config import ServiceConfig
from orchestrator.metrics import Metrics
from orchestrator.replica import EngineHost
from orchestrator.server import start_server

log = logging.getLogger("streamgen.app")
VERSION = "0.1.0"


class Service:
    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.replicas: list[EngineHost] = []
        self.server = None
        self.servicer = None
        self.port: int | None = None
        self._metrics_server = None
        self._ray_started = False

    async def start(self) -> "Service":
        cfg = self.cfg
        if cfg.executor == "ray":
            self._start_ray()
        loop = asyncio.get_running_loop()
        for i in range(cfg.replicas):  # builds actors and calibrates: blocking, so off the loop
            self.replicas.append(await loop.run_in_executor(None, EngineHost, cfg, self.metrics, i))
        self.metrics.set_build_info(VERSION)
        if cfg.server.metrics_listen:
            self._metrics_server = self.metrics.serve(cfg.server.metrics_listen)
        self.server, self.servicer, self.port = await start_server(cfg, self.replicas, self.metrics)
        return self

    def _start_ray(self) -> None:
        if self.cfg.ray_address:  # join an existing cluster as it is configured
            import ray

            if not ray.is_initialized():
                ray.init(address=self.cfg.ray_address, include_dashboard=False, log_to_driver=False)
                self._ray_started = True
            return
        from workers.ray_executor import start_local_ray  # sets the loopback switch before importing ray

        import sys

        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            return
        start_local_ray(num_gpus=self.cfg.local_ray_gpus)
        self._ray_started = True

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_server is None else self._metrics_server[0].server_port

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Drain (readiness NOT_SERVING, streams finish or end UNAVAILABLE), then stop everything."""
        if self.servicer is not None:
            await self.servicer.drain(self.cfg.server.drain_timeout_s if drain_timeout is None else drain_timeout)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        for host in self.replicas:
            await asyncio.get_running_loop().run_in_executor(None, host.shutdown)
        self.replicas.clear()
        if self._metrics_server is not None:
            self._metrics_server[0].shutdown()
            self._metrics_server = None
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    async def serve_forever(self) -> None:
        """Run until SIGTERM / SIGINT, then drain and exit."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("draining")
        await self.stop()
