"""aiohttp: /ws, /rpc, /api/v1, bundles, /metrics, /healthz and the dashboard's files."""
