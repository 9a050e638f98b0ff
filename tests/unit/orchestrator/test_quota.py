"""Per-tenant quotas and the rate-limited log, with a fake clock."""

import logging

import pytest

from orchestrator.audit import RateLimitedLog
from orchestrator.clock import FakeClock
from orchestrator.config import TenantQuota, TenantsConfig
from orchestrator.quota import TenantQuotas
from orchestrator.types import Rejection, RequestError


def quotas(clock):
    tenants = TenantsConfig(default=TenantQuota(max_streams=2, starts_per_minute=100),
                            by_tenant={"slow": TenantQuota(max_streams=100, starts_per_minute=3)})
    return TenantQuotas(tenants, clock, retry_after_ms=1000)


def refusal(q, tenant) -> RequestError:
    with pytest.raises(RequestError) as err:
        q.check(tenant)
    assert err.value.reason is Rejection.QUOTA and err.value.message.startswith("quota")
    return err.value


def test_concurrent_streams_per_tenant():
    q = quotas(FakeClock())
    for _ in range(2):
        q.check("a")
        q.started("a")
    assert refusal(q, "a").retry_after_ms == 1000
    q.check("b")  # another tenant is unaffected
    q.ended("a")
    q.check("a")
    assert q.active("a") == 1


def test_starts_per_minute_is_a_sliding_window_with_an_exact_retry_hint():
    clock = FakeClock()
    q = quotas(clock)
    for step in (0.0, 10.0, 20.0):  # three starts at t0, t0+10, t0+20
        clock.advance(step and 10.0)
        q.check("slow")
        q.started("slow")
        q.ended("slow")
    clock.advance(5.0)  # t0+25: the first start leaves the window at t0+60
    assert refusal(q, "slow").retry_after_ms == 35_000
    q.check("other")
    clock.advance(35.0)
    q.check("slow")  # the oldest start left the window


def test_an_open_server_enforces_no_tenant_quota_and_keeps_no_record_of_starts():
    """Quotas off: no limit holds, and starts are not recorded (nothing would prune the window: check returns
    early), so the record does not grow with every stream."""
    tenants = TenantsConfig(default=TenantQuota(max_streams=1, starts_per_minute=1))
    q = TenantQuotas(tenants, FakeClock(), retry_after_ms=1000, enforce=False)
    for _ in range(5):
        q.check("")
        q.started("")
    assert q.active("") == 5
    for _ in range(1000):
        q.check("")
        q.started("")
        q.ended("")
    assert q.active("") == 5 and not q._starts.get("")


def test_the_rate_window_keeps_at_most_the_quota():
    clock = FakeClock()
    q = quotas(clock)
    for _ in range(500):
        try:
            q.check("slow")
        except RequestError:
            clock.advance(7.0)
            continue
        q.started("slow")
        q.ended("slow")
    assert len(q._starts["slow"]) <= 3 and q.active("slow") == 0


def test_rate_limited_log_caps_lines_per_interval_and_reports_the_suppressed(caplog):
    clock = FakeClock()
    limited = RateLimitedLog(logging.getLogger("t.limited"), clock, burst=3, interval_s=10.0)
    with caplog.at_level(logging.WARNING, logger="t.limited"):
        sent = [limited.warning("refused %s", i) for i in range(100)]
        clock.advance(10.0)
        limited.warning("refused %s", "later")
    assert sum(sent) == 3
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "refused 1", "refused 2",
                                                        "refused later (97 similar suppressed)"]
