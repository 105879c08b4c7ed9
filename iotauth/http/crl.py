"""The CRL the service hands out: rebuilt whenever the registry changed revocation state.

Freshness is checked on request, not on a timer: each GET compares the
registry's newest event id with the one the cached CRL was built at, and
rebuilds first if a revocation-relevant event happened since. So a CRL
fetched after ``iotauth revoke`` returned always lists the revocation.
Without the CA key (encrypted and no passphrase), the service serves the
CRL file that ``iotauth revoke`` / ``iotauth crl`` published instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from iotauth.authority import Authority
from iotauth.castore import read_published_crl
from iotauth.config import Home
from iotauth.errors import PkiError
from iotauth.registry.events import CRL_KIND_PREFIXES


@dataclass(frozen=True)
class CrlDocument:
    der: bytes
    pem: bytes
    built_at_event: int
    generation: int = 0  # the registry's; event ids of a reopened database are not comparable


class CrlSource:
    def __init__(self, authority: Authority, home: Home) -> None:
        self._registry = authority.registry
        self._authority = authority
        self._home = home
        self._current: CrlDocument | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> CrlDocument:
        generation = self._registry.generation
        head = await self._registry.last_event_id()
        cached = self._current
        if cached is not None and cached.generation != generation:
            cached = None
        if cached is not None and (cached.built_at_event == head or not await self._changed_since(cached, head)):
            return cached
        async with self._lock:
            cached = self._current
            if cached is not None and cached.generation == generation and cached.built_at_event >= head:
                return cached
            self._current = await self._build(head, generation)
            return self._current

    async def _changed_since(self, cached: CrlDocument, head: int) -> bool:
        if await self._registry.has_events(after_id=cached.built_at_event, kind_prefixes=CRL_KIND_PREFIXES):
            return True
        self._current = CrlDocument(cached.der, cached.pem, head, cached.generation)
        return False

    async def _build(self, head: int, generation: int) -> CrlDocument:
        if self._authority.signing_unavailable is not None:
            last = read_published_crl(self._home)
            if last is None:
                raise PkiError(
                    "no CRL has been published yet; run 'iotauth crl' (or start serve with the CA passphrase)"
                )
            return CrlDocument(last.der, last.pem, head, generation)
        published = await self._authority.build_crl()
        return CrlDocument(published.crl.public_bytes(serialization.Encoding.DER), published.pem, head, generation)
