"""Prometheus metrics of one coordinator, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "testfleet_connections", "Open /ws connections by role.", ["role"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "testfleet_queue_depth", "Queued tasks per active taskset.", ["taskset_id"], registry=self.registry
        )
        self.rpc_latency = Histogram(
            "testfleet_rpc_seconds",
            "Time from request to reply, per method (dequeue_task includes its wait).",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
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
        self.leases = Counter("testfleet_leases", "Tasks handed out by dequeue_task.", registry=self.registry)

    def observe_commit(self, seconds: float, writes: int) -> None:
        self.commit_latency.observe(seconds)
        self.commit_writes.inc(writes)
