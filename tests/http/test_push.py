"""The revocation push to EMQX, against a local server that answers as EMQX's REST handlers do.

:mod:`tests.fixtures.emqx_api` transcribes each handler iotauth calls (kick:
``emqx_mgmt_api_clients:kickout/1``; ban: ``emqx_mgmt_api_banned:banned/2`` over
``emqx_banned:parse/1``/``create/1``; unban: ``delete_banned/2``; node caches:
``emqx_authn_api:authentication_node_cache_reset/2`` and
``emqx_authz_api_cache:node_cache_reset/2`` at 6.2.2; credentials:
``emqx_dashboard:authorize/1``), so these tests check what iotauth sends and
what it does with each answer EMQX can give. No EMQX runs here.

EMQX source: github.com/emqx/emqx, tag v5.8.0 (commit e5ed59deb633) unless a test names another ref
(v5.8.2 cbf64766e2b3, 6.2.2 f7b2e6d8e2c5, HEAD 50e04386de84).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from datetime import datetime

import pytest
from cryptography import x509

from iotauth.authority import Authority
from iotauth.config import Home
from iotauth.export.follower import Backoff, PushFollower, PushState
from iotauth.http.push import EmqxTarget
from iotauth.pki.keys import PrivateKey
from iotauth.registry import EventKind, Registry, RevocationReason
from tests.fixtures.emqx_api import EmqxApiServer
from tests.fixtures.rotation import pending_renewal
from tests.fixtures.service import RunningService

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]
BASIC = "Basic " + base64.b64encode(b"iotauth-key:s3cret").decode()


@pytest.fixture
async def fleet(authority: Authority, csr_factory: CsrFactory) -> dict[str, datetime]:
    """Three devices, each with its certificate's notAfter."""
    found = {}
    for name in ("sensor-1", "sensor-2", "sensor-3"):
        issued = await authority.issue(csr_factory()[1], name, actor="op")
        found[name] = issued.certificate.not_valid_after_utc
    return found


async def pushed(registry: Registry, api: EmqxApiServer, secret: str = "s3cret", **options: bool) -> PushFollower:  # noqa: S107
    target = EmqxTarget(api.url, "iotauth-key", secret, registry, **options)
    push = PushFollower(registry, target, backoff=Backoff(first=0.01, cap=0.05))
    await push.start()
    return push


async def test_a_revocation_resets_the_caches_bans_until_not_after_and_kicks(
    registry: Registry, fleet: dict[str, datetime], emqx_api: EmqxApiServer
) -> None:
    emqx_api.api.connected |= {"sensor-1", "sensor-2"}
    push = await pushed(registry, emqx_api)
    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    await push.catch_up()
    assert emqx_api.api.paths() == [
        "POST /api/v5/authentication/node_cache/reset",
        "POST /api/v5/authorization/node_cache/reset",
        "POST /api/v5/banned",
        "DELETE /api/v5/clients/sensor-1",
    ]
    assert {c.authorization for c in emqx_api.api.calls} == {BASIC}
    ban = emqx_api.api.calls[2].body
    assert isinstance(ban, dict) and ban["as"] == "clientid" and ban["who"] == "sensor-1" and ban["by"] == "iotauth"
    assert datetime.fromisoformat(ban["until"]) == fleet["sensor-1"].replace(microsecond=0)
    assert ("clientid", "sensor-1") in emqx_api.api.bans
    assert emqx_api.api.connected == {"sensor-2"}  # the ban already kicked it: the DELETE found no client (404)
    delivered = [e for e in await registry.events() if e.kind == EventKind.PUSH_DELIVERED]
    assert [(e.device_id, e.data["answers"]) for e in delivered] == [("sensor-1", {
        "authentication_node_cache_reset": 204, "authorization_node_cache_reset": 204, "ban": 200, "kick": 404})]
    await push.aclose()


async def test_suspend_bans_and_resume_lifts_the_ban(
    registry: Registry, fleet: dict[str, datetime], emqx_api: EmqxApiServer
) -> None:
    push = await pushed(registry, emqx_api, reset_node_cache=False)
    await registry.suspend("sensor-2", actor="op")
    await push.catch_up()
    assert ("clientid", "sensor-2") in emqx_api.api.bans
    await registry.resume("sensor-2", actor="op")
    await push.catch_up()
    assert emqx_api.api.bans == {}
    assert emqx_api.api.paths()[-1] == "DELETE /api/v5/banned/clientid/sensor-2"
    await push.aclose()


