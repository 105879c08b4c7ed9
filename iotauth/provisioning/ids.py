"""Choosing a device's ``device_id``: from a template, a CSV mapping, or a list of ids.

Whatever the source, the result passes :func:`~iotauth.identity.validate_device_id`
before it reaches a certificate, a topic or a file name. Templates are parsed
up front and may name only ``{hardware_id}`` and ``{model}``: no attribute
access, indexing, conversions or format specs, so a template can never reach
into Python objects (``str.format`` would happily evaluate
``{hardware_id.__class__}``).

A field may pass through filters, ``{hardware_id|safe}`` or
``{hardware_id|mac|upper}``, because hardware ids come from silicon and
device ids must be safe in topics and file names:

* ``safe``: ``:`` becomes ``-`` (``aa:bb:cc:dd:ee:ff`` -> ``aa-bb-cc-dd-ee-ff``);
  any other character outside ``A-Z a-z 0-9 . _ -`` is refused, never dropped.
* ``mac``: a MAC address (6 or 8 hex octets, separated by ``:`` or ``-`` or not
  at all) as 12 or 16 lower-case hex digits; anything else is refused.
* ``lower`` / ``upper``: change the case.

The default template is ``sensor-{hardware_id|safe}``. A device id longer than
64 characters is refused with the lengths spelled out.
"""

from __future__ import annotations

import asyncio
import csv
import re
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from iotauth.errors import ConfigError, InvalidIdentity, NotFound, ProvisioningError
from iotauth.identity import DEVICE_ID_MAX, validate_device_id, validate_hardware_id
from iotauth.registry import Device, Registry

TEMPLATE_FIELDS = frozenset({"hardware_id", "model"})
_MAC = re.compile(  # 6 or 8 octets, one separator style throughout (the backreference)
    r"[0-9A-Fa-f]{2}([:-]?)[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}(?:\1[0-9A-Fa-f]{2}\1[0-9A-Fa-f]{2})?", re.ASCII)
_SAFE = re.compile(r"[A-Za-z0-9._-]*", re.ASCII)


def _safe(value: str) -> str:
    mapped = value.replace(":", "-")
    if _SAFE.fullmatch(mapped) is None:
        bad = next(c for c in mapped if _SAFE.fullmatch(c) is None)
        raise InvalidIdentity(f"|safe cannot map the character {bad!r} in {value!r}")
    return mapped


def _mac(value: str) -> str:
    if _MAC.fullmatch(value) is None:
        raise InvalidIdentity(f"|mac: {value!r} is not a MAC address (6 or 8 hex octets)")
    return re.sub(r"[:-]", "", value).lower()


FILTERS: dict[str, Callable[[str], str]] = {"safe": _safe, "mac": _mac, "lower": str.lower, "upper": str.upper}


@dataclass(frozen=True)
class IdTemplate:
    """A device id template such as ``sensor-{hardware_id}``."""

    text: str

    def __post_init__(self) -> None:
        self.parts()  # parsed up front: a bad template stops the run before any board is touched

    def parts(self) -> list[tuple[str, str | None, tuple[str, ...]]]:
        """(literal text, field or None, filters) pieces, validated."""
        try:
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as exc:
            raise ConfigError(f"id template {self.text!r} is malformed: {exc}") from None
        out: list[tuple[str, str | None, tuple[str, ...]]] = []
        for literal, name, spec, conversion in parsed:
            if name is None:
                out.append((literal, None, ()))
                continue
            field_name, *filters = name.split("|")
            if field_name not in TEMPLATE_FIELDS or spec or conversion:
                raise ConfigError(
                    f"id template {self.text!r} may only use {{hardware_id}} and {{model}}, optionally with "
                    f"filters such as {{hardware_id|safe}} (found {{{name}}})"
                )
            unknown = [f for f in filters if f not in FILTERS]
            if unknown:
                raise ConfigError(f"id template {self.text!r}: unknown filter |{unknown[0]} "
                                  f"(use {', '.join('|' + f for f in FILTERS)})")
            out.append((literal, field_name, tuple(filters)))
        return out

    def render(self, hardware_id: str, model: str) -> str:
        values = {"hardware_id": hardware_id, "model": model}
        try:
            text = ""
            for literal, name, filters in self.parts():
                text += literal
                if name is not None:
                    value = values[name]
                    for name_of_filter in filters:
                        value = FILTERS[name_of_filter](value)
                    text += value
            if len(text) > DEVICE_ID_MAX:
                raise InvalidIdentity(f"the device id would be {len(text)} characters, at most {DEVICE_ID_MAX} "
                                      "are allowed; shorten the template's fixed text or map ids with --ids FILE")
            return validate_device_id(text)
        except InvalidIdentity as exc:
            hint = " (hardware ids with ':' need {hardware_id|safe})" if ":" in hardware_id and ":" in text else ""
            raise InvalidIdentity(
                f"id template {self.text!r} gives a bad device id for hardware id {hardware_id!r}: {exc}{hint}"
            ) from None


