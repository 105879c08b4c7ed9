"""serve's RabbitMQ HTTP auth backend endpoints, called in-process with RabbitMQ 3.10.8's own request shapes.

Every query string below is one RabbitMQ 3.10.8 sent (logged from the real
nodes; ``tests/export/test_rabbitmq_cluster.py`` drives the same paths
end to end). Field names and encoding: ``rabbit_auth_backend_http.erl``
(``q/1``, ``escape/2``: ``quote_plus``, maps as ``key.subkey``); the answer
must be 200 with ``allow``/``deny`` (``do_http_req/2``, ``parse_resp/1``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from urllib.parse import urlencode

import httpx
import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from iotauth.authority import Authority
from iotauth.config import Home, Profile, load_settings
from iotauth.http.server import ServeOptions, build_app
from iotauth.pki.keys import PrivateKey
from iotauth.policy import Action, PolicySet
from iotauth.rabbitmq import ADMIN_USER, ensure_admin_secret, mqtt_topic, routing_key, topic_request
from iotauth.registry import Registry, RevocationReason
from tests.fixtures.rabbitmq import enable_rabbitmq

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]

CERT_LOGIN = "username=sensor-1"
VHOST = "username=sensor-1&vhost=%2F&ip=127.0.0.1&tags=&client_id=sensor-1"
QUEUE = ("username=sensor-1&vhost=%2F&resource=queue&name=mqtt-subscription-sensor-1qos{qos}&permission={perm}"
         "&tags=&client_id=sensor-1")
EXCHANGE = "username=sensor-1&vhost=%2F&resource=exchange&name=amq.topic&permission={perm}&tags=&client_id=sensor-1"
TOPIC = ("username=sensor-1&vhost=%2F&resource=topic&name=amq.topic&permission={perm}&tags=&routing_key={key}"
         "&variable_map.client_id=sensor-1&variable_map.username=sensor-1&variable_map.vhost=%2F")
STATE = TOPIC.format(perm="write", key="devices.sensor-1.state")


class Backend:
    """Calls as RabbitMQ makes them: GET with the query (or POST with the same fields as a form)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def ask(self, path: str, query: str, method: str = "GET") -> str:
        if method == "GET":
            answer = await self.client.get(f"/rabbitmq/{path}?{query}")
        else:
            answer = await self.client.post(f"/rabbitmq/{path}", content=query,
                                            headers={"content-type": "application/x-www-form-urlencoded"})
        assert answer.status_code == 200, answer.text  # anything else would be RabbitMQ's {error, ...}
        assert answer.headers["content-type"].startswith("text/plain")
        return answer.text


