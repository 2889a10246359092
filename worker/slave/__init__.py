"""What runs inside a slave process: the queue-driven pytest plugin and the per-file command runner."""