class IdSource(Protocol):
    """Where the station gets a device id for a board it identified."""

    def describe(self) -> str: ...

    async def assign(self, hardware_id: str, model: str, existing: Device | None) -> str: ...


@dataclass(frozen=True)
class TemplateIds:
    template: IdTemplate

    def describe(self) -> str:
        return f"template {self.template.text}"

    async def assign(self, hardware_id: str, model: str, existing: Device | None) -> str:
        return self.template.render(hardware_id, model)


@dataclass(frozen=True)
class MappedIds:
    """A CSV with ``hardware_id`` and ``device_id`` columns: each board's id is fixed in advance."""

    mapping: Mapping[str, str]
    source: str = "ids file"

    def describe(self) -> str:
        return f"{len(self.mapping)} mapped ids from {self.source}"

    async def assign(self, hardware_id: str, model: str, existing: Device | None) -> str:
        try:
            return self.mapping[hardware_id]
        except KeyError:
            raise ProvisioningError(f"hardware id {hardware_id!r} is not listed in {self.source}") from None


@dataclass
class PooledIds:
    """A list of ids handed out in order to boards the registry does not know yet.

    A board the registry already knows keeps its id. Safe across the ports of
    one station; stations sharing one list should use a CSV mapping instead.
    """

    pool: list[str]
    registry: Registry
    source: str = "ids file"
    _given: dict[str, str] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def describe(self) -> str:
        return f"{len(self.pool)} ids from {self.source}"

    async def assign(self, hardware_id: str, model: str, existing: Device | None) -> str:
        if existing is not None:
            return existing.device_id
        async with self._lock:
            if hardware_id in self._given:
                return self._given[hardware_id]
            while self.pool:
                candidate = self.pool.pop(0)
                try:
                    await self.registry.get_device(candidate)
                except NotFound:
                    self._given[hardware_id] = candidate
                    return candidate
            raise ProvisioningError(f"{self.source} has no unused device ids left")


def read_ids_file(path: Path) -> tuple[dict[str, str] | None, list[str]]:
    """Parse an ids file: a CSV with ``hardware_id,device_id`` header, or one device id per line.

    Every id is validated up front, so a bad row stops the run before any device is touched.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read ids file {path}: {exc}") from None
    rows = [row for row in csv.reader(text.splitlines()) if row and not row[0].lstrip().startswith("#")]
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if "hardware_id" in header and "device_id" in header:
        return _mapping(rows[1:], header.index("hardware_id"), header.index("device_id"), path), []
    start = 1 if header[:1] == ["device_id"] else 0
    return None, _pool(rows[start:], path)


def _mapping(rows: Iterable[list[str]], hw_col: int, id_col: int, path: Path) -> dict[str, str]:
    mapping: dict[str, str] = {}
    used: set[str] = set()
    for number, row in enumerate(rows, start=2):
        try:
            hardware_id = validate_hardware_id(row[hw_col].strip())
            device_id = validate_device_id(row[id_col].strip())
        except (IndexError, InvalidIdentity) as exc:
            reason = exc if isinstance(exc, InvalidIdentity) else "missing column"
            raise ConfigError(f"{path}, row {number}: {reason}") from None
        if hardware_id in mapping or device_id in used:
            raise ConfigError(f"{path}, row {number}: hardware id or device id listed twice")
        mapping[hardware_id] = device_id
        used.add(device_id)
    return mapping


def _pool(rows: Iterable[list[str]], path: Path) -> list[str]:
    pool: list[str] = []
    for number, row in enumerate(rows, start=1):
        value = row[0].strip()
        if not value:
            continue
        try:
            pool.append(validate_device_id(value))
        except InvalidIdentity as exc:
            raise ConfigError(f"{path}, line {number}: {exc}") from None
    if len(set(pool)) != len(pool):
        raise ConfigError(f"{path}: a device id is listed twice")
    return pool


def load_id_source(path: Path, registry: Registry) -> MappedIds | PooledIds:
    mapping, pool = read_ids_file(path)
    if mapping is not None:
        return MappedIds(mapping, str(path))
    if not pool:
        raise ConfigError(f"ids file {path} lists no device ids")
    return PooledIds(pool, registry, str(path))
