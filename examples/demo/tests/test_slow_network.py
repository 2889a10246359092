"""The slowest file (about 3 s): the one a second run starts first."""

import time


def test_handshake() -> None:
    time.sleep(1.5)
    assert True


def test_retry_with_backoff() -> None:
    delays = [0.5, 1.0]
    for delay in delays:
        time.sleep(delay)
    assert sum(delays) == 1.5
