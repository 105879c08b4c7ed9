"""The EMQX and mosquitto-go-auth endpoints: the same policy engine as the amqtt broker."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from cryptography import x509

from iotauth.authority import Authority, Issued
from iotauth.certs import pem
from iotauth.config import Home, load_settings
from iotauth.http.server import ServeOptions, build_app
from iotauth.pki.keys import PrivateKey
from iotauth.registry import Registry, RevocationReason
from tests.fixtures.service import RunningService

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


@pytest.fixture
async def fleet(authority: Authority, csr_factory: CsrFactory) -> dict[str, Issued]:
    return {
        "sensor-1": await authority.issue(csr_factory()[1], "sensor-1", actor="op"),
        "sensor-2": await authority.issue(csr_factory()[1], "sensor-2", actor="op"),
        "svc-ingest": await authority.issue(csr_factory()[1], "svc-ingest", "ingest", actor="op"),
    }


@pytest.fixture
async def client(home: Home, registry: Registry, fleet: dict[str, Issued]) -> AsyncIterator[InProcessClient]:
    """The real application, called in-process (no socket); the TLS server itself is tested elsewhere."""
    app = await build_app(home, registry, load_settings(home), ServeOptions())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://iotauth.test") as inner:
        yield InProcessClient(inner)


class InProcessClient:
    """Synchronous-looking calls for readable tests (each one runs on the test's event loop)."""

    def __init__(self, inner: httpx.AsyncClient) -> None:
        self.inner = inner

    async def post(self, path: str, **kwargs: object) -> httpx.Response:
        return await self.inner.post(path, **kwargs)  # type: ignore[arg-type]


async def authn(
    client: InProcessClient, clientid: str, issued: Issued | None, *, cn: str | None = None, with_pem: bool = True
) -> dict[str, object]:
    body: dict[str, object] = {"clientid": clientid, "cert_common_name": cn if cn is not None else clientid}
    if issued is not None and with_pem:
        body["cert_pem"] = pem(issued.certificate).decode()
    answer = await client.post("/emqx/authn", json=body)
    assert answer.status_code == 200
    result: dict[str, object] = answer.json()
    return result


async def test_emqx_authn_allows_a_good_device_with_its_acl_and_expiry(
    client: InProcessClient, fleet: dict[str, Issued]
) -> None:
    answer = await authn(client, "sensor-1", fleet["sensor-1"])
    assert answer["result"] == "allow" and answer["is_superuser"] is False
    assert answer["expire_at"] == int(fleet["sensor-1"].certificate.not_valid_after_utc.timestamp())
    assert answer["acl"] == [
        {"permission": "allow", "action": "publish", "topic": "devices/sensor-1/telemetry/#"},
        {"permission": "allow", "action": "publish", "topic": "devices/sensor-1/state"},
        {"permission": "allow", "action": "subscribe", "topic": "devices/sensor-1/commands/#"},
        {"permission": "deny", "action": "all", "topic": "#"},
    ]


@pytest.mark.parametrize(
    ("clientid", "owner", "cn", "reason"),
    [
        ("sensor-2", "sensor-1", "sensor-2", "does not match the certificate identity"),  # someone else's cert
        ("sensor-1", "sensor-1", "sensor-2", "does not match the certificate common name"),
        ("sensor/1", "sensor-1", "sensor/1", "invalid device id"),
        ("#", "sensor-1", "#", "invalid device id"),
    ],
)
async def test_emqx_authn_denies_identity_mismatches(
    client: InProcessClient, fleet: dict[str, Issued], clientid: str, owner: str, cn: str, reason: str
) -> None:
    answer = await authn(client, clientid, fleet[owner], cn=cn)
    assert answer["result"] == "deny" and reason in str(answer["reason"])


async def test_emqx_authn_without_a_certificate_is_denied(client: InProcessClient) -> None:
    assert (await authn(client, "sensor-1", None, cn=""))["result"] == "deny"


async def test_emqx_decisions_follow_the_registry_at_once(
    client: InProcessClient, fleet: dict[str, Issued], registry: Registry
) -> None:
    await registry.suspend("sensor-1", actor="op")
    assert (await authn(client, "sensor-1", fleet["sensor-1"]))["result"] == "deny"
    assert (await authn(client, "sensor-1", None, with_pem=False))["result"] == "deny"  # device-level path too
    await registry.resume("sensor-1", actor="op")
    assert (await authn(client, "sensor-1", fleet["sensor-1"]))["result"] == "allow"
    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    assert (await authn(client, "sensor-1", fleet["sensor-1"]))["result"] == "deny"
    decision = await client.post(
        "/emqx/authz", json={"clientid": "sensor-1", "action": "publish", "topic": "devices/sensor-1/state"}
    )
    assert decision.json() == {"result": "deny"}


async def test_fingerprint_binds_to_the_exact_certificate(
    client: InProcessClient, fleet: dict[str, Issued], registry: Registry
) -> None:
    body = {
        "clientid": "sensor-2",
        "cert_common_name": "sensor-2",
        "cert_fingerprint": fleet["sensor-2"].record.fingerprint,
    }
    assert (await client.post("/emqx/authn", json=body)).json()["result"] == "allow"
    await registry.revoke_certificate(fleet["sensor-2"].record.serial, RevocationReason.KEY_COMPROMISE, actor="op")
    assert (await client.post("/emqx/authn", json=body)).json()["result"] == "deny"


@pytest.mark.parametrize(
    ("clientid", "action", "topic", "result"),
    [
        ("sensor-1", "publish", "devices/sensor-1/telemetry/temp", "allow"),
        ("sensor-1", "publish", "devices/sensor-2/telemetry/temp", "deny"),
        ("sensor-1", "subscribe", "devices/sensor-1/commands/#", "allow"),
        ("sensor-1", "subscribe", "devices/+/commands/#", "deny"),
        ("sensor-1", "subscribe", "#", "deny"),
        ("sensor-1", "subscribe", "$SYS/#", "deny"),
        ("svc-ingest", "subscribe", "devices/+/telemetry/#", "allow"),
        ("svc-ingest", "publish", "devices/sensor-1/telemetry/x", "deny"),
        ("ghost", "publish", "devices/ghost/state", "deny"),
    ],
)
async def test_emqx_authz_uses_the_profile_policy(
    client: InProcessClient, clientid: str, action: str, topic: str, result: str
) -> None:
    answer = await client.post("/emqx/authz", json={"clientid": clientid, "action": action, "topic": topic})
    assert answer.status_code == 200 and answer.json() == {"result": result}


@pytest.mark.parametrize(
    ("acc", "topic", "allowed"),
    [
        (2, "devices/sensor-1/state", True),
        (2, "devices/sensor-2/state", False),
        (4, "devices/sensor-1/commands/#", True),
        (4, "devices/+/commands/#", False),
        (1, "devices/sensor-1/commands/reboot", True),
        (1, "devices/sensor-2/commands/reboot", False),
        (3, "devices/sensor-1/commands/reboot", False),  # readwrite needs both
    ],
)
async def test_go_auth_acl(client: InProcessClient, acc: int, topic: str, allowed: bool) -> None:
    answer = await client.post(
        "/mosquitto/acl", json={"username": "sensor-1", "clientid": "sensor-1", "topic": topic, "acc": acc}
    )
    assert answer.status_code == (200 if allowed else 403)
    assert answer.json()["Ok"] is allowed


async def test_go_auth_user_and_superuser(client: InProcessClient) -> None:
    assert (await client.post("/mosquitto/user", json={"username": "sensor-1", "clientid": "sensor-1"})).json()["Ok"]
    spoof = await client.post("/mosquitto/user", json={"username": "sensor-1", "clientid": "sensor-2"})
    assert spoof.status_code == 403
    assert (await client.post("/mosquitto/superuser", json={"username": "sensor-1"})).status_code == 403


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/emqx/authz", b'{"clientid": "sensor-1", "action": "delete", "topic": "x"}', "action must be"),
        ("/mosquitto/acl", b'{"username": "sensor-1", "acc": 9, "topic": "x"}', "acc must be"),
        ("/emqx/authn", b"not json", "not valid JSON"),
    ],
)
async def test_bad_requests_are_400(client: InProcessClient, path: str, body: bytes, needle: str) -> None:
    answer = await client.post(path, content=body)
    assert answer.status_code == 400 and needle in answer.json()["error"]


