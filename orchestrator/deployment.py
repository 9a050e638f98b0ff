"""Pipeline replicas as Ray Serve deployments (``replica_host: serve``).

Each pipeline replica is its own Serve application holding one ``PipelineReplica`` replica. Serve reserves
its slots with ``placement_group_bundles`` (bundle 0: the replica process; bundles 1..P: its P stage actors,
STRICT_PACK), health-checks it with a real forward through every stage, and restarts it when that fails.
One application per pipeline replica keeps routing exact: the orchestrator holds one handle per replica,
so a stream's long-lived ``generate`` call and its controls always reach the replica that holds its caches.

Inside the replica process an EngineHost runs the engine loop, as the driver-hosted mode does in the
orchestrator. Every delivered chunk carries the stream's StreamCheckpoint; the orchestrator keeps the
latest, so when a replica process dies its streams continue on another replica (re-cached from their
recent clean latents). Metric updates made in the replica are recorded and replayed on the orchestrator's
registry, so /metrics stays the one place to look.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

from orchestrator.config import ServiceConfig
from orchestrator.metrics import Metrics
from orchestrator.replica import EngineFailure, EngineHost, FrameBatch, Handoff, StreamBook
from orchestrator.types import StreamSpec
from workers.executor import StageFailure

log = logging.getLogger("streamgen.deployment")
MAX_STEPS = 8


def _loopback_serve_replicas() -> None:
    """Serve replicas start an inter-deployment gRPC server on ``[::]:0``, every interface. On a Ray bound
    to loopback (streamgen's own local Ray: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, inherited by the replica
    processes) nothing off this machine can reach them anyway, so bind it to 127.0.0.1. Runs when a
    replica process imports this module to build its PipelineReplica, before Serve opens that port.
    On a real cluster (variable unset) Serve is left as it is: other nodes must reach the replicas."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    from ray.serve._private import replica as serve_replica

    bind = serve_replica.add_port_to_grpc_server
    if getattr(bind, "streamgen_loopback", False):
        return

    def loopback(server, address: str):
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    loopback.streamgen_loopback = True
    serve_replica.add_port_to_grpc_server = loopback


_loopback_serve_replicas()


# -- metrics across the process boundary ------------------------------------------------------------


class MetricEvents:
    """Stands in for Metrics inside a replica process: records each update (bounded) for the orchestrator
    to replay on its registry. ``events.stage_errors.labels("died").inc()`` records
    ``("stage_errors", ("died",), "inc", 1.0)``."""

    def __init__(self, limit: int = 50_000):
        self._events: deque = deque(maxlen=limit)  # counters and histograms, oldest dropped past the bound
        self._gauges: dict[tuple, float] = {}  # only the last value of a gauge matters

    def __getattr__(self, name: str) -> "_Recorder":
        if name.startswith("_"):
            raise AttributeError(name)
        return _Recorder(self, name, ())

    def observe_stage_stats(self, stats) -> None:
        self._events.append(("observe_stage_stats", (), "call", list(stats)))

    def take(self) -> list:
        out = []
        while self._events:
            out.append(self._events.popleft())
        gauges, self._gauges = self._gauges, {}
        return out + [(name, labelled, "set", value) for (name, labelled), value in gauges.items()]


@dataclass
class _Recorder:
    sink: MetricEvents
    name: str
    labelled: tuple

    def labels(self, *values) -> "_Recorder":
        return _Recorder(self.sink, self.name, tuple(str(v) for v in values))

    def inc(self, value: float = 1.0) -> None:
        self.sink._events.append((self.name, self.labelled, "inc", value))

    def set(self, value: float) -> None:
        self.sink._gauges[(self.name, self.labelled)] = value

    def observe(self, value: float) -> None:
        self.sink._events.append((self.name, self.labelled, "observe", value))


def replay(metrics: Metrics, events: list) -> None:
    """Apply recorded updates to the orchestrator's registry; unknown names are dropped, not fatal."""
    for name, labelled, op, value in events:
        if name == "observe_stage_stats":
            metrics.observe_stage_stats(value)
            continue
        metric = getattr(metrics, name, None)
        if metric is None:
            log.warning("replica sent an unknown metric %r", name)
            continue
        getattr(metric.labels(*labelled) if labelled else metric, op)(value)


# -- the replica process ------------------------------------------------------------------------------


@dataclass
class Moved:
    """The stream left this replica (drain, or stages that could not be rebuilt): continue it elsewhere
    from the orchestrator's latest checkpoint."""

    reason: str


