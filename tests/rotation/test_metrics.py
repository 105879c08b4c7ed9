"""``iotauth renewer --metrics-bind``: scraped over HTTP while real devices renew through ``iotauth broker``.

Counters move after real actions (a renewal by the reference agent, a stale request, an operator's order, the broker
going away and coming back), and the endpoint tells no more than the broker's own metrics do: no device id, serial,
fingerprint, certificate or key, and it listens only where it was asked to.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from iotauth.errors import RefusalCode
from iotauth.pki.keys import generate_private_key, load_private_key
from iotauth.rotation import messages
from tests.fixtures.broker import BrokerProcess, Pki, configured_home, connect, iotauth_cli, wait_for
from tests.fixtures.metrics import Exposition, scrape
from tests.fixtures.rotation import RenewerProcess, agent, renewal_stack, state_dir


class Stack:
    def __init__(self, broker: BrokerProcess, pki: Pki, renewer: RenewerProcess) -> None:
        self.broker, self.pki, self.renewer = broker, pki, renewer

    @property
    def url(self) -> str:
        return f"http://{self.renewer.started['metrics']}/metrics"

    def scrape(self) -> Exposition:
        return scrape(self.url)

    def until(self, name: str, at_least: float, **labels: str) -> Exposition:
        """Scrape until ``name`` (with exactly ``labels``) reaches ``at_least`` (bounded wait)."""
        return wait_for(lambda: (lambda shown: shown if shown.value(name, **labels) >= at_least else None)(
            self.scrape()), timeout=30, message=f"{name}{labels} >= {at_least}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with renewal_stack(tmp_path_factory.mktemp("renewer-metrics"), "--metrics-bind", "0") as started:
        yield Stack(*started)


def test_the_endpoint_listens_on_loopback_only_and_shows_the_connection(stack: Stack) -> None:
    host, port = stack.renewer.started["metrics"].rsplit(":", 1)
    assert host == "127.0.0.1"  # a bare port is loopback only
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.2", int(port)), timeout=2):
        pass  # the rest of 127.0.0.0/8 is another address: nothing listens there
    shown = stack.scrape()
    assert shown.value("iotauth_renewer_mqtt_connected") == 1
    assert shown.value("iotauth_renewer_mqtt_subscribed") == 1
    assert shown.value("iotauth_renewer_mqtt_subscriptions_refused_total") == 0
    assert shown.value("iotauth_renewer_mqtt_connects_total") >= 1
    assert shown.value("iotauth_renewer_mqtt_refused_total") == 0
    for code in RefusalCode:  # every code exported from the start, so rate() sees the first refusal
        assert ("iotauth_renewer_refusals_total", frozenset({("code", code.value)})) in shown.samples
    assert shown.knows("iotauth_renewer_issuance_seconds_bucket")
    assert shown.value("iotauth_renewer_queued_messages") == 0
    assert "process_cpu_seconds_total" in shown.names()


def test_a_renewal_and_a_refusal_move_their_counters(stack: Stack, tmp_path: Path) -> None:
    before = stack.scrape()
    creds = stack.pki.issue("metrics-renew")
    done = agent(state_dir(tmp_path / "dev", creds, stack.pki.home, stack.broker.port))
    assert done.returncode == 0, done.stderr
    after = stack.until("iotauth_renewer_requests_total", before.value(
        "iotauth_renewer_requests_total", type="confirm", result="activated") + 1, type="confirm", result="activated")
    assert after.value("iotauth_renewer_requests_total", type="renew", result="issued") == before.value(
        "iotauth_renewer_requests_total", type="renew", result="issued") + 1
    assert after.value("iotauth_renewer_issuance_seconds_count") == before.value(
        "iotauth_renewer_issuance_seconds_count") + 1
    assert after.value("iotauth_renewer_issuance_seconds_sum") > before.value("iotauth_renewer_issuance_seconds_sum")

    stale = stack.pki.issue("metrics-stale")
    key = load_private_key(stale.key.read_bytes(), None, "device key")
    request = messages.make_renew(key, x509.load_pem_x509_certificate(stale.cert.read_bytes()),
                                  messages.make_csr(generate_private_key("p256"), stale.device_id), stale.device_id,
                                  timestamp=int(time.time()) - 3600)
    with connect(stack.broker.port, stale) as client:
        client.subscribe(messages.response_topic(stale.device_id))
        client.publish(messages.request_topic(stale.device_id), request.encode())
        answer = messages.decode_response(client.receive(timeout=30).payload)
    assert answer.error is RefusalCode.STALE
    shown = stack.until("iotauth_renewer_refusals_total", before.value("iotauth_renewer_refusals_total",
                                                                       code="stale") + 1, code="stale")
    assert shown.value("iotauth_renewer_requests_total", type="renew", result="refused") == before.value(
        "iotauth_renewer_requests_total", type="renew", result="refused") + 1
    leaks(shown_text(stack), ["metrics-renew", "metrics-stale", creds.serial, creds.fingerprint, stale.serial,
                              stale.fingerprint, json.loads(done.stdout)["serial"]])


def test_an_order_is_open_until_the_device_renewed(stack: Stack, tmp_path: Path) -> None:
    creds = stack.pki.issue("metrics-order")
    before = stack.scrape()
    ordered = iotauth_cli(stack.pki.home, "rotate", "metrics-order", "--json")
    assert ordered.returncode == 0, ordered.stderr
    stack.until("iotauth_renewer_order_messages_total", before.value("iotauth_renewer_order_messages_total",
                                                                     action="order") + 1, action="order")
    assert stack.scrape().value("iotauth_renewer_orders_open") == before.value("iotauth_renewer_orders_open") + 1
    done = agent(state_dir(tmp_path / "dev", creds, stack.pki.home, stack.broker.port))
    assert done.returncode == 0, done.stderr
    shown = stack.until("iotauth_renewer_order_messages_total", before.value("iotauth_renewer_order_messages_total",
                                                                             action="clear") + 1, action="clear")
    assert shown.value("iotauth_renewer_orders_open") == before.value("iotauth_renewer_orders_open")
    leaks(shown_text(stack), ["metrics-order", creds.serial, creds.fingerprint])


def test_the_connection_state_follows_the_broker(tmp_path: Path) -> None:
    home = configured_home(tmp_path)
    broker = BrokerProcess(home).start()
    renewer = RenewerProcess(home, broker.port, args=("--metrics-bind", "0")).start()
    url = f"http://{renewer.started['metrics']}/metrics"
    try:
        assert scrape(url).value("iotauth_renewer_mqtt_connected") == 1
        broker.stop()
        down = wait_for(lambda: (lambda s: s if s.value("iotauth_renewer_mqtt_connected") == 0 else None)(
            scrape(url)), timeout=30, message="renewer sees the broker gone")
        assert down.value("iotauth_renewer_mqtt_disconnects_total") == 1
        assert down.value("iotauth_renewer_mqtt_subscribed") == 0
        broker = BrokerProcess(home, port=broker.port).start()
        back = wait_for(lambda: (lambda s: s if s.value("iotauth_renewer_mqtt_subscribed") == 1 else None)(
            scrape(url)), timeout=60, message="renewer reconnected and reading")
        assert back.value("iotauth_renewer_mqtt_connects_total") == 2
    finally:
        renewer.stop()
        broker.stop()


def test_a_bad_metrics_address_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    home = configured_home(tmp_path)
    result = iotauth_cli(home, "renewer", "--broker", "127.0.0.1:1", "--metrics-bind", "host:")
    assert result.returncode != 0 and "bad metrics address" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (home.root / "renewer").exists()  # no certificate issued for a renewer that cannot start


def shown_text(stack: Stack) -> str:
    import urllib.request

    with urllib.request.urlopen(stack.url, timeout=10) as answer:  # noqa: S310 - a test URL
        return str(answer.read().decode())


def leaks(text: str, private: list[str]) -> None:
    """Nothing that identifies a device, a certificate or a key is in the exposition."""
    for value in private:
        assert value not in text, value
    samples = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for marker in ("BEGIN", "PRIVATE", "devices/", "spiffe://"):
        assert marker not in samples, marker
