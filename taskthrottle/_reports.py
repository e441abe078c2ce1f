"""What a limiter and its breakers report, to any object with these methods (the Prometheus
implementation is `taskthrottle.metrics.PrometheusMetrics`)."""

from __future__ import annotations

from typing import Protocol

from taskthrottle._exceptions import StoreError, Throttled


class Metrics(Protocol):
    """What a `Limiter` reports of each acquire and reservation, when given one. Metrics
    with an ``exempt()`` method also hear of each request exempt from its limits (see
    `taskthrottle.Limiter.exempt`); it is optional, so that older metrics still fit."""

    def granted(self, delay: float) -> None:
        """A request was granted, its turn ``delay`` seconds away (0.0: now)."""

    def throttled(self, exc: Throttled) -> None:
        """A request was refused with ``exc``; nothing was charged."""

    def failed(self, exc: StoreError) -> None:
        """The store failed to answer a request."""


class BreakerMetrics(Protocol):
    """What a `Breaker` reports, to its limiter's metrics when they have these methods."""

    def breaker_changed(self, breaker: str, state: str) -> None:
        """Breaker ``breaker`` moved to ``state`` ("closed", "open" or "half-open"); each
        transition is reported once, by the process whose call made it."""

    def breaker_refused(self, breaker: str) -> None:
        """Breaker ``breaker`` refused a call (`BreakerOpen`)."""
