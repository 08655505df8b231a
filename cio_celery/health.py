"""One health report for the Django view, the Flask blueprint, the CLI and Prometheus.

Healthy means: the store answers, the breaker is closed, and this host's spool is empty (the
broker takes operations). Dead letters and parked operations are reported, not judged: a
dead letter is an operation waiting for a human, not a sick system; thresholds can be given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from .breaker import breaker_for
from .deadletters import DeadLetters
from .fallback import Fallback
from .idempotency import Claims
from .settings import Settings, settings_for_app
from .spool import spool_depth

__all__ = ["HealthReport", "health_report"]


@dataclass(frozen=True)
class HealthReport:
    healthy: bool
    problems: list[str]
    breaker: dict[str, Any] | None
    fallback_depth: int | None
    dead_letters: int | None
    spool_depth: int | None
    suppressed_duplicates: dict[str, int] = field(default_factory=dict)

    @property
    def http_status(self) -> int:
        return 200 if self.healthy else 503

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.healthy else "unhealthy",
            "healthy": self.healthy,
            "problems": list(self.problems),
            "breaker": self.breaker,
            "fallback_depth": self.fallback_depth,
            "dead_letters": self.dead_letters,
            "spool_depth": self.spool_depth,
            "suppressed_duplicates": dict(self.suppressed_duplicates),
        }


def health_report(
    app: Any,
    settings: Settings | None = None,
    *,
    max_dead_letters: int | None = None,
    max_fallback_depth: int | None = None,
) -> HealthReport:
    """Read the shared state (a few Redis reads) and judge it. Never raises."""
    s = settings or settings_for_app(app)
    problems: list[str] = []
    breaker: dict[str, Any] | None = None
    fallback_depth = dead = None
    suppressed: dict[str, int] = {}
    try:
        if s.breaker_enabled:
            status = breaker_for(s).status()
            breaker = {
                "name": status.name,
                "state": status.state,
                "time_left": None if status.time_left < 0 else round(status.time_left, 3),
                "opened_by_hand": status.state == "open" and status.time_left < 0,
                "trips": status.trips,
                "consecutive_failures": status.consecutive_failures,
                "probes_in_flight": status.probes_in_flight,
            }
            if status.state != "closed":
                problems.append(f"breaker {status.state}")
        fallback_depth = Fallback(s, app).depth()
        dead = DeadLetters(s, app).count()
        suppressed = Claims(s).suppressed()
    except (redis.RedisError, OSError) as exc:
        problems.append(f"store unavailable ({type(exc).__name__})")
    if max_dead_letters is not None and dead is not None and dead > max_dead_letters:
        problems.append(f"{dead} dead letters (more than {max_dead_letters})")
    if max_fallback_depth is not None and fallback_depth is not None and fallback_depth > max_fallback_depth:
        problems.append(f"{fallback_depth} parked operations (more than {max_fallback_depth})")
    spooled: int | None
    try:
        spooled = spool_depth(app)
    except Exception as exc:  # noqa: BLE001 - a health check reports, it does not raise
        spooled = None
        problems.append(f"spool unreadable ({type(exc).__name__})")
    if spooled:
        problems.append(f"{spooled} operations spooled locally (broker unreachable from this host)")
    return HealthReport(
        healthy=not problems,
        problems=problems,
        breaker=breaker,
        fallback_depth=fallback_depth,
        dead_letters=dead,
        spool_depth=spooled,
        suppressed_duplicates=suppressed,
    )
