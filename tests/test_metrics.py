"""Metrics end to end: Debian's real Prometheus scrapes a broker, ``iotauth serve`` and a renewer; and the exporter.

The Prometheus test runs ``/usr/bin/prometheus`` (``apt-get install prometheus``) on loopback with a
temporary configuration and data directory, scraping every second, and asks its HTTP API what it stored:
connect counters rise after connects, denials appear by reason, serve's decisions by endpoint, the renewer's
session is up, and every expression of the Grafana dashboard is valid PromQL to the real query engine.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from iotauth.errors import ConfigError
from iotauth.histogram import LatencyHistogram
from iotauth.metrics import bounded_labels, exporting, metrics_bind, new_registry
from iotauth.testing import end_process, free_port
from tests.fixtures.broker import ConnectRefused, Device, audit_events, wait_for
from tests.fixtures.metrics import Monitored, parse
from tests.fixtures.rotation import RenewerProcess
from tests.test_docker import dashboard, expressions

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


# -- the shared exporter ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("9108", ("127.0.0.1", 9108)),
    (":9108", ("127.0.0.1", 9108)),  # unlike --bind, a bare port never means every interface
    ("0", ("127.0.0.1", 0)),
    ("0.0.0.0:9108", ("0.0.0.0", 9108)),  # noqa: S104 - asked for explicitly
    ("[::1]:9108", ("::1", 9108)),
    ("metrics.internal:9200", ("metrics.internal", 9200)),
])
def test_a_bare_port_listens_on_loopback_only(text: str, expected: tuple[str, int]) -> None:
    assert metrics_bind(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:x", "99999", "a:b:c"])
def test_a_bad_metrics_address_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        metrics_bind(text)


def test_a_histogram_is_exposed_cumulatively() -> None:
    observed = LatencyHistogram(buckets=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0, -1.0):
        observed.observe(seconds)
    assert observed.cumulative() == [("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert observed.count == 5 and observed.total == pytest.approx(3.65)


def test_label_sets_stay_bounded() -> None:
    counts = [(f"reason-{n}", n) for n in range(1, 101)]
    bounded = list(bounded_labels(counts, limit=10))
    assert len(bounded) == 11 and bounded[0] == ("reason-100", 100) and bounded[-1] == ("other", sum(range(1, 91)))
    assert sum(count for _label, count in bounded) == sum(range(1, 101))


async def test_the_exporter_serves_only_metrics_and_stops() -> None:
    async with exporting(None) as nothing:
        assert nothing is None
    async with exporting("0") as exporter:
        assert exporter is not None and exporter.address is not None
        host, port = exporter.address
        assert host == "127.0.0.1"
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            shown = await client.get("/metrics")
            assert shown.status_code == 200 and "process_cpu_seconds_total" in parse(shown.text).names()
            openmetrics = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
            assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
            assert (await client.get("/")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
    with pytest.raises(httpx.ConnectError):
        await asyncio.to_thread(httpx.get, f"http://{host}:{port}/metrics")
    assert new_registry() is not new_registry()  # never the global registry: two brokers in one process


# -- Debian's Prometheus ------------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, root: Path, monitored: Monitored, renewer: str) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "iotauth-broker",
                 "static_configs": [{"targets": [f"127.0.0.1:{monitored.broker.metrics_port}"]}]},
                {"job_name": "iotauth-serve", "scheme": "https",
                 "tls_config": {"ca_file": str(monitored.home.chain_file)},
                 "static_configs": [{"targets": [monitored.serve.base_url.removeprefix("https://")]}]},
                {"job_name": "iotauth-renewer", "static_configs": [{"targets": [renewer]}]},
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (root / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=root)
        self.root = root
        wait_for(self.ready, timeout=60, message="prometheus ready")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("prometheus exited:\n" + (self.root / "prometheus.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def query(self, expression: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        result = body["data"]["result"]
        assert isinstance(result, list)
        return result

    def value(self, expression: str, **labels: str) -> float | None:
        for series in self.query(expression):
            if all(series["metric"].get(k) == v for k, v in labels.items()):
                return float(series["value"][1])
        return None

    def stop(self) -> None:
        end_process(self.process, 20)
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(monitored: Monitored, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is not installed: run scripts/install-system-deps.sh")
    renewer = RenewerProcess(monitored.home, monitored.broker.port, args=("--metrics-bind", "0")).start()
    try:
        server = Prometheus(tmp_path_factory.mktemp("prometheus"), monitored, renewer.started["metrics"])
        yield server
        server.stop()
    finally:
        renewer.stop()


def test_prometheus_sees_connects_rise_and_denials_by_reason(prometheus: Prometheus, monitored: Monitored) -> None:
    wait_for(lambda: {s["metric"]["job"] for s in prometheus.query("up == 1")} == {"iotauth-broker",
                                                                                    "iotauth-serve",
                                                                                    "iotauth-renewer"},
             timeout=60, message="every target up")
    accepted = "iotauth_broker_connects_accepted_total"
    before = wait_for(lambda: prometheus.query(accepted), timeout=30, message="first scrape")
    start = float(before[0]["value"][1])
    pki, port = monitored.pki, monitored.broker.port
    creds = pki.issue("prom-1")
    for _ in range(3):
        Device(port, creds).connect().close()
    with pytest.raises(ConnectRefused):
        Device(port, creds, client_id="prom-2").connect()
    stranger = pki.forge("prom-stranger", signer="stranger")
    with pytest.raises(ConnectRefused):
        Device(port, stranger).connect()
    reasons = wait_for(lambda: (lambda found: found if len(found) >= 2 else None)(
        {e.data["reason"] for e in audit_events(monitored.home, "broker.connect.denied")}), message="denials")

    wait_for(lambda: (prometheus.value(accepted) or 0) >= start + 3, timeout=60, message="accepted connects")
    for reason in reasons:
        wait_for(lambda r=reason: prometheus.value("iotauth_broker_connects_denied_total", reason=r),
                 timeout=60, message=f"denials for {reason}")
    assert "client-id-mismatch" in reasons
    by_reason = {s["metric"]["reason"] for s in prometheus.query(
        "sum by (reason) (iotauth_broker_connects_denied_total)")}
    assert reasons <= by_reason

    with monitored.serve.client() as client:
        for topic in ("devices/prom-1/telemetry/t", "devices/else/telemetry/t"):
            client.post("/emqx/authz", json={"clientid": "prom-1", "cert_common_name": "prom-1",
                                             "action": "publish", "topic": topic})
    for result in ("allow", "deny"):
        wait_for(lambda r=result: prometheus.value("iotauth_serve_decisions_total", endpoint="/emqx/authz",
                                                   result=r), timeout=60, message=f"serve {result}")
    assert prometheus.value("iotauth_registry_devices", status="active") is not None
    assert prometheus.value("iotauth_renewer_mqtt_connected", job="iotauth-renewer") == 1
    assert prometheus.value("iotauth_renewer_refusals_total", code="stale") == 0


def test_every_dashboard_expression_is_valid_promql_for_prometheus(prometheus: Prometheus) -> None:
    """Grafana sends these to Prometheus as they are, its variables filled in: the real parser must accept them."""
    for expression in expressions(dashboard()):
        filled = (expression.replace("$__rate_interval", "1m").replace("$broker", ".*").replace("$serve", ".*"))
        if filled.startswith("label_values("):  # Grafana's own function: it asks the series API instead
            metric = filled.removeprefix("label_values(").split(",")[0]
            url = f"http://127.0.0.1:{prometheus.port}/api/v1/series?" + urllib.parse.urlencode({"match[]": metric})
            with urllib.request.urlopen(url, timeout=10) as answer:
                found = json.loads(answer.read())
            assert found["status"] == "success" and found["data"], metric  # the variable has values to offer
            continue
        prometheus.query(filled)  # raises on a parse or evaluation error
