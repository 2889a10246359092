"""`testfleet worker`: the daemon that syncs code, runs setup and keeps N slaves busy."""
