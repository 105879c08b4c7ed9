"""Kick revoked and suspended clients off an EMQX cluster through its REST API.

EMQX keeps an authenticated session until the client disconnects; its HTTP
authenticator is only asked again at the next CONNECT. So ``iotauth serve``
follows the registry's change feed and, for each revocation or suspension,
calls ``DELETE /api/v5/clients/{clientid}`` (the client id is the device id,
which the authenticator enforces). The call is idempotent, so every replica
may send it; a 404 means the device was not connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from iotauth.errors import RegistryError
from iotauth.identity import validate_device_id
from iotauth.registry import AuditEvent, Registry
from iotauth.registry.events import EMQX_KICKS

log = logging.getLogger("iotauth.http.push")


@dataclass(frozen=True)
class EmqxKicker:
    base_url: str
    api_key: str
    api_secret: str
    attempts: int = 3
    backoff: float = 0.5

    async def kick(self, client: httpx.AsyncClient, device_id: str) -> int | None:
        """DELETE the client's session; return the final HTTP status (None if EMQX never answered)."""
        url = f"{self.base_url.rstrip('/')}/api/v5/clients/{quote(validate_device_id(device_id), safe='')}"
        for attempt in range(self.attempts):
            try:
                answer = await client.delete(url, auth=(self.api_key, self.api_secret))
            except httpx.HTTPError as exc:
                log.warning("EMQX kick of %s failed (%s), attempt %d/%d", device_id, exc, attempt + 1, self.attempts)
            else:
                if answer.status_code < 500:  # 204 kicked, 404 not connected, 4xx will not change on retry
                    log.info("EMQX kick of %s: HTTP %d", device_id, answer.status_code)
                    return answer.status_code
                log.warning(
                    "EMQX kick of %s: HTTP %d, attempt %d/%d", device_id, answer.status_code, attempt + 1, self.attempts
                )
            await asyncio.sleep(self.backoff * 2**attempt)
        return None


def devices_to_kick(events: list[AuditEvent]) -> list[str]:
    """Device ids touched by kick-worthy events, once each, in order."""
    seen: dict[str, None] = {}
    for event in events:
        if event.kind in EMQX_KICKS and event.device_id:
            seen.setdefault(event.device_id, None)
    return list(seen)


async def push_revocations(registry: Registry, kicker: EmqxKicker, poll_interval: float = 0.2) -> None:
    """Run forever: follow the feed from now on and kick every revoked or suspended device.

    A registry that cannot be read (or was given up, see ``Registry.reopen``)
    is retried every second from the last event handled.
    """
    cursor = await registry.last_event_id()
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            try:
                async for batch in registry.follow(cursor, poll_interval=poll_interval):
                    for device_id in devices_to_kick(batch):
                        with contextlib.suppress(Exception):
                            await kicker.kick(client, device_id)
                    cursor = batch[-1].id
            except RegistryError as exc:
                log.warning("EMQX push cannot read the registry (%s); retrying", exc)
                await asyncio.sleep(1.0)
