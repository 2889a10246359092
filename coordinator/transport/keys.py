"""Typed keys of what the app holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from coordinator.runtime.coordinator import Coordinator
    from coordinator.transport.bundles import Bundles
    from coordinator.transport.liveness import Liveness
    from coordinator.transport.rpc import Dispatcher, Tokens

COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator")
DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher")
TOKENS: web.AppKey[Tokens] = web.AppKey("tokens")
BUNDLES: web.AppKey[Bundles] = web.AppKey("bundles")
LIVENESS: web.AppKey[Liveness] = web.AppKey("liveness")
