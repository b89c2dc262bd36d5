"""The gateway's bus clients: one ChatClient per tenant, acting as that tenant's principal.

An API key names a tenant (producers/gateway/auth.py); the gateway answers a key's request
through that tenant's client only, which writes to the tenant's request topic and reads only the
tenant's reply topics. So no key can ever be handed another tenant's reply: the client that
serves it never reads another tenant's topics, and with authentication on the broker refuses it
even to try. Clients start on a tenant's first request (a gateway's keys name a fixed set of
tenants, so their number is bounded) with `as_tenant`, which picks the tenant's stored SCRAM
credentials when this machine has them, and the configured ones otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from infra.secrets import as_tenant
from infra.settings import Settings
from producers.client import ChatClient

log = logging.getLogger(__name__)


class TenantUnavailable(Exception):
    """The tenant's client could not start (its topics are missing, or the broker refused its
    principal); the gateway answers 503 and tries again on the tenant's next request."""


class TenantClients:
    def __init__(
        self, settings: Settings, *, factory: Callable[[Settings], ChatClient] | None = None
    ) -> None:
        self.settings = settings
        self._factory = factory or (lambda s: ChatClient(s, remember=False))
        self._clients: dict[str, ChatClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, tenant: str) -> ChatClient:
        """The started client of `tenant`; raises TenantUnavailable when it cannot start."""
        client = self._clients.get(tenant)
        if client is not None:
            return client
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            client = self._clients.get(tenant)
            if client is None:
                client = await self._start(tenant)
                self._clients[tenant] = client
        return client

    async def _start(self, tenant: str) -> ChatClient:
        client = self._factory(as_tenant(self.settings, tenant))
        try:
            await client.start()
        except Exception as e:
            await _quietly_stop(client)
            log.error("tenant %s: cannot start its bus client: %s: %s", tenant, type(e).__name__, e)
            raise TenantUnavailable(tenant) from e
        log.info("tenant %s: bus client started as %s", tenant, client.settings.kafka_sasl_username or "-")
        return client

    @property
    def started(self) -> dict[str, ChatClient]:
        return dict(self._clients)

    @property
    def alive(self) -> bool:
        """No started client has lost its reply reader."""
        return all(c.replies.alive for c in self._clients.values())

    async def stop(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await _quietly_stop(client)


async def _quietly_stop(client: ChatClient) -> None:
    try:
        await client.stop()
    except Exception as e:  # noqa: BLE001 - stopping the others matters more
        log.warning("stopping a tenant client failed: %s: %s", type(e).__name__, e)
