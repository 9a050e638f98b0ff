"""Service composition: Ray (local or a cluster), pipeline replicas, the gRPC server, /metrics and the page.

The one place that starts and stops everything, in order, and undoes it in reverse on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from orchestrator.admission import place
from orchestrator.auth import Security, load_security
from orchestrator.autoscale import AutoscalePolicy
from orchestrator.config import ServiceConfig
from orchestrator.metrics import Metrics
from orchestrator.replica_client import ReplicaClient, StreamRecord
from orchestrator.server import start_health_server, start_server
from workers.core_messages import StreamFailed

log = logging.getLogger("streamgen.app")


VERSION = "0.1.0"


def loop_time() -> float:
    return asyncio.get_running_loop().time()


class Service:
    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.replicas: list[ReplicaClient] = []
        self.server = None
        self.servicer = None
        self.port: int | None = None
        self.security: Security | None = None
        self.health_port: int | None = None
        self._health_server = None
        self._metrics_server = None
        self._ray_started = False
        self._next_index = 0
        self._starting = 0
        self._start_tasks: set[asyncio.Task] = set()  # replicas being built in the background (_launch)
        self._stopping = False
        self._fleet: asyncio.Task | None = None
        self._next_repair = 0.0  # loop time before which no replacement replica is started
        self._prober: asyncio.Task | None = None
        self.web = None  # the browser page (orchestrator/web.py), when server.web_listen is set

    async def start(self) -> "Service":
        cfg = self.cfg
        self.security = load_security(cfg.server)  # a bad TLS or tokens file fails before Ray starts or anything binds
        from workers.executor import replica_device_map

        replica_device_map(cfg.generation, cfg.parallel).check()  # a piece that cannot fit fails before anything starts
        if cfg.parallel.backend == "ray":
            self._start_ray()
        if cfg.replica_host == "serve":
            from ray import serve

            serve.start(proxy_location="Disabled")  # no HTTP / gRPC ingress: ours is the orchestrator
        initial = cfg.autoscaling.min_replicas if cfg.autoscaling else cfg.replicas
        for _ in range(initial):
            await self._add_replica()
        self.metrics.set_build_info(VERSION)
        if cfg.server.metrics_listen:
            self._metrics_server = self.metrics.serve(cfg.server.metrics_listen)
        if cfg.server.web_listen:  # the page is a gRPC client of this server, on a socket only it knows
            from orchestrator.web import WebServer

            self.web = WebServer(cfg, self.metrics, self.security)
        self.server, self.servicer, self.port = await start_server(
            cfg, self.replicas, self.metrics, self.security, self.web.internal_target if self.web else None)
        if self.web is not None:
            await self.web.start()
        if cfg.server.health_listen:
            self._health_server, self.health_port = await start_health_server(cfg.server.health_listen,
                                                                              self.servicer.health)
        self._fleet = asyncio.create_task(self._tend_fleet())
        if cfg.server.probe_period_s:
            self._prober = asyncio.create_task(self._probe())
        return self

    async def _probe(self) -> None:
        """Readiness needs proof of real work: each replica runs a forward on all its stages every period.
        The service is SERVING while at least one replica passes; admission skips replicas that fail."""
        while True:
            await asyncio.sleep(self.cfg.server.probe_period_s)
            try:
                await self._probe_once()
            except Exception:  # noqa: BLE001 - keep probing
                log.exception("readiness probe failed")

    async def _probe_once(self) -> None:
        """Probe every replica that is not broken (a draining one still holds streams: a hung stage there is
        found too); the service is ready when one in service passes: admission places nothing on the others."""
        loop = asyncio.get_running_loop()
        hosts = [r for r in self.replicas if not r.broken]
        results = await asyncio.gather(*(loop.run_in_executor(None, h.probe, self.cfg.server.probe_timeout_s)
                                         for h in hosts))
        await self.servicer.set_ready(any(ok and h.in_service for h, ok in zip(hosts, results)))

    async def _add_replica(self, counted: bool = False) -> None:
        """Build a replica (actors, calibration: blocking, so off the event loop) and put it in service.
        ``counted``: the caller already counted it as starting (``_launch``)."""
        index, self._next_index = self._next_index, self._next_index + 1
        if not counted:
            self._starting += 1
        self._count_replicas()
        loop = asyncio.get_running_loop()
        try:
            if self.cfg.replica_host == "serve":
                from orchestrator.replica_client_serve import ServeReplicaClient

                host = await loop.run_in_executor(None, ServeReplicaClient, self.cfg, self.metrics, index, loop)
            else:
                from orchestrator.replica_client_local import LocalReplicaClient

                host = await loop.run_in_executor(None, LocalReplicaClient, self.cfg, self.metrics, index)
        finally:
            self._starting -= 1
        if self._stopping:  # the service stopped while this one was built: it never serves
            await loop.run_in_executor(None, host.shutdown)
            return
        host.rehome = self._rehome
        self.replicas.append(host)
        self._count_replicas()

    def _rehome(self, left: ReplicaClient, records: list[StreamRecord]) -> None:
        """Streams that left a replica (drained, broken, or its process died): continue each where admission
        would place it (re-cached from its checkpoint), or end it UNAVAILABLE. Runs on the thread that saw
        them leave (an engine thread, or the event loop)."""
        for record in records:
            candidates = [r for r in self.replicas if r is not left and r.in_service and r.healthy]
            decision = place(record.spec.fps, record.steps, candidates, self.cfg.server, record.spec.is_video)
            if decision is None:
                self.metrics.stream_migrations.labels("failed").inc()
                record.sink(StreamFailed(record.stream_id, "no replica left"))
                continue
            target = candidates[decision.replica]
            target.adopt(record)
            if self.servicer is not None and not self.servicer.rehome(record.stream_id, target):
                target.close(record.stream_id)  # it ended while it moved: its end closed it on the old replica
                continue
            self.metrics.stream_migrations.labels("ok").inc()

    async def _tend_fleet(self) -> None:
        """The fleet loop: retire replicas that left service or finished draining, replace lost ones up to
        the floor (``replicas``, or ``min_replicas`` when autoscaling), and scale by load."""
        auto = self.cfg.autoscaling
        policy = AutoscalePolicy(auto) if auto else None
        period = auto.period_s if auto else min(1.0, self.cfg.repair_period_s)
        seen_refusals = 0
        while True:
            await asyncio.sleep(period)
            try:
                await self._retire()
                self._repair()
                if policy is not None:
                    seen_refusals = self._scale(policy, seen_refusals)
                self._count_replicas()
            except Exception:  # noqa: BLE001 - keep tending the fleet
                log.exception("fleet step failed")

    async def _retire(self) -> None:
        """Shut down replicas with nothing left on them that are out of service (drained, or broken after
        their streams were handed off or failed)."""
        for host in [r for r in self.replicas if not r.in_service and r.active() == 0]:
            self.replicas.remove(host)
            await asyncio.get_running_loop().run_in_executor(None, host.shutdown)
            self.metrics.forget_replica(host.index)

    def _repair(self) -> None:
        """Start a replacement while fewer replicas serve than the floor; after a failed start, wait
        ``repair_period_s`` before the next try (no free slots: retrying at once only burns the cluster)."""
        auto = self.cfg.autoscaling
        floor = auto.min_replicas if auto else self.cfg.replicas
        in_service = sum(r.in_service for r in self.replicas) + self._starting
        if in_service < floor and loop_time() >= self._next_repair:
            log.warning("fleet: %d of %d replicas in service; starting a replacement", in_service, floor)
            self._launch(repair=True)

    def _launch(self, repair: bool = False) -> None:
        """Start a replica in the background, counted as starting from now: the autoscaler's decision in the
        same fleet step sees it (else both would start one for the same missing replica)."""
        self._starting += 1
        task = asyncio.create_task(self._start_replica(repair))
        self._start_tasks.add(task)  # stop() waits for it: a replica built meanwhile is shut down, not leaked
        task.add_done_callback(self._start_tasks.discard)

    async def _start_replica(self, repair: bool = False) -> None:
        try:
            await self._add_replica(counted=True)
        except Exception:  # noqa: BLE001 - e.g. no free slots within placement_timeout_s
            log.exception("could not start a replica")
            self._next_repair = loop_time() + self.cfg.repair_period_s
            if repair:
                self.metrics.replica_repairs.labels("failed").inc()
            return
        if repair:
            self.metrics.replica_repairs.labels("ok").inc()

    def _scale(self, policy: AutoscalePolicy, seen_refusals: int) -> int:
        serving = [r for r in self.replicas if r.in_service]
        refusals = self.servicer.capacity_refusals
        refused = refusals > seen_refusals
        cap = self.cfg.server.max_streams_per_replica  # the hard cap counts as load too
        loads = [max(r.load(), r.active() / cap) for r in serving]
        decision = policy.decide(loop_time(), loads, self._starting, refused)
        if decision.delta > 0:
            log.info("autoscaler: adding a replica (%d serving)", len(serving))
            self._launch()
        elif decision.delta < 0:
            log.info("autoscaler: draining replica %d", serving[decision.drain].index)
            serving[decision.drain].draining = True
        return refusals

    def _count_replicas(self) -> None:
        draining = sum(not r.in_service for r in self.replicas)
        self.metrics.replicas.labels("serving").set(len(self.replicas) - draining)
        self.metrics.replicas.labels("draining").set(draining)
        self.metrics.replicas.labels("starting").set(self._starting)

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
        for task in (self._fleet, self._prober):
            if task is not None:
                task.cancel()
        self._fleet = self._prober = None
        self._stopping = True
        if self.servicer is not None:
            await self.servicer.drain(self.cfg.server.drain_timeout_s if drain_timeout is None else drain_timeout)
        if self.web is not None:  # after the drain: pages saw their streams end with its status
            await self.web.stop()
            self.web = None
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self._health_server is not None:
            await self._health_server.stop(grace=None)
            self._health_server = None
        loop = asyncio.get_running_loop()
        await asyncio.gather(*self._start_tasks, return_exceptions=True)  # each shuts down what it built
        await asyncio.gather(*(loop.run_in_executor(None, host.shutdown) for host in self.replicas))
        self.replicas.clear()
        if self._metrics_server is not None:
            self._metrics_server[0].shutdown()
            self._metrics_server = None
        if self._ray_started:
            import ray

            if self.cfg.replica_host == "serve" and not self.cfg.ray_address:
                from ray import serve

                serve.shutdown()  # our own Ray: nothing else uses its Serve (on a cluster only our apps go)
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
