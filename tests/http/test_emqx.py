"""``/emqx/authn`` and ``/emqx/authz`` against EMQX's contract, both ways.

Requests are built the way EMQX builds them (:func:`tests.fixtures.emqx.authn_request`:
``emqx_auth_utils:generate_request/2`` and ``render_var/2`` at v5.8.0) and every
answer is read the way EMQX reads it (:func:`~tests.fixtures.emqx.authn_outcome`:
``emqx_authn_http:authenticate/2``; :func:`~tests.fixtures.emqx.authz_outcome`:
``emqx_authz_http:authorize/4``). A test passes only if EMQX would reach the
intended decision, not merely if iotauth printed the intended word.

EMQX source: github.com/emqx/emqx, tag v5.8.0 (commit e5ed59deb633) unless a test names another ref
(v5.8.2 cbf64766e2b3, 6.2.2 f7b2e6d8e2c5, HEAD 50e04386de84).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from iotauth.authority import Authority, Issued
from iotauth.certs import pem
from iotauth.pki.keys import generate_private_key
from iotauth.registry import Registry, RevocationReason
from tests.fixtures import emqx
from tests.fixtures.pki import forge_certificate
from tests.fixtures.rotation import pending_renewal
from tests.http.conftest import ClientFactory, CsrFactory

TEMPLATE = {"clientid": "${clientid}", "cert_common_name": "${cert_common_name}", "cert_pem": "${cert_pem}"}
"""The body the README tells operators to configure."""
JSON = "application/json"
AUTHZ_TEMPLATE = {"clientid": "${clientid}", "cert_common_name": "${cert_common_name}", "action": "${action}",
                  "topic": "${topic}"}


def der(issued: Issued) -> bytes:
    return issued.certificate.public_bytes(Encoding.DER)


def pem_to_der(text: str) -> bytes:
    return x509.load_pem_x509_certificate(text.encode()).public_bytes(Encoding.DER)


def device(issued: Issued | None, clientid: str, **overrides: object) -> emqx.Client:
    """The client EMQX sees: a TLS peer presenting ``issued`` (CN: its device id), CONNECTing as ``clientid``."""
    values: dict[str, object] = {"clientid": clientid}
    if issued is not None:
        values["cert_der"] = der(issued)
        values["cert_common_name"] = issued.record.device_id
    values.update(overrides)
    return emqx.Client(**values)  # type: ignore[arg-type]


async def connect(client: httpx.AsyncClient, emqx_client: emqx.Client, *, template: Mapping[str, str] = TEMPLATE,
                  method: str = "post", content_type: str = "application/json",
                  allowed: tuple[str, ...] = emqx.AUTHN_ALLOWED) -> emqx.AuthnOutcome:
    verb, path, headers, body = emqx.authn_request(template, emqx_client, method=method, content_type=content_type,
                                                   allowed=allowed)
    answer = await client.request(verb, path, headers=headers, content=body)
    return emqx.authn_outcome(answer.status_code, answer.headers, answer.content, int(time.time()))


async def authorize(client: httpx.AsyncClient, clientid: str, action: str, topic: str, *,
                    cn: str | None = None) -> str:
    rendered = emqx.render(AUTHZ_TEMPLATE, emqx.Client(clientid, cert_common_name=cn if cn is not None else clientid),
                           allowed=(*emqx.AUTHN_ALLOWED, "action", "topic"))
    rendered = {**rendered, "action": action, "topic": topic}
    answer = await client.post("/emqx/authz", json=rendered)
    return emqx.authz_outcome(answer.status_code, answer.headers, answer.content)


# -- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "content_type"), [("post", "application/json"),
                                                      ("post", "application/x-www-form-urlencoded"),
                                                      ("get", "")])
async def test_a_device_is_admitted_from_the_base64_der_emqx_sends(
    client: httpx.AsyncClient, fleet: dict[str, Issued], method: str, content_type: str
) -> None:
    """E1: ``${cert_pem}`` is ``base64:encode(DER)``, no armour (``emqx_auth_utils.erl`` 5.8.0 lines 210-211)."""
    outcome = await connect(client, device(fleet["sensor-1"], "sensor-1"), method=method, content_type=content_type)
    assert outcome.result == "allow", outcome
    assert outcome.is_superuser is False and outcome.raw["is_superuser"] is False
    assert outcome.expire_at == int(fleet["sensor-1"].certificate.not_valid_after_utc.timestamp())
    assert outcome.acl is not None
    assert emqx.evaluate(outcome.acl, "publish", "devices/sensor-1/state") == "allow"
    assert emqx.evaluate(outcome.acl, "publish", "devices/sensor-2/state") == "deny"
    assert emqx.evaluate(outcome.acl, "subscribe", "$SYS/brokers/#", version="5.8.2") == "deny"


async def test_a_pem_block_is_accepted_too(client: httpx.AsyncClient, fleet: dict[str, Issued]) -> None:
    body = {"clientid": "sensor-1", "cert_common_name": "sensor-1", "cert_pem": pem(fleet["sensor-1"].certificate)
            .decode()}
    answer = await client.post("/emqx/authn", json=body)
    assert emqx.authn_outcome(answer.status_code, answer.headers, answer.content, int(time.time())).result == "allow"


@pytest.mark.parametrize("case", ["5.7.0 literal", "no client certificate", "template without cert_pem",
                                  "cert_fingerprint"])
async def test_without_a_certificate_the_default_is_to_refuse(
    client: httpx.AsyncClient, fleet: dict[str, Issued], case: str
) -> None:
    """No certificate presented: ``""`` (``render_var(_, undefined) -> <<>>``) or the literal ``${cert_pem}``
    that EMQX 5.7.0 sends for a placeholder it does not know (``handle_disallowed_placeholders/3``). E2: there
    is no ``${cert_fingerprint}``; it arrives literally (``t_disallowed_placeholders_preserved``)."""
    emqx_client = device(fleet["sensor-1"], "sensor-1")
    template: Mapping[str, str] = TEMPLATE
    allowed = emqx.AUTHN_ALLOWED
    if case == "5.7.0 literal":
        allowed = tuple(a for a in emqx.AUTHN_ALLOWED if a != "cert_pem")
    elif case == "no client certificate":
        emqx_client = device(None, "sensor-1", cert_common_name="sensor-1")
    elif case == "template without cert_pem":
        template = {k: v for k, v in TEMPLATE.items() if k != "cert_pem"}
    else:
        template = {**{k: v for k, v in TEMPLATE.items() if k != "cert_pem"}, "cert_fingerprint": "${cert_fingerprint}"}
    verb, path, headers, body = emqx.authn_request(template, emqx_client, allowed=allowed)
    if case == "5.7.0 literal":
        assert b'"${cert_pem}"' in body
    if case == "cert_fingerprint":
        assert b'"${cert_fingerprint}"' in body
    answer = await client.request(verb, path, headers=headers, content=body)
    assert emqx.authn_outcome(answer.status_code, answer.headers, answer.content, int(time.time())).result == "deny"


async def test_per_device_decisions_without_a_certificate_only_when_unambiguous(
    client_factory: ClientFactory, fleet: dict[str, Issued], authority: Authority, registry: Registry,
    csr_factory: CsrFactory,
) -> None:
    """``require_certificate = false`` (TLS terminated by a PROXY-protocol proxy, EMQX before 5.7.1)."""
    client = await client_factory(emqx={"require_certificate": False})
    bare = device(None, "sensor-1", cert_common_name="sensor-1")
    assert (await connect(client, bare)).result == "allow"
    assert (await connect(client, device(None, "sensor-1"))).result == "deny"  # not even a CN: no identity at all
    # A second certificate, revoked while still valid: the CN alone could be either one now.
    second = await authority.issue(csr_factory()[1], "sensor-1", actor="op")
    await registry.revoke_certificate(second.record.serial, RevocationReason.KEY_COMPROMISE, actor="op")
    assert (await connect(client, bare)).result == "deny"
    assert (await connect(client, device(fleet["sensor-1"], "sensor-1"))).result == "allow"  # with the certificate
    assert (await connect(client, device(second, "sensor-1"))).result == "deny"


@pytest.mark.parametrize(
    ("owner", "clientid", "overrides"),
    [
        ("sensor-1", "sensor-2", {}),  # someone else's certificate
        ("sensor-1", "sensor-1", {"cert_common_name": "sensor-2"}),
        ("sensor-1", "sensor/1", {}),
        ("sensor-1", "#", {}),
        ("sensor-1", "sensor-1", {"password": "hunter2"}),  # devices use certificates only
        ("sensor-1", "sensor-1", {"cert_der": b"\x30\x03\x02\x01\x00"}),  # not a certificate
    ],
)
async def test_identity_mismatches_are_denied(
    client: httpx.AsyncClient, fleet: dict[str, Issued], owner: str, clientid: str, overrides: dict[str, object]
) -> None:
    template = {**TEMPLATE, "password": "${password}"}
    assert (await connect(client, device(fleet[owner], clientid, **overrides), template=template)).result == "deny"


async def test_a_certificate_from_another_ca_is_denied(client: httpx.AsyncClient, fleet: dict[str, Issued]) -> None:
    key = generate_private_key("p256")
    forged = forge_certificate(key.public_key(), key, fleet["sensor-1"].certificate.issuer, common_name="sensor-1",
                               uris=["spiffe://iotauth.local/device/sensor-1"])
    outcome = await connect(client, emqx.Client("sensor-1", cert_der=forged.public_bytes(Encoding.DER),
                                                cert_common_name="sensor-1"))
    assert outcome.result == "deny"


async def test_decisions_follow_the_registry_at_once(
    client: httpx.AsyncClient, fleet: dict[str, Issued], registry: Registry
) -> None:
    sensor = device(fleet["sensor-1"], "sensor-1")
    await registry.suspend("sensor-1", actor="op")
    assert (await connect(client, sensor)).result == "deny"
    assert await authorize(client, "sensor-1", "publish", "devices/sensor-1/state") == "deny"
    await registry.resume("sensor-1", actor="op")
    assert (await connect(client, sensor)).result == "allow"
    await registry.revoke_certificate(fleet["sensor-1"].record.serial, RevocationReason.SUPERSEDED, actor="op")
    assert (await connect(client, sensor)).result == "deny"  # per certificate, not per device
    await registry.revoke("sensor-2", RevocationReason.KEY_COMPROMISE, actor="op")
    assert (await connect(client, device(fleet["sensor-2"], "sensor-2"))).result == "deny"
    assert await authorize(client, "sensor-2", "publish", "devices/sensor-2/state") == "deny"


async def test_a_pending_renewal_is_activated_by_its_first_authentication(
    client: httpx.AsyncClient, authority: Authority, registry: Registry
) -> None:
    """Rotation on EMQX: the new certificate's first CONNECT activates it; EMQX's own session takeover (same client
    id) closes the old session, so the push does not kick (tests/http/test_push.py)."""
    current, renewal = await pending_renewal(authority, "renew-1")
    outcome = await connect(client, emqx.Client("renew-1", cert_der=renewal, cert_common_name="renew-1"))
    assert outcome.result == "allow"
    states = {c.serial: c for c in await registry.certificates_of("renew-1")}
    assert states.pop(current.serial).revocation_reason is RevocationReason.SUPERSEDED
    assert [c.status.value for c in states.values()] == ["active"]
    activated = [e for e in await registry.events(device_id="renew-1") if e.kind == "certificate.activated"]
    assert activated[-1].data["via"] == "connect" and activated[-1].actor.startswith("serve@")
    old = await connect(client, emqx.Client("renew-1", cert_der=pem_to_der(current.pem), cert_common_name="renew-1"))
    assert old.result == "deny"


async def test_a_renewal_presented_for_another_client_id_is_not_activated(
    client: httpx.AsyncClient, authority: Authority, registry: Registry
) -> None:
    _, renewal = await pending_renewal(authority, "renew-2")
    outcome = await connect(client, emqx.Client("renew-3", cert_der=renewal, cert_common_name="renew-2"))
    assert outcome.result == "deny"
    assert "pending" in {c.status.value for c in await registry.certificates_of("renew-2")}


# -- authorization ---------------------------------------------------------------------------------


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
async def test_authz_uses_the_profile_policy(
    client: httpx.AsyncClient, clientid: str, action: str, topic: str, result: str
) -> None:
    assert await authorize(client, clientid, action, topic) == result


async def test_authz_binds_the_client_id_to_the_certificate_name(client: httpx.AsyncClient) -> None:
    assert await authorize(client, "sensor-1", "publish", "devices/sensor-1/state", cn="sensor-2") == "deny"
    assert await authorize(client, "sensor-1", "publish", "devices/sensor-1/state", cn="") == "allow"


async def test_authz_takes_the_query_string_of_a_get(client: httpx.AsyncClient) -> None:
    answer = await client.get("/emqx/authz", params={"clientid": "sensor-1", "action": "publish",
                                                     "topic": "devices/sensor-1/state"})
    assert emqx.authz_outcome(answer.status_code, answer.headers, answer.content) == "allow"


# -- errors: 200 deny, never anything EMQX would read as "go on" ------------------------------------


def test_why_errors_must_be_a_200_deny() -> None:
    """E3 in EMQX's own terms: a 4xx/5xx from the authorizer is ``ignore``, and the chain goes on to
    ``acl.conf``'s ``{allow, all}`` (5.8.0 ``etc/acl.conf``) or ``no_match = allow``."""
    for status in (400, 403, 413, 503):
        http = emqx.authz_outcome(status, {"content-type": "application/json"}, b'{"error": "x"}')
        assert emqx.authorize_chain(None, http, "publish", "devices/sensor-2/state") == "allow"
    http = emqx.authz_outcome(200, {"content-type": "application/json"}, b'{"result": "deny"}')
    assert emqx.authorize_chain(None, http, "publish", "devices/sensor-2/state") == "deny"
    assert emqx.authn_outcome(503, {}, b"", 0).result == "ignore"  # authn: the next authenticator decides


