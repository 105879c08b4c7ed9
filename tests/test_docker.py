"""docker/: what can be checked without a Docker engine (none runs on CI machines).

The Dockerfile's sources exist, the entrypoint is valid shell, every iotauth
command the image or compose file runs exists with the options they pass, and
the compose services use the image the Dockerfile builds.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures import iotauth_executable
from tests.fixtures.metrics import Monitored, metric_names

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IOTAUTH = iotauth_executable()


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]


def help_text(*subcommand: str) -> str:
    result = subprocess.run([IOTAUTH, *subcommand, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"iotauth {' '.join(subcommand)} does not exist: {result.stderr}"
    return result.stdout


def assert_command_exists(argv: list[str]) -> None:
    """``argv`` is an iotauth command line: its subcommand and each --option must be known."""
    subcommand = argv[0]
    options = [a.split("=")[0] for a in argv[1:] if a.startswith("--")]
    text = help_text(subcommand)
    for option in options:
        assert re.search(rf"(^|\s){re.escape(option)}[\s,=]", text), f"'iotauth {subcommand}' has no {option}"


def test_copied_sources_exist() -> None:
    copies = [args for kind, args in dockerfile_instructions() if kind == "COPY"]
    assert copies
    for args in copies:
        for source in shlex.split(args)[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_image_runs_as_non_root_with_a_state_volume() -> None:
    instructions = dict(dockerfile_instructions())
    assert instructions["USER"].strip() not in ("root", "0")
    assert "/var/lib/iotauth" in instructions["VOLUME"]
    assert "IOTAUTH_HOME=/var/lib/iotauth" in instructions["ENV"].replace(" ", "")


def test_entrypoint_is_valid_shell_and_its_commands_exist() -> None:
    script = DOCKER / "entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    assert "iotauth init" in text and "--trust-domain" in text and "--server-name" in text
    assert_command_exists(["init", "--trust-domain", "--server-name"])
    instructions = dict(dockerfile_instructions())
    assert "iotauth-entrypoint" in instructions["ENTRYPOINT"]
    assert_command_exists(__import__("json").loads(instructions["CMD"]))


@pytest.fixture(scope="module")
def compose() -> dict[str, object]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


MONITORING = {"prometheus", "grafana"}


def test_compose_services_use_the_built_image(compose: dict[str, object]) -> None:
    services = compose["services"]
    assert isinstance(services, dict) and {"broker", "station", "serve"} | MONITORING <= set(services)
    built = [s for s in services.values() if "build" in s]
    assert len(built) == 1 and built[0]["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / built[0]["build"]["context"] / built[0]["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    image = built[0]["image"]
    assert all(service["image"] == image for name, service in services.items() if name not in MONITORING)
    for name in MONITORING:  # upstream images, pinned: a dashboard is tested against one Grafana, not "latest"
        assert re.fullmatch(r"[a-z/-]+:v?\d+\.\d+\.\d+", services[name]["image"]), services[name]["image"]


def test_compose_commands_exist(compose: dict[str, object]) -> None:
    services = compose["services"]
    assert isinstance(services, dict)
    for name, service in services.items():
        if name not in MONITORING:
            assert_command_exists(service["command"])


def test_station_gets_serial_devices_and_shares_the_home(compose: dict[str, object]) -> None:
    station = compose["services"]["station"]  # type: ignore[index]
    assert all(device.startswith("/dev/tty") for device in station["devices"])
    assert "dialout" in station["group_add"]
    home = "iotauth-home:/var/lib/iotauth"
    for name in ("broker", "station", "serve"):
        assert home in compose["services"][name]["volumes"], name  # type: ignore[index]


# -- monitoring: Prometheus and Grafana (profile "monitoring") ----------------------------------------


def test_monitoring_is_an_optional_profile_on_loopback(compose: dict[str, object]) -> None:
    services = compose["services"]
    assert isinstance(services, dict)
    for name in MONITORING:
        assert services[name]["profiles"] == ["monitoring"]
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"]), name
    assert "monitoring" in services["serve"]["profiles"] and "profiles" not in services["broker"]
    for name in MONITORING:
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"


def test_prometheus_scrapes_what_compose_runs(compose: dict[str, object]) -> None:
    config = DOCKER / "prometheus.yml"
    checked = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True,
                             timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load(config.read_text())["scrape_configs"]}
    services = compose["services"]
    assert isinstance(services, dict)
    broker_command = services["broker"]["command"]
    metrics_bind = broker_command[broker_command.index("--metrics-bind") + 1]
    assert jobs["iotauth-broker"]["static_configs"][0]["targets"] == [f"broker:{metrics_bind.rsplit(':', 1)[1]}"]
    serve_command = services["serve"]["command"]
    serve_bind = serve_command[serve_command.index("--bind") + 1]
    serve_job = jobs["iotauth-serve"]
    assert serve_job["static_configs"][0]["targets"] == [f"serve:{serve_bind.rsplit(':', 1)[1]}"]
    assert serve_job["scheme"] == "https"
    environment = services["serve"]["environment"]
    assert serve_job["tls_config"]["server_name"] == environment["IOTAUTH_SERVER_NAME"]
    ca_file = Path(serve_job["tls_config"]["ca_file"])
    [public] = [v for v in services["prometheus"]["volumes"] if v.startswith("iotauth-public:")]
    assert ca_file.parent == Path(public.split(":")[1]) and ca_file.name == "chain.pem"
    assert f"iotauth-public:{environment['IOTAUTH_PUBLIC_DIR']}" in services["broker"]["volumes"]


def test_grafana_loads_the_dashboard_from_the_provisioned_prometheus(compose: dict[str, object]) -> None:
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/iotauth.yaml").read_text())
    [provider] = providers["providers"]
    grafana = compose["services"]["grafana"]  # type: ignore[index]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    for panel in panels(dashboard()):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
            assert all(target["datasource"]["uid"] == source["uid"] for target in panel["targets"])


def test_the_entrypoint_opens_serve_metrics_to_the_given_networks_and_publishes_the_chain(tmp_path: Path) -> None:
    home, public = tmp_path / "home", tmp_path / "public"
    public.mkdir()
    env = {"PATH": f"{Path(IOTAUTH).parent}:/usr/bin:/bin", "IOTAUTH_HOME": str(home),
           "IOTAUTH_METRICS_NETWORKS": '10.0.0.0/8,fd00::/8"] evil = [1', "IOTAUTH_PUBLIC_DIR": str(public)}
    result = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "status", "--json"], capture_output=True,
                            text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    from iotauth.config import Home, load_settings

    networks = load_settings(Home(home)).serve.metrics_networks
    assert networks[:3] == ("127.0.0.0/8", "::1/128", "10.0.0.0/8")
    assert networks[3].startswith("fd00::/8") and '"' not in networks[3] and " " not in networks[3]
    assert "evil" not in (home / "iotauth.toml").read_text()
    assert (public / "chain.pem").read_bytes() == (home / "ca" / "chain.pem").read_bytes()


# -- the dashboard: Grafana's dashboard model, and metrics that exist ------------------------------------
#
# The structure is checked against Grafana's classic dashboard schema, kinds/dashboard/dashboard_kind.cue in
# github.com/grafana/grafana (read at commit 00139e84396b): #Panel (type non-empty, id uint32, gridPos,
# targets, options, fieldConfig {defaults, overrides}, transformations), #RowPanel (type "row", id, panels,
# collapsed), #GridPos (h > 0, 0 < w <= 24, 0 <= x < 24, y >= 0), #DashboardCursorSync (0|1|2),
# #VariableModel (type from #VariableType, name), #AnnotationQuery (name, datasource, enable, iconColor),
# schemaVersion uint16, refresh string or false. Beyond the schema, what Grafana's layout needs: panels
# inside the 24 columns and never overlapping, unique panel ids and refIds.

VARIABLE_TYPES = {"query", "adhoc", "constant", "datasource", "interval", "textbox", "custom", "system"}


def dashboard() -> dict:
    data = json.loads((DOCKER / "grafana" / "dashboards" / "iotauth.json").read_text())
    assert isinstance(data, dict)
    return data


def panels(data: dict) -> list[dict]:
    found = []
    for panel in data["panels"]:
        found.append(panel)
        found += panel.get("panels", []) if panel.get("type") == "row" else []
    return found


def dashboard_problems(data: dict) -> list[str]:
    problems = []

    def need(condition: bool, what: str) -> None:
        if not condition:
            problems.append(what)

    need(isinstance(data.get("title"), str) and bool(data["title"]), "title")
    need(isinstance(data.get("uid"), str) and 8 <= len(data["uid"]) <= 40, "uid: 8 to 40 characters")
    need(isinstance(data.get("schemaVersion"), int) and 0 <= data["schemaVersion"] < 65536, "schemaVersion")
    need(data.get("graphTooltip", 0) in (0, 1, 2), "graphTooltip")
    need(data.get("refresh") is False or isinstance(data.get("refresh"), str), "refresh")
    need(isinstance(data.get("editable", True), bool), "editable")
    need(all(isinstance(data.get("time", {}).get(k), str) for k in ("from", "to")), "time.from/to")
    for variable in data.get("templating", {}).get("list", []):
        need(variable.get("type") in VARIABLE_TYPES and isinstance(variable.get("name"), str), f"variable {variable}")
    for annotation in data.get("annotations", {}).get("list", []):
        need(all(k in annotation for k in ("name", "datasource", "enable", "iconColor")), f"annotation {annotation}")
    ids: list[int] = []
    cells: set[tuple[int, int]] = set()
    for panel in panels(data):
        title = panel.get("title", "?")
        need(isinstance(panel.get("type"), str) and bool(panel["type"]), f"{title}: type")
        need(isinstance(panel.get("id"), int) and 0 <= panel["id"] < 2**32, f"{title}: id")
        ids.append(panel.get("id"))
        grid = panel.get("gridPos", {})
        h, w, x, y = (grid.get(k) for k in "hwxy")
        if not (all(isinstance(v, int) for v in (h, w, x, y)) and h > 0 and 0 < w <= 24 and 0 <= x < 24 and y >= 0
                and x + w <= 24):
            problems.append(f"{title}: gridPos {grid}")
            continue
        area = {(col, row) for col in range(x, x + w) for row in range(y, y + h)}
        need(not area & cells, f"{title}: overlaps another panel")
        cells |= area
        if panel["type"] == "row":
            need(isinstance(panel.get("panels"), list) and isinstance(panel.get("collapsed"), bool), f"{title}: row")
            continue
        need(isinstance(panel.get("options"), dict), f"{title}: options")
        need(isinstance(panel.get("transformations"), list), f"{title}: transformations")
        field_config = panel.get("fieldConfig", {})
        need(isinstance(field_config.get("defaults"), dict) and isinstance(field_config.get("overrides"), list),
             f"{title}: fieldConfig")
        targets = panel.get("targets", [])
        need(bool(targets) and all(isinstance(t.get("expr"), str) and t["expr"] for t in targets), f"{title}: expr")
        refs = [t.get("refId") for t in targets]
        need(len(set(refs)) == len(refs) and all(isinstance(r, str) and r for r in refs), f"{title}: refIds")
    need(len(set(ids)) == len(ids), "panel ids are unique")
    return problems


def expressions(data: dict) -> list[str]:
    found = [t["expr"] for panel in panels(data) for t in panel.get("targets", [])]
    found += [v["definition"] for v in data["templating"]["list"] if v["type"] == "query"]
    return found


def test_the_dashboard_fits_grafanas_dashboard_model() -> None:
    data = dashboard()
    assert dashboard_problems(data) == []
    assert len([p for p in panels(data) if p["type"] != "row"]) >= 15


def test_the_dashboard_check_finds_what_grafana_would_refuse() -> None:
    """The check above can fail: each of these breaks one rule of the model."""
    for breakage in (lambda d: d["panels"][1]["gridPos"].update(w=25),
                     lambda d: d["panels"][2]["gridPos"].update(x=d["panels"][1]["gridPos"]["x"]),
                     lambda d: d["panels"][1].update(type=""),
                     lambda d: d["panels"][3].update(id=d["panels"][1]["id"]),
                     lambda d: d["panels"][1]["targets"].append(dict(d["panels"][1]["targets"][0])),
                     lambda d: d.update(graphTooltip=3),
                     lambda d: d["templating"]["list"][0].update(type="sql")):
        data = dashboard()
        breakage(data)
        assert dashboard_problems(data), breakage


def test_every_metric_on_the_dashboard_exists_in_a_running_broker_or_serve(monitored: Monitored) -> None:
    broker, serve = monitored.scrape_all()
    named = {name for expression in expressions(dashboard()) for name in metric_names(expression)}
    assert {"iotauth_broker_connects_denied_total", "iotauth_serve_decisions_total", "process_cpu_seconds_total",
            "iotauth_broker_revocation_disconnect_seconds_bucket", "iotauth_push_up"} <= named
    missing = sorted(name for name in named if not broker.knows(name) and not serve.knows(name))
    assert missing == [], f"the dashboard names metrics nothing exports: {missing}"
