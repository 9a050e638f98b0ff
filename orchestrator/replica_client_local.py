"""LocalReplicaClient: the engine core runs in this process (``replica_host: driver``, the embedded
default). Its stages are in this process too (executor ``inprocess``) or Ray actors (executor ``ray``)."""

from __future__ import annotations

from orchestrator.config import ServiceConfig
from orchestrator.metrics import Metrics
from orchestrator.replica_client import ReplicaClient, StreamRecord
from workers.core import EngineCore
from workers.core_messages import CloseStream, Consumed, ControlMessage, CoreOutput, FrameBatch, StreamEvicted, \
    StreamFailed


class LocalReplicaClient(ReplicaClient):
    def __init__(self, cfg: ServiceConfig, metrics: Metrics, index: int = 0):
        """Builds the core (blocking: stages and calibration): call it off the event loop."""
        super().__init__(index)
        self.cfg, self.metrics = cfg, metrics
        self.core = EngineCore(cfg.generation, cfg.engine, cfg.parallel, self._on_output, index,
                               max_ahead=cfg.server.output_chunks_ahead)

    # streams ---------------------------------------------------------------------------------------

    def consumed(self, stream_id: str) -> None:
        self.core.submit(Consumed(stream_id))

    def _start(self, record: StreamRecord) -> None:
        for msg in record.start_messages():
            self.core.submit(msg)

    def _stop(self, stream_id: str) -> None:
        self.core.submit(CloseStream(stream_id))

    def _send(self, msg: ControlMessage) -> None:
        self.core.submit(msg)

    def _on_output(self, item: CoreOutput) -> None:
        """The core's outputs, on its engine thread."""
        if item.stats is not None:
            self.metrics.export_core_stats(item.stats, self.index)
        match item:
            case FrameBatch():
                record = self._record(item.stream_id)
                if record is not None:
                    record.sink(item)
            case StreamFailed():
                self._fail(item.stream_id, item)
            case StreamEvicted():  # a broken core is out of service through ``broken`` (ReplicaClient.in_service)
                self._send_away(item.stream_id, item.checkpoint)

    # capacity, health, lifecycle ---------------------------------------------------------------------

    @property
    def broken(self) -> bool:
        return self.core.broken

    def max_streams(self, fps: float, steps: int, video: bool = False) -> int:
        return self.core.max_streams(fps, steps, video)

    def predicted_chunk_latency(self, steps: int, video: bool = False) -> float:
        return self.core.predicted_chunk_latency(steps, video)

    def probe(self, timeout_s: float) -> bool:
        self.healthy = self.core.probe(timeout_s)
        self.metrics.export_core_stats(self.core.take_stats(), self.index)
        return self.healthy

    def hand_off(self, timeout_s: float) -> None:
        self.draining = True
        self.core.hand_off(timeout_s)

    def cache_bytes(self) -> list[int]:
        """Cache bytes per stage (tests and the leak check)."""
        return self.core.cache_bytes()

    def shutdown(self) -> None:
        self.core.shutdown()
