"""``iotauth serve``'s ``/metrics``: decisions by endpoint and result, latency by route, the push, who may read it."""

from __future__ import annotations

import base64

import httpx
import pytest

from iotauth.authority import Issued
from iotauth.export.follower import PushHealth, PushState
from tests.fixtures.metrics import Exposition, parse
from tests.http.conftest import ClientFactory
from tests.http.test_emqx import der


async def scrape(client: httpx.AsyncClient) -> Exposition:
    answer = await client.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return parse(answer.text)


def authz(client_id: str, topic: str, action: str = "publish") -> dict[str, str]:
    return {"clientid": client_id, "cert_common_name": client_id, "action": action, "topic": topic}


async def test_decisions_are_counted_by_endpoint_and_result(client: httpx.AsyncClient,
                                                            client_factory: ClientFactory,
                                                            fleet: dict[str, Issued]) -> None:
    pem = base64.b64encode(der(fleet["sensor-1"])).decode()
    assert (await client.post("/emqx/authn", json={"clientid": "sensor-1", "cert_pem": pem})).json()["result"] \
        == "allow"
    for topic, expected in (("devices/sensor-1/telemetry/t", "allow"), ("devices/sensor-2/telemetry/t", "deny"),
                            ("devices/sensor-9/state", "deny")):
        assert (await client.post("/emqx/authz", json=authz("sensor-1", topic))).json()["result"] == expected
    assert (await client.post("/emqx/authz", content=b"{not json", headers={"content-type": "application/json"})
            ).json()["result"] == "deny"
    assert (await client.post("/emqx/typo")).json()["result"] == "deny"
    acl = {"username": "sensor-1", "clientid": "sensor-1", "topic": "devices/sensor-1/state", "acc": 2}
    assert (await client.post("/mosquitto/acl", json=acl)).status_code == 200
    assert (await client.post("/mosquitto/acl", json={**acl, "acc": 9})).status_code == 400
    assert (await client.get("/rabbitmq/user", params={"username": "sensor-1"})).text == "deny"  # not enabled
    outsider = await client_factory(peer="203.0.113.7")
    assert (await outsider.post("/emqx/authz", json=authz("sensor-1", "devices/sensor-1/state"))).json()[
        "result"] == "deny"
    await client.get("/no/such/path")

    shown = await scrape(client)
    decisions = "iotauth_serve_decisions_total"
    assert shown.value(decisions, endpoint="/emqx/authn", result="allow") == 1
    assert shown.value(decisions, endpoint="/emqx/authz", result="allow") == 1
    assert shown.value(decisions, endpoint="/emqx/authz", result="deny") == 2
    assert shown.value(decisions, endpoint="/emqx/authz", result="error") == 1
    assert shown.value(decisions, endpoint="/emqx/{rest:path}", result="deny") == 1  # the route, not the path
    assert shown.value(decisions, endpoint="/mosquitto/acl", result="allow") == 1
    assert shown.value(decisions, endpoint="/mosquitto/acl", result="error") == 1
    assert shown.value(decisions, endpoint="/rabbitmq/user", result="deny") == 1
    assert shown.value(decisions, endpoint="/emqx/authz", result="outside-networks") == 0  # another app's registry
    assert shown.value("iotauth_serve_request_duration_seconds_count", endpoint="/emqx/authz") == 4
    assert shown.value("iotauth_serve_request_duration_seconds_count", endpoint="unmatched") == 1
    assert not any(dict(labels).get("endpoint", "").startswith("/no") for _name, labels in shown.samples)


async def test_callers_outside_the_broker_networks_are_counted_apart(client_factory: ClientFactory,
                                                                     fleet: dict[str, Issued]) -> None:
    client = await client_factory(peer="203.0.113.7", serve={"metrics_networks": ("203.0.113.0/24",)})
    await client.post("/emqx/authz", json=authz("sensor-1", "devices/sensor-1/state"))
    await client.post("/mosquitto/user", json={"username": "sensor-1", "clientid": "sensor-1"})
    await client.get("/rabbitmq/vhost", params={"username": "sensor-1"})
    shown = await scrape(client)
    for endpoint in ("/emqx/authz", "/mosquitto/user", "/rabbitmq/vhost"):
        assert shown.value("iotauth_serve_decisions_total", endpoint=endpoint, result="outside-networks") == 1


@pytest.mark.parametrize(("networks", "peer", "status"), [
    (("127.0.0.0/8", "::1/128"), "127.0.0.1", 200),
    (("127.0.0.0/8", "::1/128"), "10.1.2.3", 403),
    ((), "127.0.0.1", 403),  # an empty allowlist answers nobody
    (("10.0.0.0/8",), "10.1.2.3", 200),
])
async def test_metrics_answer_only_the_metrics_networks(client_factory: ClientFactory, networks: tuple[str, ...],
                                                        peer: str, status: int) -> None:
    client = await client_factory(peer=peer, serve={"metrics_networks": networks, "broker_networks": ()})
    answer = await client.get("/metrics")
    assert answer.status_code == status
    if status == 403:
        assert "iotauth" not in answer.text.split("[serve]")[0] and "metrics_networks" in answer.text


async def test_the_push_health_is_exported(client: httpx.AsyncClient) -> None:
    health = PushHealth("emqx", unhealthy_after=30.0, state=PushState.RETRYING, cursor=41, delivered=7, rejected=1,
                        failures=3, last_success=1_700_000_000.5, failing_since=0.0, clock=lambda: 100.0)
    client._transport.app.state.iotauth.push.append(health)  # type: ignore[attr-defined]
    shown = await scrape(client)
    assert shown.value("iotauth_push_up", target="emqx") == 0  # failing for 100 s > 30 s
    assert shown.value("iotauth_push_state", target="emqx", state="retrying") == 1
    assert shown.value("iotauth_push_state", target="emqx", state="ok") == 0
    assert shown.value("iotauth_push_cursor", target="emqx") == 41
    assert shown.value("iotauth_push_delivered_total", target="emqx") == 7
    assert shown.value("iotauth_push_failures_total", target="emqx") == 3
    assert shown.value("iotauth_push_rejected_total", target="emqx") == 1
    assert shown.value("iotauth_push_last_success_timestamp_seconds", target="emqx") == 1_700_000_000.5
