"""One run of a provisioning line: the entry point the CLI (and scripts) call.

It validates everything that can be validated before a board is touched
(the id template or ids file, the profile, the port list), expires pending
certificates older than the TTL, then provisions the ports concurrently (or
watches for hot-plugged ports) and hands each result to the caller as soon
as it is known, so a report row is written even if the station is killed
moments later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotauth.authority import Authority
from iotauth.errors import ConfigError, InvalidIdentity
from iotauth.provisioning.ids import IdSource, IdTemplate, MappedIds, TemplateIds, load_id_source
from iotauth.provisioning.results import Progress, ProvisionResult
from iotauth.provisioning.station import Station, StationConfig, expand_ports
from iotauth.registry import CertificateRecord


@dataclass(frozen=True)
class LineRequest:
    """What to provision and how.

    Attributes:
        ports: serial ports or glob patterns.
        id_template: device id template (default: ``provisioning.id_template`` from iotauth.toml).
        ids_file: a CSV (hardware_id,device_id) or a list of ids instead of a template.
        watch: provision each port as it appears, until ``stop`` is set.
    """

    ports: tuple[str, ...]
    config: StationConfig
    id_template: str | None = None
    ids_file: Path | None = None
    watch: bool = False


@dataclass(frozen=True)
class LineOutcome:
    results: tuple[ProvisionResult, ...]
    expired: tuple[CertificateRecord, ...]

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.ok)


def id_source(authority: Authority, request: LineRequest) -> IdSource:
    """Where device ids come from; ids this home cannot use (``.`` with RabbitMQ) stop the line before any board."""
    check = authority.settings.check_device_id
    if request.ids_file is not None:
        source = load_id_source(request.ids_file, authority.registry)
        listed = source.mapping.values() if isinstance(source, MappedIds) else source.pool
        for device_id in listed:
            try:
                check(device_id)
            except InvalidIdentity as exc:
                raise ConfigError(f"{request.ids_file}: {exc}") from None
        return source
    template = IdTemplate(request.id_template or authority.settings.id_template)
    try:
        check(template.render("0", "0"))
    except InvalidIdentity as exc:
        raise ConfigError(f"id template {template.text!r}: {exc}") from None
    return TemplateIds(template)


async def run_line(
    authority: Authority,
    request: LineRequest,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_result: Callable[[ProvisionResult], Any] | None = None,
    stop: asyncio.Event | None = None,
) -> LineOutcome:
    """Provision the requested ports; every board ends as a result, never as an exception."""
    station = Station(authority, request.config, id_source(authority, request), on_progress=on_progress)
    ports = request.ports if request.watch else tuple(expand_ports(request.ports))
    expired = await station.expire_pending()
    try:
        if request.watch:
            results = await station.watch(ports, stop or asyncio.Event(), on_result)
        else:
            results = await station.provision_all(ports, on_result)
    finally:
        await station.close()
    return LineOutcome(tuple(results), tuple(expired))
