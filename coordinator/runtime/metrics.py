"""Prometheus metrics of one coordinator, in a registry of its own."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LatencyHistogram:
    """One series of a `LatencyHistograms`: a bucket count per upper bound (and one past the last), and a sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


class LatencyHistograms:
    """A labelled histogram observed on every call: plain counters, no lock (the coordinator is one thread).

    It costs a fraction of a locked histogram per observation; Prometheus reads the same
    `_bucket`/`_count`/`_sum` series from it.
    """

    def __init__(self, name: str, documentation: str, label: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = bounds
        self._series: dict[str, LatencyHistogram] = {}

    def labels(self, value: str) -> LatencyHistogram:
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = LatencyHistogram(self.bounds)
        return series

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, series in self._series.items():
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip((*self.bounds, float("inf")), series.counts, strict=True):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            family.add_metric([value], buckets, series.total)
        yield family


class PlainCounter:
    """A counter bumped on the hot path: a plain integer (no lock; the coordinator is one thread)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "testfleet_connections", "Open /ws connections by role.", ["role"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "testfleet_queue_depth", "Queued tasks per active taskset.", ["taskset_id"], registry=self.registry
        )
        self.rpc_latency = LatencyHistograms(
            "testfleet_rpc_seconds",
            "Time from request to reply, per method (dequeue_task includes its wait).",
            "method",
            _LATENCY_BUCKETS,
        )
        self.registry.register(self.rpc_latency)
        self.rpc_errors = Counter(
            "testfleet_rpc_errors", "Error replies per JSON-RPC code.", ["code"], registry=self.registry
        )
        self.commit_latency = Histogram(
            "testfleet_commit_seconds", "Group commit duration.", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.commit_writes = Counter("testfleet_commit_writes", "Statements committed.", registry=self.registry)
        self.notification_lag = Histogram(
            "testfleet_notification_lag_seconds",
            "From a command's arrival to its notifications being queued for listeners.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.leases = PlainCounter("testfleet_leases", "Tasks handed out by dequeue_task.")
        self.registry.register(self.leases)

    def observe_commit(self, seconds: float, writes: int) -> None:
        self.commit_latency.observe(seconds)
        self.commit_writes.inc(writes)
