"""Workarounds for library versions, each with its reason and when to remove it.

Only code that depends on a library's private behaviour goes here, so there is one place to look when
upgrading Ray.
"""

from __future__ import annotations

import os


def loopback_serve_replica_grpc() -> None:
    """Bind a Ray Serve replica's inter-deployment gRPC server to 127.0.0.1 on a loopback-only Ray.

    Why: Ray 2.60's ``Replica._on_initialized`` (``ray/serve/_private/replica.py``) calls
    ``add_port_to_grpc_server(self._server, "[::]:0")`` with the address hard-coded: no ``serve.start``,
    ``http_options``/``grpc_options`` field, deployment option or ``RAY_SERVE_*`` variable changes it, so
    every Serve replica listens on every interface. On streamgen's own local Ray (bound to loopback:
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, inherited by replica processes) nothing off this machine may
    reach it, so the name that module imported is wrapped to bind 127.0.0.1 instead. On a real cluster
    (variable unset) nothing changes: other nodes must reach the replicas.

    Called by the deployment's constructor, which Serve runs before ``_on_initialized`` opens the port.
    Remove when Ray Serve lets the replica's gRPC bind address be configured (check each Ray upgrade:
    ``grep -n '"\\[::\\]:0"' ray/serve/_private/replica.py``).
    """
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
