"""The fleet loop over fake replicas: what is out of service (draining or broken) is retired once empty and
replaced, starts are counted from the moment they are decided and finished (or shut down) before the service
stops, readiness and moved streams count only replicas in service."""

import asyncio
import dataclasses
import threading
from types import SimpleNamespace

from orchestrator.app import Service
from orchestrator.autoscale import AutoscalePolicy
from orchestrator.config import AutoscalingConfig
from orchestrator.replica_client import StreamRecord
from orchestrator.server import StreamService
from tests.integration.test_server import service_config
from tests.unit.orchestrator.test_replica_client import FakeClient, spec
from workers.core_messages import CoreStats


class Replica(FakeClient):
    """A fake replica: ``streams`` open, ``broken`` / ``draining`` / ``healthy`` as set."""

    def __init__(self, broken=False, draining=False, healthy=True, capacity=4):
        super().__init__({s: capacity for s in range(1, 9)})
        self._broken, self.draining, self.healthy = broken, draining, healthy
        self.shut = False

    @property
    def broken(self):
        return self._broken

    def probe(self, timeout_s):
        return self.healthy

    def shutdown(self):
        self.shut = True


def service(replicas, autoscaling=None):
    cfg = dataclasses.replace(service_config(), replicas=len(replicas), autoscaling=autoscaling)
    svc = Service(cfg)
    svc.replicas = list(replicas)
    started = []

    async def add(counted=False):  # in place of building one: counted as Service._add_replica does
        started.append(True)
        svc._starting -= counted
        svc.replicas.append(Replica())

    svc._add_replica = add
    return svc, started


def test_a_broken_replica_with_no_streams_is_retired_and_replaced():
    """Broken after repeated failures, its streams failed (not moved): nothing left on it, it leaves the fleet
    and a replacement starts; while it is there, admission and moves do not count it as in service."""
    broken = Replica(broken=True)
    svc, started = service([broken])
    assert not broken.in_service
    svc.metrics.export_core_stats(CoreStats(inflight=2), broken.index)

    async def step():
        await svc._retire()
        svc._repair()
        await asyncio.sleep(0)  # the replacement's task runs

    asyncio.run(step())
    assert broken.shut and broken not in svc.replicas
    for name in ("streamgen_stage_microbatches_inflight", "streamgen_stage_queue_depth"):  # its series went too
        assert svc.metrics.registry.get_sample_value(name, {"replica": "0"}) is None
    assert started == [True] and len(svc.replicas) == 1 and svc._starting == 0


def test_repair_and_the_autoscaler_start_one_replica_for_one_missing():
    """An operator drained one of two (min_replicas 2): the repair step starts a replacement, and the
    autoscaler's decision in the same fleet step counts it as starting instead of starting another."""
    auto = AutoscalingConfig(min_replicas=2, max_replicas=4)
    draining = Replica(draining=True)
    draining.open("s", spec(), lambda item: None)  # still holds a stream: not retired yet
    svc, started = service([Replica(), draining], autoscaling=auto)
    svc.servicer = SimpleNamespace(capacity_refusals=0)

    async def step():
        await svc._retire()
        svc._repair()
        svc._scale(AutoscalePolicy(auto), 0)
        await asyncio.sleep(0)

    asyncio.run(step())
    assert started == [True]


def test_readiness_counts_only_replicas_in_service():
    """A replica that drains still passes its probe, but admission places nothing on it: with no other, the
    service is not ready."""
    readiness = []

    async def set_ready(ready):
        readiness.append(ready)

    svc, _ = service([Replica(draining=True)])
    svc.servicer = SimpleNamespace(set_ready=set_ready)
    asyncio.run(svc._probe_once())
    svc.replicas.append(Replica())
    asyncio.run(svc._probe_once())
    assert readiness == [False, True]


def test_a_moved_stream_goes_to_a_healthy_replica_in_service():
    """The replica with the most headroom fails its probe (a hung stage, a rebuild): a stream that leaves
    another replica goes where admission would place it, on the healthy one."""
    source, unhealthy, healthy = Replica(), Replica(healthy=False, capacity=8), Replica()
    svc, _ = service([source, unhealthy, healthy])
    record = StreamRecord("s", spec(), lambda item: None, 0.25, "a fox", steps=4)
    svc._rehome(source, [record])
    assert healthy.holds("s") and not unhealthy.holds("s")


def test_a_stream_that_ends_while_it_moves_is_not_left_on_its_new_replica():
    """The client cancelled between the stream leaving its replica (an engine thread) and the move reaching the
    server: its end closed it on the old replica, which no longer held it, so the move closes it on the new."""
    source, target = Replica(), Replica()
    svc, _ = service([source, target])
    svc.servicer = StreamService(svc.cfg, svc.replicas, svc.metrics, health_servicer=None)  # holds no stream "s"
    record = StreamRecord("s", spec(), lambda item: None, 0.25, "a fox", steps=4)
    svc._rehome(source, [record])
    assert not target.holds("s") and target.active() == 0


def test_a_replica_still_being_built_when_the_service_stops_is_shut_down(monkeypatch):
    """A replacement still starting when the service stops (SIGTERM during a repair): stop waits for it and
    shuts it down; it is never left running (with Serve, an application holding the cluster's slots)."""
    from orchestrator import replica_client_local

    building, release, made = threading.Event(), threading.Event(), []

    class Slow(Replica):
        def __init__(self, cfg, metrics, index):
            super().__init__()
            made.append(self)
            building.set()
            release.wait(10)

    monkeypatch.setattr(replica_client_local, "LocalReplicaClient", Slow)
    svc = Service(dataclasses.replace(service_config(), replicas=1))

    async def run():
        svc._launch(repair=True)
        await asyncio.get_running_loop().run_in_executor(None, building.wait, 10)
        stopping = asyncio.create_task(svc.stop())
        await asyncio.sleep(0.05)
        release.set()
        await stopping

    asyncio.run(run())
    assert made and made[0].shut and not svc.replicas
