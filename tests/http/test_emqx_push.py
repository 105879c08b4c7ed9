"""The EMQX revocation push, against a local fake of the EMQX REST API (request shape only).

No real EMQX runs here: this checks the method, path, authentication and
retry behaviour iotauth sends, as documented for EMQX 5's
``DELETE /api/v5/clients/{clientid}``.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import uvicorn
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from iotauth.authority import Authority
from iotauth.config import Home
from iotauth.pki.keys import PrivateKey
from iotauth.registry import Registry, RevocationReason
from iotauth.testing import free_port
from tests.fixtures.service import RunningService

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


@dataclass
class FakeEmqx:
    url: str
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    fail_first: int = 0


@pytest.fixture
async def fake_emqx() -> AsyncIterator[FakeEmqx]:
    port = free_port()
    fake = FakeEmqx(f"http://127.0.0.1:{port}")

    async def delete_client(request: Request) -> Response:
        fake.calls.append((request.method, request.url.path, request.headers.get("authorization", "")))
        if fake.fail_first > 0:
            fake.fail_first -= 1
            return Response(status_code=503)
        return Response(status_code=204)

    app = Starlette(routes=[Route("/api/v5/clients/{clientid}", delete_client, methods=["DELETE"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    yield fake
    server.should_exit = True
    await task


async def _wait_for_calls(fake: FakeEmqx, count: int) -> None:
    for _ in range(300):
        if len(fake.calls) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} EMQX calls, got {fake.calls}")


async def test_revoke_and_suspend_kick_the_client_through_emqx(
    home: Home,
    authority: Authority,
    registry: Registry,
    csr_factory: CsrFactory,
    fake_emqx: FakeEmqx,
    service_factory: Callable[..., RunningService],
) -> None:
    config = home.config_file.read_text()
    config = config.replace('# base_url = "http://emqx:18083"', f'base_url = "{fake_emqx.url}"')
    config = config.replace('# api_key = "iotauth"', 'api_key = "iotauth-key"')
    home.config_file.write_text(config)
    for device_id in ("sensor-1", "sensor-2"):
        await authority.issue(csr_factory()[1], device_id, actor="op")
    service_factory(home, extra_env={"IOTAUTH_EMQX_API_SECRET": "s3cret"})
    fake_emqx.fail_first = 1  # the first attempt fails: iotauth must retry

    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    await _wait_for_calls(fake_emqx, 2)
    await registry.suspend("sensor-2", actor="op")
    await _wait_for_calls(fake_emqx, 3)

    expected_auth = "Basic " + base64.b64encode(b"iotauth-key:s3cret").decode()
    assert fake_emqx.calls == [
        ("DELETE", "/api/v5/clients/sensor-1", expected_auth),
        ("DELETE", "/api/v5/clients/sensor-1", expected_auth),
        ("DELETE", "/api/v5/clients/sensor-2", expected_auth),
    ]


def test_push_configuration_without_a_secret_is_refused(
    home: Home, service_factory: Callable[..., RunningService]
) -> None:
    config = home.config_file.read_text().replace('# base_url = "http://emqx:18083"', 'base_url = "http://x"')
    home.config_file.write_text(config.replace('# api_key = "iotauth"', 'api_key = "k"'))
    with pytest.raises(RuntimeError, match="IOTAUTH_EMQX_API_SECRET"):
        service_factory(home)