async def test_a_first_activation_on_the_line_costs_no_call_and_no_record(
    registry: Registry, fleet: dict[str, datetime], authority: Authority, csr_factory: CsrFactory,
    emqx_api: EmqxApiServer,
) -> None:
    """``device.active`` lifts a ban only for a device that was ever suspended (revocation is final)."""
    push = await pushed(registry, emqx_api)
    await authority.issue(csr_factory()[1], "sensor-9", actor="op")
    await push.catch_up()
    assert emqx_api.api.calls == []
    assert [e for e in await registry.events() if e.kind == EventKind.PUSH_DELIVERED] == []
    await push.aclose()


async def test_one_revoked_certificate_of_an_active_device_is_a_kick_without_a_ban(
    registry: Registry, fleet: dict[str, datetime], authority: Authority, emqx_api: EmqxApiServer
) -> None:
    serial = (await registry.certificates_of("sensor-3"))[0].serial
    emqx_api.api.connected.add("sensor-3")
    push = await pushed(registry, emqx_api, reset_node_cache=False)
    await registry.revoke_certificate(serial, RevocationReason.SUPERSEDED, actor="op")
    await push.catch_up()
    assert emqx_api.api.paths() == ["DELETE /api/v5/clients/sensor-3"]
    assert emqx_api.api.connected == set() and emqx_api.api.bans == {}
    await push.aclose()


async def test_a_renewal_kicks_the_old_session_only_when_emqx_did_not_replace_it(
    registry: Registry, authority: Authority, emqx_api: EmqxApiServer
) -> None:
    """Activated at the new certificate's first authentication, EMQX has already taken the old session over (same
    client id): a kick by client id would close the *new* one. Activated by the device's confirmation (sent on the old
    session), the old session must go."""
    push = await pushed(registry, emqx_api, reset_node_cache=False)
    for device_id, via in (("renew-connect", "connect"), ("renew-confirm", "confirm")):
        current, _ = await pending_renewal(authority, device_id)
        renewal = next(c for c in await registry.certificates_of(device_id) if c.serial != current.serial)
        emqx_api.api.connected.add(device_id)
        await registry.activate_renewal(renewal.serial, device_id=device_id, actor="t", via=via)
    await push.catch_up()
    assert emqx_api.api.paths() == ["DELETE /api/v5/clients/renew-confirm"]
    assert emqx_api.api.connected == {"renew-connect"} and emqx_api.api.bans == {}
    await push.aclose()


async def test_an_existing_ban_and_a_version_without_node_caches_are_fine(
    registry: Registry, fleet: dict[str, datetime], emqx_api: EmqxApiServer
) -> None:
    """EMQX 5.8 has no node-cache routes (404 from ``emqx_dashboard_not_found``); a second ban is
    ``400 ALREADY_EXISTS`` (``emqx_banned:create/1``): both mean there is nothing left to do."""
    emqx_api.api.node_cache = False
    until = int(time.time()) + 3600
    emqx_api.api.bans[("clientid", "sensor-1")] = {"as": "clientid", "who": "sensor-1", "_until": until}
    push = await pushed(registry, emqx_api)
    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    await push.catch_up()
    delivered = [e for e in await registry.events() if e.kind == EventKind.PUSH_DELIVERED]
    assert delivered[0].data["answers"] == {"authentication_node_cache_reset": 404,
                                            "authorization_node_cache_reset": 404, "ban": "already banned",
                                            "kick": 404}
    assert push.health.healthy
    await push.aclose()


@pytest.mark.parametrize(("secret", "enterprise_role", "status"), [("wrong", None, 401), ("s3cret", "viewer", 403)])
async def test_refused_credentials_stop_nothing_silently(
    registry: Registry, fleet: dict[str, datetime], emqx_api: EmqxApiServer, secret: str,
    enterprise_role: str | None, status: int,
) -> None:
    """401 ``BAD_API_KEY_OR_SECRET`` / 403 ``UNAUTHORIZED_ROLE`` (``emqx_dashboard:api_key_authorize/3``)."""
    if enterprise_role is not None:
        emqx_api.api.enterprise = True
        emqx_api.api.keys["iotauth-key"] = ("s3cret", enterprise_role)
    push = await pushed(registry, emqx_api, secret=secret)
    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    task = asyncio.create_task(push.catch_up())
    for _ in range(500):
        if push.health.state is PushState.UNAUTHORIZED:
            break
        await asyncio.sleep(0.01)
    assert not push.health.healthy and f"HTTP {status}" in str(push.health.last_error)
    emqx_api.api.keys["iotauth-key"] = ("wrong" if secret == "wrong" else "s3cret", "administrator")  # fixed
    await asyncio.wait_for(task, timeout=30)
    assert push.health.healthy and ("clientid", "sensor-1") in emqx_api.api.bans
    failed = [e for e in await registry.events() if e.kind == EventKind.PUSH_FAILED]
    assert len(failed) == 1 and failed[0].data["state"] == "unauthorized"
    await push.aclose()


