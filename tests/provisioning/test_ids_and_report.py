"""Device id assignment (templates, CSV mappings, id lists) and the traceability report file."""

from __future__ import annotations

import csv
import json
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from iotauth.authority import Authority
from iotauth.config import Home, Settings, load_settings
from iotauth.errors import ConfigError, InvalidIdentity, ProvisioningError
from iotauth.provisioning.ids import IdTemplate, MappedIds, PooledIds, load_id_source
from iotauth.provisioning.line import LineRequest, id_source
from iotauth.provisioning.report import REPORT_FIELDS, append_report
from iotauth.provisioning.results import ProvisionResult, Step
from iotauth.provisioning.station import StationConfig, expand_ports
from iotauth.registry import Registry
from tests.fixtures.rabbitmq import enable_rabbitmq


@pytest.mark.parametrize("template", [
    "{hardware_id.__class__}", "{hardware_id[0]}", "{hardware_id!r}", "{hardware_id:>70}", "{serial}", "{0}",
    "{}", "{hardware_id", "x}", "{hardware_id|nope}", "{hardware_id|safe.__class__}", "{hardware_id|safe:>9}",
    "{serial|safe}",
])
def test_templates_cannot_reach_into_python(template: str) -> None:
    with pytest.raises(ConfigError):
        IdTemplate(template)


def test_template_output_is_validated() -> None:
    template = IdTemplate("sensor-{hardware_id}")
    assert template.render("AB12", "m") == "sensor-AB12"
    assert IdTemplate("{model}-{hardware_id}").render("X1", "rev2") == "rev2-X1"
    for hardware_id in ("AA:BB", "a/b", "x" * 60):
        with pytest.raises(InvalidIdentity):
            template.render(hardware_id, "m")
    with pytest.raises(InvalidIdentity):
        IdTemplate("{model}").render("X", "../../etc")


@pytest.mark.parametrize(("template", "hardware_id", "model", "expected"), [
    ("sensor-{hardware_id|safe}", "aa:bb:cc:dd:ee:ff", "m", "sensor-aa-bb-cc-dd-ee-ff"),
    ("sensor-{hardware_id|safe}", "SN.1_2-3", "m", "sensor-SN.1_2-3"),  # ids without ':' keep their old device id
    ("sensor-{hardware_id|mac}", "AA:BB:CC:DD:EE:FF", "m", "sensor-aabbccddeeff"),
    ("sensor-{hardware_id|mac}", "aa-bb-cc-dd-ee-ff-00-11", "m", "sensor-aabbccddeeff0011"),
    ("sensor-{hardware_id|mac|upper}", "aabbccddeeff", "m", "sensor-AABBCCDDEEFF"),
    ("{model|safe|lower}-{hardware_id|safe}", "X:1", "Rev:B", "rev-b-X-1"),
], ids=["mac through safe", "safe is the identity on safe ids", "mac", "eui-64", "mac then upper", "model"])
def test_template_filters_map_hardware_ids_to_device_ids(template: str, hardware_id: str, model: str,
                                                          expected: str) -> None:
    assert IdTemplate(template).render(hardware_id, model) == expected


@pytest.mark.parametrize(("template", "hardware_id", "model", "message"), [
    ("sensor-{hardware_id}", "aa:bb:cc:dd:ee:ff", "m", r"need \{hardware_id\|safe\}"),
    ("{model|safe}", "X", "a b", r"\|safe cannot map the character ' ' in 'a b'"),
    ("sensor-{hardware_id|mac}", "aa:bb:cc:dd:ee", "m", r"not a MAC address"),
    ("sensor-{hardware_id|mac}", "aa:bb-cc:dd:ee:ff", "m", r"not a MAC address"),  # mixed separators
    ("sensor-{hardware_id|safe}", "A" * 58, "m", r"would be 65 characters, at most 64"),
], ids=["plain field with ':'", "unmappable character", "short mac", "mixed separators", "too long"])
def test_template_filters_refuse_what_they_cannot_map(template: str, hardware_id: str, model: str,
                                                       message: str) -> None:
    with pytest.raises(InvalidIdentity, match=message):
        IdTemplate(template).render(hardware_id, model)


def test_the_default_template_maps_mac_addresses(home: Home) -> None:
    """Both defaults: the one a new home's iotauth.toml spells out and the one used when it says nothing."""
    for settings in (load_settings(home), Settings(trust_domain="example.test")):
        assert IdTemplate(settings.id_template).render("aa:bb:cc:dd:ee:ff", "m") == "sensor-aa-bb-cc-dd-ee-ff"