async def _backend(home: Home, registry: Registry, peer: str = "127.0.0.1") -> AsyncIterator[Backend]:
    app = await build_app(home, registry, load_settings(home), ServeOptions())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True, client=(peer, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://iotauth.test") as client:
        yield Backend(client)


@pytest.fixture
async def fleet(home: Home, authority: Authority, csr_factory: CsrFactory) -> Authority:
    enable_rabbitmq(home)
    for device_id, profile in [("sensor-1", "default"), ("sensor-2", "default"), ("svc-ingest", "ingest")]:
        await authority.issue(csr_factory()[1], device_id, profile, actor="op")
    return authority


@pytest.fixture
async def rabbit(home: Home, registry: Registry, fleet: Authority) -> AsyncIterator[Backend]:
    async for backend in _backend(home, registry):
        yield backend


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_device_s_whole_session_as_rabbitmq_asks_for_it(rabbit: Backend, method: str) -> None:
    assert await rabbit.ask("user", CERT_LOGIN, method) == "allow"  # no tags: never a management user
    assert await rabbit.ask("vhost", VHOST, method) == "allow"
    for qos in (0, 1):
        for perm in ("configure", "read", "write"):
            assert await rabbit.ask("resource", QUEUE.format(qos=qos, perm=perm), method) == "allow"
    for perm in ("read", "write"):
        assert await rabbit.ask("resource", EXCHANGE.format(perm=perm), method) == "allow"
    assert await rabbit.ask("topic", TOPIC.format(perm="read", key="devices.sensor-1.commands.%23"), method) == "allow"
    assert await rabbit.ask("topic", TOPIC.format(perm="write", key="devices.sensor-1.telemetry.t"), method) == "allow"
    assert await rabbit.ask("topic", TOPIC.format(perm="write", key="devices.sensor-1.state"), method) == "allow"


@pytest.mark.parametrize(
    ("path", "query"),
    [
        # A password overrides the certificate in RabbitMQ: every password login is refused.
        ("user", "username=sensor-2&password=x&vhost=%2F&client_id=sensor-1"),
        ("user", "username=sensor-1&password=&vhost=%2F&client_id=sensor-1"),
        ("user", "username=sensor-1&password=x"),
        # The management identity's name is refused without its secret, and it has no device rights at all.
        ("user", f"username={ADMIN_USER}&password=guess"),
        ("vhost", f"username={ADMIN_USER}&vhost=%2F&ip=127.0.0.1&tags=administrator"),
        ("resource", f"username={ADMIN_USER}&vhost=%2F&resource=exchange&name=amq.topic&permission=read&tags="),
        ("topic", TOPIC.format(perm="read", key="%23").replace("sensor-1", ADMIN_USER)),
        # Another client id: without this RabbitMQ kicks the device that owns it, cluster-wide.
        ("vhost", "username=sensor-1&vhost=%2F&ip=127.0.0.1&tags=&client_id=sensor-2"),
        ("vhost", "username=sensor-1&vhost=%2F&ip=127.0.0.1&tags="),
        ("user", "username=sensor-1&client_id=sensor-2"),
        ("topic", STATE.replace("client_id=sensor-1", "client_id=x")),
        ("topic", STATE.replace("&variable_map.client_id=sensor-1", "")),
        ("resource", QUEUE.format(qos=0, perm="read").replace("client_id=sensor-1", "client_id=sensor-2")),
        # Another vhost, another device's queue, other exchanges and permissions.
        ("vhost", VHOST.replace("vhost=%2F", "vhost=other")),
        ("resource", QUEUE.format(qos=0, perm="read").replace("vhost=%2F", "vhost=other")),
        ("resource", QUEUE.format(qos=0, perm="read").replace("subscription-sensor-1", "subscription-sensor-2")),
        ("resource", QUEUE.format(qos=2, perm="read")),
        ("resource", "username=sensor-1&vhost=%2F&resource=queue&name=amq.gen-x&permission=read&tags="),
        ("resource", EXCHANGE.format(perm="configure")),
        ("resource", EXCHANGE.format(perm="write").replace("amq.topic", "amq.fanout")),
        ("topic", STATE.replace("name=amq.topic", "name=amq.x")),
        # Topics outside the policy, and keys MQTT cannot have produced.
        ("topic", TOPIC.format(perm="write", key="devices.sensor-2.telemetry.t")),
        ("topic", TOPIC.format(perm="write", key="devices.sensor-1.commands.x")),
        ("topic", TOPIC.format(perm="read", key="devices.%2A.commands.%23")),
        ("topic", TOPIC.format(perm="read", key="%23")),
        ("topic", TOPIC.format(perm="write", key="devices.sensor-1.telemetry.%2A")),
        ("topic", TOPIC.format(perm="write", key="devices%2Fsensor-1%2Ftelemetry%2Ft")),
        ("topic", TOPIC.format(perm="write", key="devices.sensor-1.telemetry.a%2Bb")),
        ("topic", TOPIC.format(perm="configure", key="devices.sensor-1.state")),
        ("topic", TOPIC.format(perm="write", key="%24SYS.x")),
        # Names RabbitMQ cannot keep apart, or splits.
        ("user", "username=sensor-1.x"),
        ("user", "username=%2F%3Asensor-1"),
        ("user", "username=sensor-1%00"),
        ("user", "username="),
        ("user", ""),
        # Malformed: repeated, or not what RabbitMQ's encoder produces.
        ("user", "username=sensor-1&username=sensor-2"),
        ("vhost", VHOST + "&client_id=sensor-2"),
        ("user", "username=%FF"),
        ("user", "username=sensor-1&&x"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_what_is_refused(rabbit: Backend, path: str, query: str, method: str) -> None:
    assert await rabbit.ask(path, query, method) == "deny"


async def test_the_management_identity_logs_in_only_with_its_secret_and_never_over_mqtt(
    rabbit: Backend, home: Home
) -> None:
    secret = ensure_admin_secret(home, load_settings(home).rabbitmq)
    login = urlencode({"username": ADMIN_USER, "password": secret})
    for method in ("GET", "POST"):
        assert await rabbit.ask("user", login, method) == "allow administrator"
    assert await rabbit.ask("user", login + "&vhost=%2F&client_id=x") == "deny"  # an MQTT CONNECT
    assert await rabbit.ask("user", urlencode({"username": ADMIN_USER, "password": secret + "x"})) == "deny"
    assert await rabbit.ask("user", urlencode({"username": "sensor-1", "password": secret})) == "deny"


async def test_decisions_follow_the_registry_at_once(rabbit: Backend, registry: Registry) -> None:
    checks = [("user", CERT_LOGIN), ("vhost", VHOST), ("resource", QUEUE.format(qos=1, perm="read")),
              ("resource", EXCHANGE.format(perm="write")),
              ("topic", TOPIC.format(perm="write", key="devices.sensor-1.telemetry.t"))]
    await registry.suspend("sensor-1", actor="op")
    assert [await rabbit.ask(p, q) for p, q in checks] == ["deny"] * len(checks)
    await registry.resume("sensor-1", actor="op")
    assert [await rabbit.ask(p, q) for p, q in checks] == ["allow"] * len(checks)
    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    assert [await rabbit.ask(p, q) for p, q in checks] == ["deny"] * len(checks)


async def test_an_ingest_service_may_read_every_device_s_telemetry(rabbit: Backend) -> None:
    ingest = TOPIC.replace("sensor-1", "svc-ingest")
    assert await rabbit.ask("topic", ingest.format(perm="read", key="devices.%2A.telemetry.%23")) == "allow"
    assert await rabbit.ask("topic", ingest.format(perm="write", key="devices.sensor-1.commands.x")) == "allow"
    assert await rabbit.ask("topic", ingest.format(perm="read", key="devices.%23")) == "deny"


async def test_oversized_and_wrong_callers_get_deny_with_status_200(
    home: Home, registry: Registry, rabbit: Backend
) -> None:
    assert await rabbit.ask("user", "username=sensor-1&" + "x=1&" * 40) == "deny"  # too many fields
    for size in (20_000, 100_000):  # past the endpoints' own cap, and past the app's 64 KiB one
        answer = await rabbit.client.post("/rabbitmq/user", content=b"username=sensor-1&pad=" + b"x" * size,
                                          headers={"content-type": "application/x-www-form-urlencoded"})
        assert (answer.status_code, answer.text) == (200, "deny")
    assert await rabbit.ask("user", "username=sensor-1&pad=" + "x" * 20_000) == "deny"
    async for outsider in _backend(home, registry, peer="203.0.113.9"):
        assert await outsider.ask("user", CERT_LOGIN) == "deny"  # outside [serve] broker_networks


async def test_nothing_is_allowed_unless_the_home_enables_rabbitmq(home: Home, registry: Registry, fleet: Authority,
                                                                   ) -> None:
    secret = ensure_admin_secret(home, load_settings(home).rabbitmq)
    enable_rabbitmq(home, False)
    async for backend in _backend(home, registry):
        assert await backend.ask("user", CERT_LOGIN) == "deny"
        assert await backend.ask("user", urlencode({"username": ADMIN_USER, "password": secret})) == "deny"
        assert await backend.ask("topic", TOPIC.format(perm="write", key="devices.sensor-1.state")) == "deny"


# -- the translation, property-tested against iotauth's own policy engine ----------------------------------------

LEVELS = st.sampled_from(["devices", "dev-1", "dev-2", "telemetry", "commands", "state", "x", "", "a.b", "a*b", "*",
                          "+", "#", "$SYS", "dev-1.telemetry"])
POLICIES = PolicySet.from_profiles([Profile(
    name="p", publish=("devices/{device_id}/telemetry/#", "devices/{device_id}/state", "devices/+/x"),
    subscribe=("devices/{device_id}/commands/#", "devices/+/telemetry/+"),
)])
POLICY = POLICIES.bind("p", "dev-1")
RULES = [rule.topic_filter for device in ("dev-1", "dev-2") for rule in POLICIES.bind("p", device).rules()]


@st.composite
def near_a_rule(draw: st.DrawFn) -> str:
    """A rule with one level replaced and up to two levels added: where a translation bug would show."""
    levels = draw(st.sampled_from(RULES)).split("/")
    index = draw(st.integers(0, len(levels) - 1))
    levels[index] = draw(LEVELS)
    return "/".join(levels + draw(st.lists(LEVELS, max_size=2)))


TOPICS = st.one_of(st.lists(LEVELS, min_size=1, max_size=6).map("/".join), near_a_rule())


def amqp_matches(binding: str, key: str) -> bool:
    """RabbitMQ's topic exchange: words split at '.', '*' is exactly one word, '#' zero or more."""

    def match(pattern: list[str], words: list[str]) -> bool:
        if not pattern:
            return not words
        if pattern[0] == "#":
            return any(match(pattern[1:], words[i:]) for i in range(len(words) + 1))
        return bool(words) and pattern[0] in ("*", words[0]) and match(pattern[1:], words[1:])

    return match(binding.split("."), key.split("."))


def rabbit_allows(permission: str, key: str) -> bool:
    request = topic_request(permission, key)
    return request is not None and POLICY.allows(*request)


@settings(max_examples=400, deadline=None)
@given(TOPICS)
def test_a_publish_is_decided_on_what_rabbitmq_really_routes(topic: str) -> None:
    key = routing_key(topic)
    if rabbit_allows("write", key):
        # What subscribers receive is the key turned back into MQTT: that is what the policy allowed.
        delivered = mqtt_topic(key)
        assert delivered is not None and POLICY.allows_publish(delivered)
    if "." not in topic and "*" not in topic:  # where MQTT and RabbitMQ agree, exactly the policy
        assert rabbit_allows("write", key) == POLICY.allows_publish(topic)


@settings(max_examples=400, deadline=None)
@given(TOPICS, st.lists(TOPICS, min_size=1, max_size=8))
def test_a_subscription_never_receives_what_the_policy_would_not_deliver(
    topic_filter: str, published: list[str]
) -> None:
    binding = routing_key(topic_filter)
    if rabbit_allows("read", binding):
        for topic in published:
            key = routing_key(topic)
            if "*" in key.split(".") or "#" in key.split("."):
                continue  # a wildcard is never a publishable topic (refused above)
            if amqp_matches(binding, key):
                delivered = mqtt_topic(key)
                assert delivered is not None and POLICY.allows(Action.RECEIVE, delivered), (binding, key)
    if "." not in topic_filter and "*" not in topic_filter:
        assert rabbit_allows("read", binding) == POLICY.allows_subscribe(topic_filter)


def test_the_translation_is_rabbitmq_s() -> None:
    # rabbit_mqtt_util:to_amqp/1 and to_mqtt/1 (v3.10.8)
    assert routing_key("devices/x/+/temp") == "devices.x.*.temp"
    assert routing_key("devices/x.y/#") == "devices.x.y.#"
    assert mqtt_topic("devices.x.*.temp") == "devices/x/+/temp"
    assert mqtt_topic("devices.x.a*b") == "devices/x/a+b"
    assert mqtt_topic("devices/x") is None and mqtt_topic("a+b") is None