def test_broker_endpoints_answer_only_the_broker_network(
    home: Home, fleet: dict[str, Issued], service_factory: Callable[..., RunningService]
) -> None:
    config = home.config_file.read_text().replace(
        'broker_networks = ["127.0.0.0/8", "::1/128"]', 'broker_networks = ["10.9.8.0/24"]'
    )
    home.config_file.write_text(config)
    with service_factory(home).client() as client:
        answer = client.post(
            "/emqx/authz", json={"clientid": "sensor-1", "action": "publish", "topic": "devices/sensor-1/state"}
        )
        assert answer.status_code == 403
        assert client.get("/crl.pem").status_code == 200  # public endpoints are unaffected


def configure_serve(home: Home, networks: str, proxies: str | None = None) -> None:
    config = home.config_file.read_text().replace('broker_networks = ["127.0.0.0/8", "::1/128"]',
                                                  f"broker_networks = {networks}")
    if proxies is not None:
        config = config.replace("trusted_proxies = []", f"trusted_proxies = {proxies}")
    home.config_file.write_text(config)


def from_address(service: RunningService, source: str) -> httpx.Client:
    """A client whose connections leave from ``source`` (every 127.x address is loopback on Linux)."""
    context = ssl.create_default_context(cafile=service.home.chain_file)
    transport = httpx.HTTPTransport(local_address=source, verify=context)
    return httpx.Client(base_url=service.base_url, transport=transport, timeout=30)


