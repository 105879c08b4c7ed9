"""The provisioning station: many ports at once, each board run by :mod:`iotauth.provisioning.run`.

A station provisions every port it is given concurrently (or watches for
hot-plugged ports), never lets two runs share a port, and hands each board's
result to the caller (the report writer) as soon as it is known. Its step
journal is one :class:`~iotauth.registry.journal.EventJournal` shared by all
ports, so under load the journal costs one registry operation per commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from iotauth.authority import Authority
from iotauth.certs import now_utc
from iotauth.errors import ConfigError, IotAuthError, ProvisioningError
from iotauth.pki.verify import ClientCertificateVerifier
from iotauth.provisioning.context import RunContext
from iotauth.provisioning.ids import IdSource
from iotauth.provisioning.planner import PlanOptions, check_profile
from iotauth.provisioning.results import Progress, ProvisionResult, Step
from iotauth.provisioning.run import Run
from iotauth.provisioning.session import RetryPolicy
from iotauth.provisioning.transport import Link, SerialLink
from iotauth.registry import CertificateRecord, EventKind
from iotauth.registry.expiry import EXPIRY_INTERVAL, expire_stale_pending
from iotauth.registry.journal import EventJournal

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}", re.ASCII)


@dataclass(frozen=True)
class StationConfig:
    """How this station provisions.

    Attributes:
        station: this station's name (journal and report).
        operator: who runs it (journal actor and report).
        profile: the profile every device is issued under.
        host_keygen: generate keys on the host and write them with PUT_KEY.
        force: re-provision committed boards (the old certificate is revoked).
        baudrate: serial speed; also used to size timeouts.

    The station and operator names go into the audit log and shared report
    files, so they are checked like identities: 1-64 characters from
    ``A-Z a-z 0-9 . _ @ : -``.
    """

    station: str
    operator: str
    profile: str = "default"
    host_keygen: bool = False
    force: bool = False
    baudrate: int = 115200
    rtscts: bool = False
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        _check_name(self.station, "station name")
        _check_name(self.operator, "operator name")


def _check_name(value: str, what: str) -> None:
    if _NAME.fullmatch(value) is None:
        raise ConfigError(f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 . _ @ : -")


class Station:
    """Provision boards on serial ports through one :class:`Authority`.

    Args:
        authority: issues and records certificates (it holds the registry and settings).
        config: station name, operator, profile, modes and retry policy.
        ids: where device ids come from.
        on_progress: called (synchronously) at every step start and end, for a live view.
        link_factory: opens a port (tests may hand in another :class:`Link`).
    """

    def __init__(
        self,
        authority: Authority,
        config: StationConfig,
        ids: IdSource,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        link_factory: Callable[[str], Awaitable[Link]] | None = None,
    ) -> None:
        self.authority = authority
        self.registry = authority.registry
        self.settings = authority.settings
        self.config = config
        self.ids = ids
        profile = self.settings.profile(config.profile)
        self.journal = EventJournal(self.registry, config.operator, "the provisioning journal")
        verifier = ClientCertificateVerifier(
            [authority.ca.root_cert], [authority.ca.issuing_cert], self.settings.trust_domain
        )
        options = PlanOptions(profile.name, profile.key_types, config.host_keygen, config.force,
                              self.settings.pending_ttl)
        check_profile(options)
        self._context = RunContext(
            authority=authority,
            station=config.station,
            operator=config.operator,
            options=options,
            rsa_min_bits=profile.rsa_min_bits,
            policy=config.policy,
            baudrate=config.baudrate,
            ids=ids,
            journal=self.journal,
            verifier=verifier,
            progress=self._progress,
            open_link=link_factory or self._open_serial,
        )
        self._on_progress = on_progress
        self._busy: set[str] = set()

    async def _open_serial(self, port: str) -> Link:
        return await SerialLink.open(port, baudrate=self.config.baudrate, rtscts=self.config.rtscts)

    def _progress(self, update: Progress) -> None:
        if self._on_progress is not None:
            with contextlib.suppress(Exception):  # a broken display must never break provisioning
                self._on_progress(update)

    async def expire_pending(self) -> list[CertificateRecord]:
        """Revoke (superseded) pending certificates older than ``pending_ttl``: deliveries that never finished.

        Run at start and, in watch mode, every :data:`EXPIRY_INTERVAL` seconds;
        the broker and ``iotauth serve`` run the same sweep (see :mod:`iotauth.registry.expiry`).
        """
        expired = await expire_stale_pending(self.registry, self.settings.pending_ttl, actor=self.config.operator)
        if expired:
            self.journal.record(EventKind.PROVISIONING_EXPIRED, None, {
                "station": self.config.station,
                "serials": [c.serial for c in expired],
                "ttl_seconds": self.settings.pending_ttl.total_seconds(),
            })
            await self.journal.flush()
        return expired

    async def provision(self, port: str) -> ProvisionResult:
        """Run the ten steps for the board on ``port``; never raises, always returns a result."""
        if port in self._busy:
            now = now_utc()
            return ProvisionResult(port, self.config.station, self.config.operator, "failed", now, now, Step.IDENTIFY,
                                   error="port is already being provisioned")
        self._busy.add(port)
        try:
            return await Run(self._context, port).run()
        finally:
            self._busy.discard(port)

    async def provision_all(
        self, ports: Sequence[str], on_result: Callable[[ProvisionResult], Any] | None = None
    ) -> list[ProvisionResult]:
        """Provision every port concurrently; results in the order of ``ports``."""

        errors: list[Exception] = []

        async def one(port: str) -> ProvisionResult:
            result = await self.provision(port)
            await _notify(on_result, result, errors)
            return result

        results = list(await asyncio.gather(*(one(p) for p in ports)))
        if errors:
            raise errors[0]
        return results

    async def watch(
        self,
        patterns: Sequence[str],
        stop: asyncio.Event,
        on_result: Callable[[ProvisionResult], Any] | None = None,
        poll_interval: float = 0.5,
    ) -> list[ProvisionResult]:
        """Provision each port that appears (hot-plug) until ``stop`` is set.

        A port is provisioned once per appearance: it must disappear (board
        unplugged) and reappear before it is provisioned again.
        """
        results: list[ProvisionResult] = []
        tasks: dict[str, asyncio.Task[ProvisionResult]] = {}
        done: set[str] = set()
        replugged: set[str] = set()  # vanished while being provisioned: whatever is there now is new
        errors: list[Exception] = []

        async def one(port: str) -> ProvisionResult:
            result = await self.provision(port)
            results.append(result)
            await _notify(on_result, result, errors)
            return result

        next_expiry = asyncio.get_running_loop().time() + EXPIRY_INTERVAL
        while not stop.is_set():
            if asyncio.get_running_loop().time() >= next_expiry:
                next_expiry += EXPIRY_INTERVAL
                with contextlib.suppress(IotAuthError):  # a registry hiccup must not stop the line
                    await self.expire_pending()
            present = set(expand_ports(patterns, require_match=False))
            done &= present
            replugged |= set(tasks) - present
            for port in [p for p, t in tasks.items() if t.done()]:
                del tasks[port]
                if port in replugged:
                    replugged.discard(port)
                else:
                    done.add(port)
            for port in sorted(present - done - set(tasks)):
                tasks[port] = asyncio.get_running_loop().create_task(one(port))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_interval):
                    await stop.wait()
        if tasks:
            await asyncio.gather(*tasks.values())
        if errors:
            raise errors[0]
        return results

    async def close(self) -> None:
        await self.journal.flush()


async def _notify(
    on_result: Callable[[ProvisionResult], Any] | None, result: ProvisionResult, errors: list[Exception]
) -> None:
    """Hand a result to the caller (e.g. the report writer); keep its failure for after the other ports."""
    if on_result is None:
        return
    try:
        outcome = on_result(result)
        if asyncio.iscoroutine(outcome):
            await outcome
    except Exception as exc:
        errors.append(exc)


def expand_ports(patterns: Iterable[str], *, require_match: bool = True) -> list[str]:
    """Expand glob patterns (``/dev/ttyUSB*``); plain paths pass through unchanged."""
    ports: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches and require_match:
                raise ProvisioningError(f"no serial port matches {pattern!r}")
            ports.extend(matches)
        else:
            ports.append(pattern)
    return list(dict.fromkeys(ports))


