"""The `testfleet` command."""
