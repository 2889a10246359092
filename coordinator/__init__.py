"""The coordinator: pure core, Postgres store, asyncio runtime, aiohttp transport and the CLI."""
