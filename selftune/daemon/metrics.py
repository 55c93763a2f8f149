"""Prometheus metrics of one daemon, on a registry of its own (served as text at ``/metrics``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["DaemonMetrics"]


class _QueueDepth(Collector):
    """Goals per status, read from the queue at scrape time (so it is right after a restart too)."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        family = GaugeMetricFamily("selftune_goals", "Goals in the queue by status.", labels=["status"])
        for status, count in self._counts().items():
            family.add_metric([status], count)
        yield family


class DaemonMetrics:
    def __init__(self, queue_counts: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_QueueDepth(queue_counts))
        self.submitted = Counter("selftune_goals_submitted", "Goals accepted by the API.", registry=self.registry)
        self.finished = Counter("selftune_goals_finished", "Goals that reached a final status.", ["status"],
                                registry=self.registry)
        self.goal_seconds = Histogram("selftune_goal_seconds", "Wall time of goal runs.", registry=self.registry,
                                      buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.requests = Counter("selftune_http_requests", "HTTP requests by route and status code.",
                                ["method", "route", "code"], registry=self.registry)
        self.tune_runs = Counter("selftune_tune_runs", "Tuning runs by outcome.", ["outcome"], registry=self.registry)
        self.adapter_switches = Counter("selftune_adapter_switches", "Adapter hot swaps between goals.",
                                        registry=self.registry)
        self.job_runs = Counter("selftune_job_runs", "Scheduled job runs by job and outcome.", ["job", "outcome"],
                                registry=self.registry)
        self.ready = Gauge("selftune_ready", "1 once the model is loaded and workers take goals.",
                           registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
