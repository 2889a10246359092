"""The asyncio shell: taskset owners, the hub of connections, liveness timers, recovery."""