def test_csv_mapping(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "ids.csv"
    path.write_text("# line 1 comment\nhardware_id,device_id\nAA:01,meter-1\nAA:02,meter-2\n")
    source = load_id_source(path, registry)
    assert isinstance(source, MappedIds) and source.mapping == {"AA:01": "meter-1", "AA:02": "meter-2"}


@pytest.mark.parametrize("text", [
    "hardware_id,device_id\nAA:01,bad/id\n",
    "hardware_id,device_id\nAA:01,a\nAA:01,b\n",
    "hardware_id,device_id\nAA:01,a\nAA:02,a\n",
    "hardware_id,device_id\nAA:01\n",
    "device_id\nok\nnot ok\n",
    "",
])
def test_bad_ids_files_are_refused_before_any_device(text: str, tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "ids.csv"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_id_source(path, registry)


async def test_id_pool_skips_ids_in_use_and_is_stable_per_board(
    tmp_path: Path, registry: Registry, csr_factory: object, authority: object
) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("device_id\ntaken\nfree-1\nfree-2\n")
    _key, csr = csr_factory()  # type: ignore[operator]
    await authority.issue(csr, "taken", actor="test")  # type: ignore[attr-defined]
    pool = load_id_source(path, registry)
    assert isinstance(pool, PooledIds)
    assert await pool.assign("HW-1", "m", None) == "free-1"
    assert await pool.assign("HW-1", "m", None) == "free-1"
    assert await pool.assign("HW-2", "m", None) == "free-2"
    with pytest.raises(ProvisioningError):
        await pool.assign("HW-3", "m", None)


def _result(**overrides: object) -> ProvisionResult:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    values: dict[str, object] = dict(port="/dev/ttyUSB0", station="st", operator="op", result="provisioned",
                                     started_at=now, finished_at=now, step=Step.ACTIVATE, device_id="d-1",
                                     hardware_id="HW-1", serial="ab", fingerprint="cd")
    values.update(overrides)
    return ProvisionResult(**values)  # type: ignore[arg-type]


def test_report_cells_cannot_become_formulas(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    append_report(path, [_result(result="failed", error="=HYPERLINK(\"http://evil\")\r\nmore").as_row()])
    with path.open(newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["error"].startswith("'=") and "\n" not in row["error"] and "\r" not in row["error"]


def _append_many(path: str, worker: int) -> None:
    for n in range(25):
        append_report(Path(path), [_result(device_id=f"w{worker}-{n}").as_row()])


def test_concurrent_appends_from_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "many.csv"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    lines = path.read_text().splitlines()
    assert lines.count(",".join(REPORT_FIELDS)) == 1
    with path.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 100 and len({r["device_id"] for r in table}) == 100
    assert all(len(r) == len(REPORT_FIELDS) for r in table)


def test_jsonl_report(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    append_report(path, [_result().as_row(), _result(device_id="d-2").as_row()])
    append_report(path, [_result(device_id="d-3").as_row()])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["device_id"] for line in lines] == ["d-1", "d-2", "d-3"]
    assert lines[0]["started_at"] == "2026-01-02T03:04:05.000000Z"


def test_report_has_no_row_cap(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    append_report(path, [_result(device_id=f"d-{n}").as_row() for n in range(1500)])
    append_report(path, [_result(device_id="last").as_row()])
    assert len(path.read_text().splitlines()) == 1502


def test_expand_ports(tmp_path: Path) -> None:
    for name in ("ttyUSB1", "ttyUSB0", "other"):
        (tmp_path / name).touch()
    assert expand_ports([str(tmp_path / "ttyUSB*"), str(tmp_path / "ttyUSB0")]) == [
        str(tmp_path / "ttyUSB0"), str(tmp_path / "ttyUSB1")]
    with pytest.raises(ProvisioningError):
        expand_ports([str(tmp_path / "nothing*")])


@pytest.mark.parametrize(("template", "ids"), [
    ("sensor.{hardware_id}", None),
    (None, "device_id\nok-1\nnot.ok\n"),
    (None, "hardware_id,device_id\nAA:01,ok-1\nAA:02,not.ok\n"),
])
async def test_a_rabbitmq_home_refuses_dotted_ids_before_any_board(
    template: str | None, ids: str | None, tmp_path: Path, home: Home, authority: Authority
) -> None:
    enable_rabbitmq(home)
    authority.settings = load_settings(home)
    path = None
    if ids is not None:
        path = tmp_path / "ids.csv"
        path.write_text(ids)
    request = LineRequest(ports=("/dev/null",), config=StationConfig(station="s", operator="o"), id_template=template,
                          ids_file=path)
    with pytest.raises(ConfigError, match="RabbitMQ"):
        id_source(authority, request)
