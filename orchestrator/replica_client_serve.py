"""ServeReplicaClient: the engine core runs inside a Ray Serve replica process (``replica_host: serve``;
the deployment is ``orchestrator.deployment.PipelineDeployment``, one Serve application per pipeline replica).

Each stream is one long-lived streaming ``generate`` call; its controls go through ``control`` on the same
application handle, so they reach the core that holds its caches. Every frame batch brings the stream's
checkpoint; the latest is kept, so when the replica process dies its streams continue on another replica.
The core's stats come back with its outputs (and with each probe's status) and are exported here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from orchestrator.config import ServiceConfig
from orchestrator.deployment import CoreStatus, PipelineDeployment, deployment_options
from orchestrator.metrics import Metrics
from orchestrator.replica_client import ReplicaClient, StreamRecord
from workers.core_messages import CloseStream, Consumed, ControlMessage, FrameBatch, StreamEvicted, StreamFailed
from workers.executor import StageFailure

log = logging.getLogger("streamgen.replica_client_serve")
LOSS_INCIDENT_S = 5.0  # stream calls that fail within this of each other: one lost replica process


class ServeReplicaClient(ReplicaClient):
    def __init__(self, cfg: ServiceConfig, metrics: Metrics, index: int, loop: asyncio.AbstractEventLoop):
        """Deploys the application and waits for it (blocking: call it off the event loop); its stream
        calls run as tasks on ``loop``."""
        super().__init__(index)
        from ray import serve

        self.cfg, self.metrics, self.loop = cfg, metrics, loop
        self.app = f"streamgen-pipeline-{index}"
        self._broken = False
        self._tasks: dict[str, asyncio.Task] = {}
        self._last_loss = -1e9
        self._deploy(cfg.parallel.placement_timeout_s)
        try:
            self.handle = serve.get_app_handle(self.app)
            self._status: CoreStatus = self.handle.status.remote().result(timeout_s=60)
        except BaseException:  # deployed but not answering: nobody else would delete it (and free its slots)
            serve.delete(self.app)
            raise

    def _deploy(self, timeout_s: float) -> None:
        """serve.run waits until the application runs, without a bound: run it on a thread and give up
        after ``timeout_s`` (no free slots for its bundles)."""
        from ray import serve

        app = serve.deployment(PipelineDeployment, name="PipelineDeployment",
                               **deployment_options(self.cfg)).bind(self.cfg, self.index)
        done, failure = threading.Event(), []

        def run():
            try:
                serve.run(app, name=self.app, route_prefix=None)
            except Exception as err:  # noqa: BLE001 - reported below, as an unplaceable replica
                failure.append(err)
            finally:
                done.set()

        threading.Thread(target=run, name=f"deploy-{self.app}", daemon=True).start()
        if done.wait(timeout_s) and not failure:
            return
        serve.delete(self.app)
        detail = repr(failure[0]) if failure else f"did not start within {timeout_s:.0f} s"
        raise StageFailure("unplaceable", f"{self.app} {detail}")

    # streams (called on the event loop or the re-homing thread) --------------------------------------

    def consumed(self, stream_id: str) -> None:
        self._send(Consumed(stream_id))

    def _start(self, record: StreamRecord) -> None:
        messages = record.start_messages()

        def create():
            self._tasks[record.stream_id] = self.loop.create_task(self._pump(record.stream_id, messages))

        if _on_loop(self.loop):
            create()
        else:
            self.loop.call_soon_threadsafe(create)

    def _stop(self, stream_id: str) -> None:
        task = self._tasks.pop(stream_id, None)
        if task is not None:
            self.loop.call_soon_threadsafe(task.cancel)
        self._send(CloseStream(stream_id))

    def _send(self, msg: ControlMessage) -> None:
        try:
            self.handle.control.remote(msg)
        except Exception:  # noqa: BLE001 - the replica is gone: its streams are being moved
            log.warning("%s: %s not delivered", self.app, type(msg).__name__, exc_info=True)

    async def _pump(self, stream_id: str, messages: list[ControlMessage]) -> None:
        """The stream's call: frame batches to its sink; a failure ends it; an eviction or a lost process
        moves it elsewhere."""
        call = self.handle.options(stream=True).generate.remote(stream_id, messages)
        checkpoint = None
        try:
            async for item in call:
                if item.stats is not None:
                    self.metrics.export_core_stats(item.stats, self.index)
                record = self._record(stream_id)
                if record is None:  # closed meanwhile
                    return
                match item:
                    case FrameBatch():
                        if item.checkpoint is not None:
                            record.checkpoint, item.checkpoint = item.checkpoint, None
                        item.ready_at = time.monotonic()  # this process's clock: the replica may be elsewhere
                        record.sink(item)
                    case StreamFailed():
                        self._fail(stream_id, item)
                        return
                    case StreamEvicted():  # drained, or its stages cannot be rebuilt: out of service
                        self.draining = True
                        checkpoint = item.checkpoint
                        break
            else:
                return
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - the replica process died or was restarted
            log.warning("%s lost stream %s: %s", self.app, stream_id[:8], type(err).__name__, exc_info=True)
            now = time.monotonic()
            if now - self._last_loss > LOSS_INCIDENT_S:  # one incident, however many streams it took down
                self.metrics.engine_errors.labels("replica_lost").inc()
            self._last_loss = now
        finally:
            if self._tasks.get(stream_id) is asyncio.current_task():
                self._tasks.pop(stream_id)
        self._send_away(stream_id, checkpoint)

    # capacity, health, lifecycle ---------------------------------------------------------------------

    @property
    def broken(self) -> bool:
        return self._broken

    def max_streams(self, fps: float, steps: int, video: bool = False) -> int:
        return self._status.capacity.max_streams(fps, steps, video)

    def predicted_chunk_latency(self, steps: int, video: bool = False) -> float:
        return self._status.capacity.predicted_chunk_latency(steps, video)

    def probe(self, timeout_s: float) -> bool:
        """Readiness from the replica's own Serve health check (a real forward on every stage), plus the
        capacity figures and stats gathered since the last call."""
        try:
            status = self.handle.status.remote().result(timeout_s=max(timeout_s, 1.0))
        except Exception as err:  # noqa: BLE001 - unreachable or restarting
            log.info("%s: no status (%s)", self.app, type(err).__name__, exc_info=True)
            self.healthy = False
            return False
        self._status = status
        for stats in status.stats:
            self.metrics.export_core_stats(stats, self.index)
        self._broken = self._broken or status.broken
        self.healthy = status.healthy and not status.broken
        return self.healthy

    def hand_off(self, timeout_s: float) -> None:
        self.draining = True
        self.handle.hand_off.remote(timeout_s).result(timeout_s=timeout_s + 5)

    def stage_actors(self) -> list:
        return self.handle.stage_actors.remote().result(timeout_s=30)

    def pid(self) -> int:
        """The Serve replica process (fault-injection tests)."""
        return self.handle.pid.remote().result(timeout_s=30)

    def shutdown(self) -> None:
        from ray import serve

        for task in list(self._tasks.values()):
            self.loop.call_soon_threadsafe(task.cancel)
        try:
            serve.delete(self.app)  # its replica process, and with it the stage actors it owns
        except Exception:  # noqa: BLE001 - Serve itself is going away
            log.warning("could not delete %s", self.app, exc_info=True)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
