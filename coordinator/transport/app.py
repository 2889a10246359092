"""The aiohttp application: every route, and the runtime it serves started and stopped with it."""

from __future__ import annotations

import importlib.resources
from collections.abc import AsyncIterator
from pathlib import Path

import prometheus_client
from aiohttp import web

from coordinator.runtime.coordinator import Coordinator, RuntimeSettings
from coordinator.runtime.hub import Hub
from coordinator.runtime.metrics import Metrics
from coordinator.store.store import Store
from coordinator.transport import api, bundles, keys
from coordinator.transport.liveness import Liveness
from coordinator.transport.rpc import Dispatcher, Tokens, rpc_view
from coordinator.transport.ws import ws_view


async def healthz(request: web.Request) -> web.StreamResponse:
    coordinator: Coordinator = request.app[keys.COORDINATOR]
    database = await coordinator.store.ping()
    body = {"status": "ok" if database else "degraded", "database": database}
    return web.json_response(body, status=200 if database else 503)


async def metrics_view(request: web.Request) -> web.StreamResponse:
    coordinator: Coordinator = request.app[keys.COORDINATOR]
    metrics = coordinator.metrics
    for role, count in coordinator.hub.counts_by_role().items():
        metrics.connections.labels(role).set(count)
    body = prometheus_client.generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


def static_dir() -> Path:
    return Path(str(importlib.resources.files("coordinator").joinpath("static")))


async def index(request: web.Request) -> web.StreamResponse:
    page = static_dir() / "index.html"
    if not page.exists():
        return web.Response(text="testfleet coordinator: the dashboard is not built into this version.\n")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


def build_app(
    store: Store,
    *,
    tokens: Tokens | None = None,
    bundle_dir: Path,
    settings: RuntimeSettings | None = None,
) -> web.Application:
    """The coordinator's app on an open store; the runtime starts and stops with the app."""
    app = web.Application(client_max_size=bundles.MAX_BUNDLE_BYTES)
    metrics = Metrics()
    hub = Hub()
    coordinator = Coordinator(store, hub, metrics, settings)
    app[keys.COORDINATOR] = coordinator
    app[keys.DISPATCHER] = Dispatcher(coordinator)
    app[keys.TOKENS] = tokens or Tokens()
    app[keys.BUNDLES] = bundles.Bundles(bundle_dir)
    liveness = app[keys.LIVENESS] = Liveness(coordinator.settings.heartbeat_s)

    async def runtime(app: web.Application) -> AsyncIterator[None]:
        store._observe = metrics.observe_commit
        await store.start()
        await coordinator.start()
        liveness.start()
        yield
        await liveness.stop()
        await coordinator.close()
        await store.close()

    app.cleanup_ctx.append(runtime)

    async def close_sockets(app: web.Application) -> None:
        for conn in list(hub.connections.values()):
            conn.close()

    app.on_shutdown.append(close_sockets)
    app.router.add_get("/ws", ws_view)
    app.router.add_post("/rpc", rpc_view)
    api.add_routes(app)
    bundles.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/", index)
    static = static_dir()
    if static.exists():
        app.router.add_static("/static/", static, follow_symlinks=False)
    return app