AUTHZ = {"clientid": "sensor-1", "action": "publish", "topic": "devices/sensor-1/state"}


def test_an_empty_broker_network_list_answers_nobody(
    home: Home, fleet: dict[str, Issued], service_factory: Callable[..., RunningService]
) -> None:
    configure_serve(home, "[]")
    with service_factory(home).client() as client:
        assert client.post("/emqx/authz", json=AUTHZ).status_code == 403
        assert client.post("/mosquitto/user", json={"username": "sensor-1"}).status_code == 403


def test_forwarded_for_is_believed_only_from_a_named_proxy(
    home: Home, fleet: dict[str, Issued], service_factory: Callable[..., RunningService]
) -> None:
    """The reported bypass: with uvicorn's proxy headers on and FORWARDED_ALLOW_IPS=* (a common container
    setting), any client that sent 'X-Forwarded-For: 127.0.0.1' passed the allowlist."""
    configure_serve(home, '["127.0.0.1/32"]')
    service = service_factory(home, extra_env={"FORWARDED_ALLOW_IPS": "*"})
    spoof = {"X-Forwarded-For": "127.0.0.1"}
    with from_address(service, "127.0.0.2") as outsider:
        assert outsider.post("/emqx/authz", json=AUTHZ, headers=spoof).status_code == 403


def test_a_named_proxy_forwards_the_client_address(
    home: Home, fleet: dict[str, Issued], service_factory: Callable[..., RunningService]
) -> None:
    configure_serve(home, '["127.0.0.1/32"]', proxies='["127.0.0.3"]')
    service = service_factory(home, extra_env={"FORWARDED_ALLOW_IPS": "*"})
    with from_address(service, "127.0.0.3") as proxy:
        assert proxy.post("/emqx/authz", json=AUTHZ, headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
        assert proxy.post("/emqx/authz", json=AUTHZ, headers={"X-Forwarded-For": "10.9.8.7"}).status_code == 403
        assert proxy.post("/emqx/authz", json=AUTHZ).status_code == 403  # the proxy itself is no broker
    with from_address(service, "127.0.0.2") as outsider:
        assert outsider.post("/emqx/authz", json=AUTHZ, headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 403
