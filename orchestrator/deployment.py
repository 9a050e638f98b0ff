"""The Ray Serve deployment that hosts one pipeline replica's engine core (``replica_host: serve``).

Each pipeline replica is its own Serve application (``streamgen-pipeline-<index>``) with one Serve replica
of ``PipelineDeployment``. Serve reserves its slots with ``placement_group_bundles`` (bundle 0: the Serve
replica process; bundles 1..P: its P stage actors, STRICT_PACK), health-checks it with a real forward
through every stage, and restarts it when that fails. One application per pipeline replica keeps routing
exact: the orchestrator holds one handle per pipeline replica, so a stream's long-lived ``generate`` call
and its controls always reach the core that holds its caches.

This module runs in the Serve replica process; the orchestrator's side is ``replica_client_serve``. The
core here takes and returns the same structs (``workers.core_messages``) as one hosted in the orchestrator;
every frame batch carries the stream's checkpoint and the core's stats back with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass, field

from orchestrator.config import ServiceConfig
from workers.core import EngineCore
from workers.core_messages import CloseStream, ControlMessage, CoreOutput, CoreStats, StreamEvicted, StreamFailed
from workers.plan import Capacity
from workers.host import take_serving_priority

log = logging.getLogger("streamgen.deployment")
MAX_HELD_STATS = 1_000  # stats of outputs whose stream call had ended, kept for the next status()


@dataclass(slots=True)
class CoreStatus:
    """What the orchestrator asks a Serve-hosted core at each readiness probe."""

    healthy: bool
    broken: bool
    active: int
    capacity: Capacity
    """Admission's figures (max streams at any fps, chunk latency) for every step count and stream kind."""
    stats: list[CoreStats] = field(default_factory=list)
    """Stats the core measured that no stream's output carried back."""


class PipelineDeployment:
    """The Serve deployment body: one engine core, in its own process."""

    def __init__(self, cfg: ServiceConfig, index: int):
        from ray.util import get_current_placement_group

        from orchestrator._compat import loopback_serve_replica_grpc

        loopback_serve_replica_grpc()
        _log_with_timestamps()
        self.cfg, self.index = cfg, index
        self.healthy = True
        self._routes: dict[str, object] = {}  # stream -> its call's put (engine thread -> that call's loop)
        self._held: deque[CoreStats] = deque(maxlen=MAX_HELD_STATS)
        self._lock = threading.Lock()
        self.core = EngineCore(cfg.generation, cfg.engine, cfg.parallel, self._route, index, max_ahead=cfg.server.output_chunks_ahead,
                               placement_group=get_current_placement_group(), first_bundle=1, checkpoints=True)
        take_serving_priority(cfg.parallel.serving_nice)  # this process and its engine thread serve from here on

    def _route(self, item: CoreOutput) -> None:
        with self._lock:
            put = self._routes.get(item.stream_id)
        if put is not None:
            put(item)
        elif item.stats is not None:
            self._held.append(item.stats)

    async def generate(self, stream_id: str, messages: list[ControlMessage]):
        """The stream's long-lived call: applies ``messages`` (open or restore, then catch-up controls, in
        order), then yields FrameBatch items, and last a StreamFailed or StreamEvicted."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            self._routes[stream_id] = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)
        for msg in messages:
            self.core.submit(msg)
        try:
            while True:
                item = await queue.get()
                yield item
                if isinstance(item, (StreamFailed, StreamEvicted)):
                    return
        finally:  # the caller went away or the stream ended: free it here (a no-op once it left)
            with self._lock:
                self._routes.pop(stream_id, None)
            self.core.submit(CloseStream(stream_id))

    async def control(self, msg: ControlMessage) -> None:
        """On the replica's event loop, so one caller's controls reach the core in the order sent (a sync method
        would run on Serve's thread pool, where two calls can overtake each other: video input chunks must not)."""
        self.core.submit(msg)

    def status(self) -> CoreStatus:
        held = [self._held.popleft() for _ in range(len(self._held))]
        with self._lock:
            active = len(self._routes)
        return CoreStatus(self.healthy, self.core.broken, active, self.core.capacity(), held + [self.core.take_stats()])

    async def hand_off(self, timeout_s: float) -> int:
        return await asyncio.to_thread(self.core.hand_off, timeout_s)  # off the loop: streams keep flowing

    def stage_actors(self) -> list:
        """The stage actors' handles (operators' tooling, fault-injection tests)."""
        return list(self.core.executor.actors)

    def pid(self) -> int:
        return os.getpid()

    async def check_health(self) -> None:
        """Serve's health check: a real forward through every stage, not just a live process. While the
        core rebuilds its own stages (a dead or hung stage; bounded by placement_timeout_s, after which
        it evicts its streams) the check passes: Serve restarting the replica then would only throw that
        recovery away. Readiness stays off meanwhile, so no new stream lands here."""
        self.healthy = await asyncio.to_thread(self.core.probe, self.cfg.server.probe_timeout_s)
        if self.healthy or self.core.recovering:
            return
        log.warning("replica %d failed its health check: no forward through every stage", self.index)
        raise RuntimeError(f"replica {self.index}: a forward through every stage did not complete")

    def __del__(self):
        core = getattr(self, "core", None)
        if core is None:
            return
        try:
            core.shutdown()
        except Exception:  # noqa: BLE001 - the process is going away
            log.warning("replica %d: shutdown failed", self.index, exc_info=True)


def _log_with_timestamps() -> None:
    """streamgen's records in a replica process go to its stderr (Ray's worker log) with times."""
    logger = logging.getLogger("streamgen")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def deployment_options(cfg: ServiceConfig) -> dict:
    """Serve options of one pipeline replica: its GPU slots (P stages, then dedicated decode workers), health
    checks and limits."""
    stage = {"CPU": cfg.parallel.cpus_per_stage or 0.001}  # a bundle may not be empty
    if cfg.parallel.gpus_per_stage:
        stage["GPU"] = cfg.parallel.gpus_per_stage
    server = cfg.server
    return dict(
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.001},
        placement_group_bundles=[{"CPU": 0.001}] + [dict(stage) for _ in range(cfg.parallel.gpu_slots)],
        placement_group_strategy="STRICT_PACK",
        max_ongoing_requests=4 * server.max_streams_per_replica + 64,  # streams + their controls
        # a hung stage is first the core's to handle (stage_call_timeout_s, then a rebuild in place):
        # Serve restarts the replica only after 3 failed checks spaced at least that far apart
        health_check_period_s=max(server.probe_period_s or 10.0, cfg.parallel.stage_call_timeout_s),
        health_check_timeout_s=max(server.probe_timeout_s * 4, 5.0),
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=3.0,
    )
