"""Per-tenant stream quotas (torch-, ray- and grpc-free; tested with a fake clock).

Two limits per tenant (``tenants`` in the config): streams running at once, and streams started in any
60 s window. A start over either is refused with RESOURCE_EXHAUSTED "quota" and a ``retry-after-ms`` hint;
other tenants' counts are separate, so they are unaffected. Tenants come from the tokens file, so the
tables are bounded by it. An open server (no tokens file) has one anonymous tenant, everyone: no quota
applies to it (``enforce`` False), only the server-wide limits and admission.
"""

from __future__ import annotations

import math
from collections import deque

from orchestrator.clock import Clock
from orchestrator.config import TenantsConfig
from orchestrator.types import Rejection, RequestError

WINDOW_S = 60.0


class TenantQuotas:
    def __init__(self, tenants: TenantsConfig, clock: Clock, retry_after_ms: int, enforce: bool = True):
        self.tenants, self.clock, self.retry_after_ms, self.enforce = tenants, clock, retry_after_ms, enforce
        self._active: dict[str, int] = {}
        self._starts: dict[str, deque[float]] = {}

    def check(self, tenant: str) -> None:
        """Raise RequestError(QUOTA) if ``tenant`` may not start a stream now. Call ``started`` once the
        stream is admitted (with no await in between, so the check still holds)."""
        if not self.enforce:
            return
        quota = self.tenants.quota(tenant)
        if self._active.get(tenant, 0) >= quota.max_streams:
            raise RequestError(Rejection.QUOTA, f"quota: tenant has {quota.max_streams} streams running, its "
                                                f"maximum", self.retry_after_ms)
        starts = self._window(tenant)
        if len(starts) >= quota.starts_per_minute:
            wait_s = starts[0] + WINDOW_S - self.clock.now()
            raise RequestError(Rejection.QUOTA, f"quota: tenant started {quota.starts_per_minute} streams in the "
                                                f"last minute, its maximum", max(1, math.ceil(wait_s * 1000)))

    def started(self, tenant: str) -> None:
        self._active[tenant] = self._active.get(tenant, 0) + 1
        if self.enforce:  # only check() reads the window, and prunes it: unchecked, it would only grow
            self._starts.setdefault(tenant, deque()).append(self.clock.now())

    def ended(self, tenant: str) -> None:
        left = self._active.get(tenant, 0) - 1
        if left > 0:
            self._active[tenant] = left
        else:
            self._active.pop(tenant, None)

    def active(self, tenant: str) -> int:
        return self._active.get(tenant, 0)

    def _window(self, tenant: str) -> deque[float]:
        """The tenant's starts in the last minute (older ones dropped: the deque stays at most the quota)."""
        starts = self._starts.get(tenant)
        if starts is None:
            return deque()
        horizon = self.clock.now() - WINDOW_S
        while starts and starts[0] <= horizon:
            starts.popleft()
        if not starts:
            del self._starts[tenant]
        return starts
