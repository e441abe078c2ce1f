"""What a limiter granted, delayed and refused, for Prometheus to scrape.

    from taskthrottle import Limiter, RedisStore
    from taskthrottle.metrics import PrometheusMetrics

    limiter = Limiter(RedisStore.from_url(url), metrics=PrometheusMetrics())

`Limiter` reports to any object with the three methods of `Metrics`; `PrometheusMetrics`
(``pip install 'taskthrottle[prometheus]'``) keeps them as Prometheus counters and a
histogram. Keys are never labels: a key per tenant would make a series per tenant.
A `Breaker` reports to its limiter's metrics too, when they have the methods of
`BreakerMetrics` (breaker names are labels: there are a handful).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskthrottle._exceptions import InvalidInput, StoreError, Throttled, require
from taskthrottle._reports import BreakerMetrics, Metrics

__all__ = ["BreakerMetrics", "Metrics", "PrometheusMetrics"]

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

#: Upper bounds (seconds) of the delay histogram: from a near-immediate turn to the
#: integrations' default reservation horizon.
DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class PrometheusMetrics:
    """`Metrics` as Prometheus series, registered in ``registry`` (the default one if None):

    - ``<prefix>_requests_total{outcome}``: "granted" (now), "delayed" (a reservation whose
      turn is ahead), "throttled", "failed", or "exempt" (a task whose key callables
      returned `taskthrottle.EXEMPT`: no store call);
    - ``<prefix>_refusals_total{limit}``: the limits that refused, by name;
    - ``<prefix>_delay_seconds``: how far ahead granted turns were;
    - ``<prefix>_breaker_transitions_total{breaker,state}``: breaker transitions, each
      counted once across the fleet (by the process that made it);
    - ``<prefix>_breaker_refusals_total{breaker}``: calls refused by a breaker.

    In Celery's prefork pool each worker process counts for itself: run the worker with
    ``PROMETHEUS_MULTIPROC_DIR`` set, as prometheus_client's multiprocess mode describes.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, prefix: str = "taskthrottle"
    ) -> None:
        require("prometheus_client", "prometheus")
        import prometheus_client as prom

        if not (isinstance(prefix, str) and prefix.isidentifier()):
            raise InvalidInput(f"a metrics prefix must be an identifier, got {prefix!r}")
        where: dict[str, Any] = {} if registry is None else {"registry": registry}
        self.requests = prom.Counter(
            f"{prefix}_requests", "Acquires and reservations, by outcome.", ["outcome"], **where
        )
        self.refusals = prom.Counter(
            f"{prefix}_refusals", "Limits that refused a request, by name.", ["limit"], **where
        )
        self.delay = prom.Histogram(
            f"{prefix}_delay_seconds",
            "Seconds from a granted request to its turn.",
            buckets=DELAY_BUCKETS,
            **where,
        )
        self.transitions = prom.Counter(
            f"{prefix}_breaker_transitions",
            "Circuit breaker transitions, by breaker and new state.",
            ["breaker", "state"],
            **where,
        )
        self.breaker_refusals = prom.Counter(
            f"{prefix}_breaker_refusals",
            "Calls refused by a circuit breaker.",
            ["breaker"],
            **where,
        )
        outcomes = ("granted", "delayed", "throttled", "failed", "exempt")
        self._outcomes = {outcome: self.requests.labels(outcome) for outcome in outcomes}

    def granted(self, delay: float) -> None:
        """Count a grant, and how far ahead its turn is."""
        self._outcomes["delayed" if delay > 0 else "granted"].inc()
        self.delay.observe(delay)

    def throttled(self, exc: Throttled) -> None:
        """Count a refusal, and each limit that refused."""
        self._outcomes["throttled"].inc()
        for name in {v.limit for v in exc.violations}:
            self.refusals.labels(name).inc()

    def failed(self, exc: StoreError) -> None:
        """Count a store failure."""
        self._outcomes["failed"].inc()

    def exempt(self) -> None:
        """Count a request exempt from its limits (see `taskthrottle.Limiter.exempt`)."""
        self._outcomes["exempt"].inc()

    def breaker_changed(self, breaker: str, state: str) -> None:
        """Count a breaker transition."""
        self.transitions.labels(breaker, state).inc()

    def breaker_refused(self, breaker: str) -> None:
        """Count a call a breaker refused."""
        self.breaker_refusals.labels(breaker).inc()
