"""The mosquitto-go-auth endpoints: the same policy engine as the amqtt broker (EMQX's: test_emqx_endpoints)."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import httpx
import pytest
from cryptography import x509

from iotauth.authority import Issued
from iotauth.config import Home
from iotauth.pki.keys import PrivateKey
from tests.fixtures.service import RunningService

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


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
async def test_go_auth_acl(client: httpx.AsyncClient, acc: int, topic: str, allowed: bool) -> None:
    answer = await client.post(
        "/mosquitto/acl", json={"username": "sensor-1", "clientid": "sensor-1", "topic": topic, "acc": acc}
    )
    assert answer.status_code == (200 if allowed else 403)
    assert answer.json()["Ok"] is allowed


async def test_go_auth_user_and_superuser(client: httpx.AsyncClient) -> None:
    assert (await client.post("/mosquitto/user", json={"username": "sensor-1", "clientid": "sensor-1"})).json()["Ok"]
    spoof = await client.post("/mosquitto/user", json={"username": "sensor-1", "clientid": "sensor-2"})
    assert spoof.status_code == 403
    assert (await client.post("/mosquitto/superuser", json={"username": "sensor-1"})).status_code == 403


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/mosquitto/acl", b'{"username": "sensor-1", "acc": 9, "topic": "x"}', "acc must be"),
        ("/mosquitto/user", b"not json", "not valid JSON"),
    ],
)
async def test_bad_requests_are_400(client: httpx.AsyncClient, path: str, body: bytes, needle: str) -> None:
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
        answer = client.post("/mosquitto/user", json={"username": "sensor-1", "clientid": "sensor-1"})
        assert answer.status_code == 403
        # EMQX would read a 403 as "ignore" and go on to acl.conf's {allow, all}: its endpoints deny with a 200.
        answer = client.post(
            "/emqx/authz", json={"clientid": "sensor-1", "action": "publish", "topic": "devices/sensor-1/state"}
        )
        assert (answer.status_code, answer.json()) == (200, {"result": "deny"})
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


def authz(response: httpx.Response) -> str:
    """EMQX's authorizer endpoint answers 200 always (a non-200 falls through to allow in EMQX): read its verdict."""
    assert response.status_code == 200, response.text
    return str(response.json()["result"])


def test_an_empty_broker_network_list_answers_nobody(
    home: Home, fleet: dict[str, Issued], service_factory: Callable[..., RunningService]
) -> None:
    configure_serve(home, "[]")
    with service_factory(home).client() as client:
        assert authz(client.post("/emqx/authz", json=AUTHZ)) == "deny"
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
        assert authz(outsider.post("/emqx/authz", json=AUTHZ, headers=spoof)) == "deny"
        assert outsider.post("/mosquitto/user", json={"username": "sensor-1"}, headers=spoof).status_code == 403


def test_a_named_proxy_forwards_the_client_address(
    home: Home, fleet: dict[str, Issued], service_factory: Callable[..., RunningService]
) -> None:
    configure_serve(home, '["127.0.0.1/32"]', proxies='["127.0.0.3"]')
    service = service_factory(home, extra_env={"FORWARDED_ALLOW_IPS": "*"})
    with from_address(service, "127.0.0.3") as proxy:
        assert authz(proxy.post("/emqx/authz", json=AUTHZ, headers={"X-Forwarded-For": "127.0.0.1"})) == "allow"
        assert authz(proxy.post("/emqx/authz", json=AUTHZ, headers={"X-Forwarded-For": "10.9.8.7"})) == "deny"
        assert authz(proxy.post("/emqx/authz", json=AUTHZ)) == "deny"  # the proxy itself is no broker
    with from_address(service, "127.0.0.2") as outsider:
        assert authz(outsider.post("/emqx/authz", json=AUTHZ, headers={"X-Forwarded-For": "127.0.0.1"})) == "deny"
