"""The lock-free latency histogram: Prometheus's bucket rules (upper bounds inclusive, cumulative counts)."""

from __future__ import annotations

from prometheus_client import generate_latest

from coordinator.runtime.metrics import Metrics


def series(text: str, method: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("testfleet_rpc_seconds") and f'method="{method}"' in line:
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_buckets_are_cumulative_and_bounds_inclusive() -> None:
    metrics = Metrics()
    latency = metrics.rpc_latency.labels("finish_trial")
    assert metrics.rpc_latency.labels("finish_trial") is latency
    for seconds in (0.0001, 0.0005, 0.0006, 0.004, 7.0):
        latency.observe(seconds)
    text = generate_latest(metrics.registry).decode()
    got = series(text, "finish_trial")
    assert got['testfleet_rpc_seconds_bucket{le="0.0005",method="finish_trial"}'] == 2  # 0.0005 counts as <= 0.0005
    assert got['testfleet_rpc_seconds_bucket{le="0.001",method="finish_trial"}'] == 3
    assert got['testfleet_rpc_seconds_bucket{le="0.005",method="finish_trial"}'] == 4
    assert got['testfleet_rpc_seconds_bucket{le="5.0",method="finish_trial"}'] == 4
    assert got['testfleet_rpc_seconds_bucket{le="+Inf",method="finish_trial"}'] == 5
    assert got['testfleet_rpc_seconds_count{method="finish_trial"}'] == 5
    assert abs(got['testfleet_rpc_seconds_sum{method="finish_trial"}'] - 7.0052) < 1e-9
    assert "# TYPE testfleet_rpc_seconds histogram" in text


def test_methods_are_series_of_their_own() -> None:
    metrics = Metrics()
    metrics.rpc_latency.labels("a").observe(0.01)
    metrics.rpc_latency.labels("b").observe(0.02)
    metrics.rpc_latency.labels("b").observe(0.03)
    text = generate_latest(metrics.registry).decode()
    assert series(text, "a")['testfleet_rpc_seconds_count{method="a"}'] == 1
    assert series(text, "b")['testfleet_rpc_seconds_count{method="b"}'] == 2