@dataclass
class ReplicaStatus:
    healthy: bool
    broken: bool
    active: int
    chunk_latency: dict[int, float]
    """steps -> predicted seconds from a chunk's first forward to its clean latents."""
    frame_rate: dict[int, float]
    """steps -> video frames per second the pipeline sustains (max streams at fps = rate // fps)."""
    events: list


class PipelineReplica:
    """The Serve deployment body: one pipeline replica's engine loop, in its own process."""

    def __init__(self, cfg: ServiceConfig, index: int):
        from ray.util import get_current_placement_group

        _log_with_timestamps()
        self.cfg = cfg
        self.events = MetricEvents()
        self.host = EngineHost(cfg, self.events, index, placement_group=get_current_placement_group(),
                               first_bundle=1, checkpoints=True)
        self.host.rehome = self._moved

    async def generate(self, stream_id: str, spec: StreamSpec, utilisation: float, checkpoint=None,
                       catch_up: tuple[str, int] | None = None):
        """The stream's long-lived call: yields FrameBatch items, and last an EngineFailure or Moved.
        ``catch_up`` = (prompt, n): prompt switches the lost replica had not applied, applied after the
        stream opens (the same inbox keeps them in order), one revision each."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def sink(item):  # engine thread -> this call's loop
            loop.call_soon_threadsafe(queue.put_nowait, item)

        if checkpoint is None:
            self.host.open(stream_id, spec, utilisation, sink)
        else:
            self.host.adopt(Handoff(stream_id, spec, utilisation, sink, checkpoint))
        if catch_up is not None:
            for _ in range(catch_up[1]):
                self.host.set_prompt(stream_id, catch_up[0])
        try:
            while True:
                item = await queue.get()
                yield item
                if isinstance(item, (EngineFailure, Moved)):
                    return
        finally:  # the caller went away or the stream ended: free it here (a no-op once it moved)
            self.host.close(stream_id)

    def _moved(self, host, handoffs: list[Handoff]) -> None:
        """EngineHost's rehome hook: end each stream's call with Moved; the orchestrator re-homes it."""
        for h in handoffs:
            h.sink(Moved("replica out of service"))

    def control(self, kind: str, stream_id: str, value=None) -> None:
        if kind == "prompt":
            self.host.set_prompt(stream_id, value)
        elif kind == "steps":
            self.host.set_steps(stream_id, value)
        elif kind == "consumed":
            self.host.consumed(stream_id)
        elif kind == "close":
            self.host.close(stream_id)
        else:
            raise ValueError(f"unknown control {kind!r}")

    def status(self) -> ReplicaStatus:
        engine = self.host.engine
        steps = range(1, MAX_STEPS + 1)
        latency = {n: engine.predicted_chunk_latency(n) for n in steps}
        rate = {n: engine.frame_rate(n) for n in steps}
        return ReplicaStatus(self.host.healthy, self.host.broken, self.host.active(), latency, rate,
                             self.events.take())

    async def hand_off(self, timeout_s: float) -> None:
        self.host.draining = True
        await asyncio.to_thread(self.host.hand_off, timeout_s)  # off the loop: streams keep flowing

    def stage_actors(self) -> list:
        """The stage actors' handles (operators' tooling, fault-injection tests)."""
        return list(self.host.executor.actors)

    def pid(self) -> int:
        return os.getpid()

    async def check_health(self) -> None:
        """Serve's health check: a real forward through every stage, not just a live process. While the
        engine rebuilds its own stages (a dead or hung stage; bounded by placement_timeout_s, after which
        the replica hands its streams off) the check passes: Serve restarting the replica then would only
        throw that recovery away. Readiness stays off meanwhile, so no new stream lands here."""
        if await asyncio.to_thread(self.host.probe, self.cfg.server.probe_timeout_s):
            return
        if self.host.recovering:
            return
        log.warning("replica %d failed its health check: no forward through every stage", self.host.index)
        raise RuntimeError(f"replica {self.host.index}: a forward through every stage did not complete")

    def __del__(self):
        try:
            self.host.shutdown()
        except Exception:  # noqa: BLE001 - the process is going away
            pass


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
    """Serve options of one pipeline replica: its P stage slots, health checks and limits."""
    stage = {"CPU": cfg.cpus_per_stage or 0.001}  # a bundle may not be empty
    if cfg.gpus_per_stage:
        stage["GPU"] = cfg.gpus_per_stage
    server = cfg.server
    return dict(
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.001},
        placement_group_bundles=[{"CPU": 0.001}] + [dict(stage) for _ in range(cfg.stages)],
        placement_group_strategy="STRICT_PACK",
        max_ongoing_requests=4 * server.max_streams_per_replica + 64,  # streams + their controls
        # a hung stage is first the engine's to handle (stage_call_timeout_s, then a rebuild in place):
        # Serve restarts the replica only after 3 failed checks spaced at least that far apart
        health_check_period_s=max(server.probe_period_s or 10.0, cfg.stage_call_timeout_s),
        health_check_timeout_s=max(server.probe_timeout_s * 4, 5.0),
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=3.0,
    )


# -- the orchestrator's side -------------------------------------------------------------------------


class ServeReplica(StreamBook):
    """One PipelineReplica as the orchestrator sees it: the EngineHost interface (open, close, controls,
    load, capacity, probe, hand_off, shutdown) over a Serve application handle. Created off the event
    loop (it waits for Serve); its stream calls run as tasks on ``loop``."""

    def __init__(self, cfg: ServiceConfig, metrics: Metrics, index: int, loop: asyncio.AbstractEventLoop):
        from ray import serve

        self.cfg, self.metrics, self.index, self.loop = cfg, metrics, index, loop
        self.app = f"streamgen-pipeline-{index}"
        self.draining = False
        self.broken = False
        self.healthy = True
        self.opened = 0
        StreamBook.__init__(self)
        self._checkpoints: dict[str, object] = {}
        self._prompt_goals: dict[str, tuple[str, int]] = {}  # stream -> (prompt, revision) asked for last
        self._tasks: dict[str, asyncio.Task] = {}
        self._last_loss = -1e9
        app = serve.deployment(PipelineReplica, name="PipelineReplica", **deployment_options(cfg)).bind(cfg, index)
        serve.run(app, name=self.app, route_prefix=None, blocking=False)
        self._wait_running(cfg.placement_timeout_s)
        self.handle = serve.get_app_handle(self.app)
        self._status = self.handle.status.remote().result(timeout_s=60)

    def _wait_running(self, timeout_s: float) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            app = serve.status().applications.get(self.app)
            if app is not None and app.status == "RUNNING":
                return
            if app is not None and app.status == "DEPLOY_FAILED":
                break
            time.sleep(0.2)
        serve.delete(self.app)
        raise StageFailure("unplaceable", f"{self.app} did not start within {timeout_s:.0f} s")

    # streams (called on the event loop) ----------------------------------------------------------------

    def open(self, stream_id: str, spec: StreamSpec, utilisation: float, sink) -> None:
        self._register(stream_id, spec, utilisation, sink)
        self.opened += 1
        self._start(stream_id, spec, utilisation, None, (spec.prompt, 0))

    def adopt(self, handoff: Handoff) -> None:
        """Continue a stream from another replica, from its latest checkpoint (or from the start)."""
        self._register(handoff.stream_id, handoff.spec, handoff.utilisation, handoff.sink)
        self._start(handoff.stream_id, handoff.spec, handoff.utilisation, handoff.state,
                    handoff.prompt_goal or (handoff.spec.prompt, 0))

    def _start(self, stream_id, spec, utilisation, checkpoint, prompt_goal) -> None:
        def create():
            self._tasks[stream_id] = self.loop.create_task(self._pump(stream_id, spec, utilisation, checkpoint))
        if checkpoint is not None:
            self._checkpoints[stream_id] = checkpoint
        self._prompt_goals[stream_id] = prompt_goal
        if _on_loop(self.loop):
            create()
        else:
            self.loop.call_soon_threadsafe(create)

    async def _pump(self, stream_id, spec, utilisation, checkpoint) -> None:
        catch_up = prompt_catch_up(self._prompt_goals.get(stream_id, (spec.prompt, 0)), checkpoint)
        call = self.handle.options(stream=True).generate.remote(stream_id, spec, utilisation, checkpoint, catch_up)
        try:
            async for item in call:
                entry = self._sinks.get(stream_id)
                if entry is None:
                    return
                if isinstance(item, FrameBatch):
                    if item.checkpoint is not None:
                        self._checkpoints[stream_id] = item.checkpoint
                        item.checkpoint = None
                    item.ready_at = time.monotonic()  # this process's clock: the replica may be on another node
                    entry[0](item)
                elif isinstance(item, EngineFailure):
                    self._forget(stream_id)
                    entry[0](item)
                    return
                else:  # Moved: this replica is out of service (drained, or its stages cannot be rebuilt)
                    self.draining = True
                    break
            else:
                return
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - the replica process died or was restarted
            log.warning("%s lost stream %s: %s", self.app, stream_id[:8], type(err).__name__)
            now = time.monotonic()
            if now - self._last_loss > 5.0:  # one incident, however many streams it took down
                self.metrics.engine_errors.labels("replica_lost").inc()
            self._last_loss = now
        self._hand_off([stream_id])

    def _hand_off(self, stream_ids: list[str]) -> None:
        handoffs = []
        for sid in stream_ids:
            goal, checkpoint = self._prompt_goals.get(sid), self._checkpoints.get(sid)
            entry = self._forget(sid)
            if entry is not None:
                sink, spec, load = entry
                handoffs.append(Handoff(sid, spec, load, sink, checkpoint, goal))
        if handoffs:
            self._send_away(handoffs)

    def _forget(self, stream_id: str) -> tuple | None:
        self._tasks.pop(stream_id, None)
        self._checkpoints.pop(stream_id, None)
        self._prompt_goals.pop(stream_id, None)
        return self._unregister(stream_id)

    def close(self, stream_id: str) -> None:
        task = self._tasks.get(stream_id)
        self._forget(stream_id)
        if task is not None:
            task.cancel()
        self._send("close", stream_id)

    def set_prompt(self, stream_id: str, prompt: str) -> None:
        goal = self._prompt_goals.get(stream_id)
        if goal is not None:
            self._prompt_goals[stream_id] = (prompt, goal[1] + 1)
        self._send("prompt", stream_id, prompt)

    def set_steps(self, stream_id: str, steps: int) -> None:
        self._send("steps", stream_id, steps)

    def consumed(self, stream_id: str) -> None:
        self._send("consumed", stream_id)

    def _send(self, kind: str, stream_id: str, value=None) -> None:
        """A control to the replica holding the stream; fire and forget (failures surface in the stream)."""
        try:
            self.handle.control.remote(kind, stream_id, value)
        except Exception:  # noqa: BLE001 - the replica is gone: its streams are being moved
            log.warning("%s: control %s not delivered", self.app, kind)

    # capacity, health, lifecycle ------------------------------------------------------------------------

    def max_streams(self, fps: float, steps: int) -> int:
        return int(self._status.frame_rate.get(steps, 0.0) / fps)

    def predicted_chunk_latency(self, steps: int) -> float:
        return self._status.chunk_latency.get(steps, 0.0)

    def probe(self, timeout_s: float) -> bool:
        """Readiness from the replica's own Serve health check (a real forward on every stage), plus the
        capacity figures and metric updates it has gathered since the last call. Called off the loop."""
        try:
            status = self.handle.status.remote().result(timeout_s=max(timeout_s, 1.0))
        except Exception:  # noqa: BLE001 - unreachable or restarting
            self.healthy = False
            return False
        self._status = status
        replay(self.metrics, status.events)
        self.broken = self.broken or status.broken
        self.healthy = status.healthy and not status.broken
        return self.healthy

    def hand_off(self, timeout_s: float) -> None:
        """An operator's drain: the replica finishes what is in flight, then every stream moves."""
        self.draining = True
        self.handle.hand_off.remote(timeout_s).result(timeout_s=timeout_s + 5)

    def stage_actors(self) -> list:
        return self.handle.stage_actors.remote().result(timeout_s=30)

    def pid(self) -> int:
        """The replica process (fault-injection tests)."""
        return self.handle.pid.remote().result(timeout_s=30)

    def shutdown(self) -> None:
        from ray import serve

        for task in list(self._tasks.values()):
            self.loop.call_soon_threadsafe(task.cancel)
        try:
            serve.delete(self.app)  # its replica process, and with it the stage actors it owns
        except Exception:  # noqa: BLE001 - Serve itself is going away
            log.warning("could not delete %s", self.app)


def prompt_catch_up(goal: tuple[str, int], checkpoint) -> tuple[str, int] | None:
    """(prompt, n): the switches a stream's controls asked for that its checkpoint (None: nothing yet,
    revision 0) does not hold; replayed on the new replica so revisions match the server's."""
    prompt, revision = goal
    missing = revision - (checkpoint.revision if checkpoint is not None else 0)
    return (prompt, missing) if missing > 0 else None


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
