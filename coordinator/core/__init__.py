"""Pure, synchronous, clock-free domain logic: statuses, verdicts, queue order, leases, dispatch."""
