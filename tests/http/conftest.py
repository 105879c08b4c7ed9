"""The HTTP service's application, called in-process (no socket), with a small fleet of devices."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
from cryptography import x509

from iotauth.authority import Authority, Issued
from iotauth.config import Home, Settings, load_settings
from iotauth.http.server import ServeOptions, build_app
from iotauth.pki.keys import PrivateKey
from iotauth.registry import Registry

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]
ClientFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def fleet(authority: Authority, csr_factory: CsrFactory) -> dict[str, Issued]:
    return {
        "sensor-1": await authority.issue(csr_factory()[1], "sensor-1", actor="op"),
        "sensor-2": await authority.issue(csr_factory()[1], "sensor-2", actor="op"),
        "svc-ingest": await authority.issue(csr_factory()[1], "svc-ingest", "ingest", actor="op"),
    }


@pytest.fixture
async def client_factory(home: Home, registry: Registry) -> AsyncIterator[ClientFactory]:
    """``await client_factory(emqx={...}, serve={...}, peer="10.0.0.1")``: the real app, settings overridden."""
    opened: list[httpx.AsyncClient] = []

    async def factory(peer: str = "127.0.0.1", **sections: dict[str, Any]) -> httpx.AsyncClient:
        settings: Settings = load_settings(home)
        for name, values in sections.items():
            settings = replace(settings, **{name: replace(getattr(settings, name), **values)})
        app = await build_app(home, registry, settings, ServeOptions())
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True, client=(peer, 50000))
        client = httpx.AsyncClient(transport=transport, base_url="http://iotauth.test")
        opened.append(client)
        return client

    yield factory
    for client in opened:
        await client.aclose()


@pytest.fixture
async def client(client_factory: ClientFactory, fleet: dict[str, Issued]) -> httpx.AsyncClient:
    return await client_factory()