async def test_an_outage_delays_the_push_but_loses_nothing(
    registry: Registry, fleet: dict[str, datetime], emqx_api: EmqxApiServer
) -> None:
    push = await pushed(registry, emqx_api, reset_node_cache=False)
    emqx_api.stop()
    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    await registry.suspend("sensor-2", actor="op")
    task = asyncio.create_task(push.catch_up())
    for _ in range(500):
        if push.health.state is PushState.RETRYING:
            break
        await asyncio.sleep(0.01)
    assert "ConnectError" in str(push.health.last_error)
    await asyncio.to_thread(emqx_api.start)
    await asyncio.wait_for(task, timeout=30)
    assert set(emqx_api.api.bans) == {("clientid", "sensor-1"), ("clientid", "sensor-2")}
    assert emqx_api.api.paths("POST") == ["POST /api/v5/banned", "POST /api/v5/banned"]
    await push.aclose()


# -- the same through ``iotauth serve``: configuration, downtime, /healthz ---------------------------


def configure(home: Home, url: str) -> None:
    config = home.config_file.read_text()
    config = config.replace('# base_url = "http://emqx:18083"', f'base_url = "{url}"')
    home.config_file.write_text(config.replace('# api_key = "iotauth"', 'api_key = "iotauth-key"'))


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def test_revocations_made_while_serve_was_down_are_pushed_when_it_returns(
    home: Home, registry: Registry, fleet: dict[str, datetime], emqx_api: EmqxApiServer,
    service_factory: Callable[..., RunningService],
) -> None:
    configure(home, emqx_api.url)
    env = {"IOTAUTH_EMQX_API_SECRET": "s3cret"}
    first = service_factory(home, extra_env=env)
    await asyncio.to_thread(wait_for, lambda: asyncio.run(_cursor(home)) is not None, "the push's first start")
    first.process.terminate()
    first.process.wait(timeout=20)
    await registry.revoke("sensor-2", RevocationReason.KEY_COMPROMISE, actor="op")  # nobody is pushing now
    assert emqx_api.api.calls == []
    service = service_factory(home, extra_env=env)
    await asyncio.to_thread(wait_for, lambda: ("clientid", "sensor-2") in emqx_api.api.bans, "the replayed ban")
    with service.client() as client:
        health = client.get("/healthz").json()
    assert health["ok"] is True and health["push"][0]["target"] == "emqx" and health["push"][0]["delivered"] == 1


async def _cursor(home: Home) -> int | None:
    from iotauth.registry import open_registry

    async with await open_registry(home.registry_db) as registry:
        return await registry.follower_cursor("push:emqx")


async def test_serve_reports_refused_credentials_in_healthz(
    home: Home, registry: Registry, fleet: dict[str, datetime], emqx_api: EmqxApiServer,
    service_factory: Callable[..., RunningService],
) -> None:
    configure(home, emqx_api.url)
    service = service_factory(home, extra_env={"IOTAUTH_EMQX_API_SECRET": "not-the-secret"})
    await asyncio.to_thread(wait_for, lambda: asyncio.run(_cursor(home)) is not None, "the push's first start")
    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")

    def unhealthy() -> bool:
        with service.client() as client:
            return client.get("/healthz").status_code == 503

    await asyncio.to_thread(wait_for, unhealthy, "/healthz to report the refused credentials")
    with service.client() as client:
        health = client.get("/healthz").json()
    assert health["ok"] is False
    assert health["push"][0]["state"] == "unauthorized" and "401" in health["push"][0]["last_error"]
    assert "not-the-secret" not in str(health)


def test_push_configuration_without_a_secret_is_refused(
    home: Home, service_factory: Callable[..., RunningService]
) -> None:
    config = home.config_file.read_text().replace('# base_url = "http://emqx:18083"', 'base_url = "http://x"')
    home.config_file.write_text(config.replace('# api_key = "iotauth"', 'api_key = "k"'))
    with pytest.raises(RuntimeError, match="IOTAUTH_EMQX_API_SECRET"):
        service_factory(home)
