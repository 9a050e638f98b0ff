"""ServeReplicaClient's start: an application that deployed but does not answer is deleted (its replica process
and its stage actors with it), not left holding the cluster's slots. Serve's public functions stand in for a
cluster here; the deployment itself is tested against a real Serve in tests/integration/test_serve.py."""

import asyncio
import dataclasses

import pytest

serve = pytest.importorskip("ray.serve")

from orchestrator.metrics import Metrics  # noqa: E402
from orchestrator.replica_client_serve import ServeReplicaClient  # noqa: E402
from tests.integration.test_server import service_config  # noqa: E402


def test_an_application_that_deploys_but_does_not_answer_is_deleted(monkeypatch):
    cfg = dataclasses.replace(service_config(), replica_host="serve")
    deleted = []
    monkeypatch.setattr(serve, "run", lambda app, name, route_prefix: None)  # it deployed

    def unreachable(name):
        raise RuntimeError(f"{name}: no handle (injected)")

    monkeypatch.setattr(serve, "get_app_handle", unreachable)
    monkeypatch.setattr(serve, "delete", deleted.append)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="no handle"):
            ServeReplicaClient(cfg, Metrics(), 7, loop)
    finally:
        loop.close()
    assert deleted == ["streamgen-pipeline-7"]
