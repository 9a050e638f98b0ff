"""Audit lines and rate-limited logging (grpc-free).

Each stream start and each stream end writes exactly one structured line on the ``streamgen.audit``
logger: a JSON object with the event, the request id, the tenant, the outcome and the duration. It never
carries a prompt, a token or frame bytes. Auth failures are logged through ``RateLimitedLog`` so a flood of
bad requests cannot flood the log.
"""

from __future__ import annotations

import json
import logging

from orchestrator.clock import Clock

audit_log = logging.getLogger("streamgen.audit")


def audit(event: str, request_id: str, tenant: str, outcome: str, duration_s: float = 0.0,
          stream_id: str = "") -> None:
    """One structured line: ``event`` is stream_start or stream_end; ``outcome`` admitted, rejected:<reason>
    or the end reason."""
    audit_log.info(json.dumps({"event": event, "request_id": request_id, "tenant": tenant, "outcome": outcome,
                               "duration_s": round(duration_s, 3), "stream_id": stream_id}, sort_keys=True))


class RateLimitedLog:
    """At most ``burst`` lines per ``interval_s``; the first line after a quiet spell says how many
    were suppressed meanwhile."""

    def __init__(self, logger: logging.Logger, clock: Clock, burst: int = 5, interval_s: float = 10.0):
        self.logger, self.clock, self.burst, self.interval_s = logger, clock, burst, interval_s
        self._window_start = -float("inf")
        self._lines = 0
        self.suppressed = 0

    def warning(self, msg: str, *args) -> bool:
        """Log unless over the limit; True if logged."""
        now = self.clock.now()
        if now - self._window_start >= self.interval_s:
            self._window_start, self._lines = now, 0
        if self._lines >= self.burst:
            self.suppressed += 1
            return False
        self._lines += 1
        if self.suppressed:
            msg, args = msg + " (%d similar suppressed)", (*args, self.suppressed)
            self.suppressed = 0
        self.logger.warning(msg, *args)
        return True