@pytest.fixture
async def bad_requests(client: httpx.AsyncClient) -> list[tuple[str, httpx.Response]]:
    def chunks() -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b" " * 1024
        return gen()

    answers = []
    for path in ("/emqx/authn", "/emqx/authz"):
        answers += [
            (f"{path} not json", await client.post(path, content=b"{nope", headers={"content-type": JSON})),
            (f"{path} a list", await client.post(path, json=["clientid", "sensor-1"])),
            (f"{path} deep", await client.post(path, content=b"[" * 5000 + b"]" * 5000)),
            (f"{path} oversize", await client.post(path, content=b" " * (1 << 20))),
            (f"{path} chunked", await client.post(path, content=chunks())),
            (f"{path} twice", await client.get(path, params=[("clientid", "sensor-1"), ("clientid", "sensor-2")])),
            (f"{path} no fields", await client.post(path, json={})),
            (f"{path} numbers", await client.post(path, json={"clientid": 7, "action": 1, "topic": 2})),
            (f"{path} put", await client.put(path, json={})),
        ]
    answers.append(("typo", await client.post("/emqx/authz/", json={"clientid": "sensor-1"})))
    answers.append(("other path", await client.get("/emqx/anything")))
    answers.append(("bad action", await client.post("/emqx/authz", json={"clientid": "sensor-1", "action": "all",
                                                                        "topic": "devices/sensor-1/state"})))
    return answers


async def test_every_error_is_a_200_deny(bad_requests: list[tuple[str, httpx.Response]]) -> None:
    for name, answer in bad_requests:
        assert answer.status_code == 200, name
        assert emqx.authz_outcome(answer.status_code, answer.headers, answer.content) == "deny", name
        assert emqx.authn_outcome(answer.status_code, answer.headers, answer.content, 0).result == "deny", name


async def test_a_registry_outage_is_a_200_deny(client: httpx.AsyncClient, fleet: dict[str, Issued],
                                               registry: Registry) -> None:
    await registry.close()
    assert await authorize(client, "sensor-1", "publish", "devices/sensor-1/state") == "deny"
    assert (await connect(client, device(fleet["sensor-1"], "sensor-1"))).result == "deny"


async def test_callers_outside_the_broker_network_get_a_200_deny(
    client_factory: ClientFactory, fleet: dict[str, Issued]
) -> None:
    client = await client_factory(peer="10.9.9.9", serve={"broker_networks": ("10.0.0.0/24",)})
    assert await authorize(client, "sensor-1", "publish", "devices/sensor-1/state") == "deny"
    assert (await connect(client, device(fleet["sensor-1"], "sensor-1"))).result == "deny"
    inside = await client_factory(peer="10.0.0.7", serve={"broker_networks": ("10.0.0.0/24",)})
    assert await authorize(inside, "sensor-1", "publish", "devices/sensor-1/state") == "allow"
