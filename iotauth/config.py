"""The home directory and ``iotauth.toml``: where all state lives and how it is configured.

The home is chosen by ``--home``, else ``$IOTAUTH_HOME``, else
``$XDG_DATA_HOME/iotauth`` (``~/.local/share/iotauth``). Everything that must
survive a restart is under it, so backing up one directory backs up the CA,
the registry and the configuration together.
"""

from __future__ import annotations

import os
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

from iotauth.errors import ConfigError, InvalidIdentity
from iotauth.identity import RABBITMQ_RESERVED, validate_device_id, validate_profile_name, validate_trust_domain
from iotauth.limits import IntakeLimits, SessionLimits, override, parse_limits

HOME_ENV = "IOTAUTH_HOME"
REGISTRY_ENV = "IOTAUTH_REGISTRY"
CONFIG_NAME = "iotauth.toml"
KEY_TYPES = frozenset({"p256", "p384", "ed25519", "rsa"})
DEFAULT_PROFILE = "default"


def default_home() -> Path:
    """The documented default home: ``$XDG_DATA_HOME/iotauth`` or ``~/.local/share/iotauth``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "iotauth"


@dataclass(frozen=True)
class Home:
    """Paths inside one iotauth home directory."""

    root: Path

    @classmethod
    def resolve(cls, explicit: str | os.PathLike[str] | None = None) -> Home:
        """Pick the home from the flag, then the environment, then the default."""
        chosen = explicit or os.environ.get(HOME_ENV) or default_home()
        return cls(Path(chosen).expanduser().absolute())

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "root.crt"

    @property
    def root_key(self) -> Path:
        return self.ca_dir / "root.key"

    @property
    def issuing_cert(self) -> Path:
        return self.ca_dir / "issuing.crt"

    @property
    def issuing_key(self) -> Path:
        return self.ca_dir / "issuing.key"

    @property
    def chain_file(self) -> Path:
        """Issuing CA then root: the bundle devices and brokers trust."""
        return self.ca_dir / "chain.pem"

    @property
    def ocsp_cert(self) -> Path:
        """Delegated OCSP responder certificate (so the issuing key can stay offline)."""
        return self.ca_dir / "ocsp.crt"

    @property
    def ocsp_key(self) -> Path:
        return self.ca_dir / "ocsp.key"

    @property
    def server_dir(self) -> Path:
        return self.root / "broker"

    @property
    def server_cert(self) -> Path:
        return self.server_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.server_dir / "server.key"

    @property
    def registry_db(self) -> Path:
        return self.root / "registry.db"

    @property
    def crl_pem(self) -> Path:
        return self.ca_dir / "crl.pem"

    @property
    def crl_der(self) -> Path:
        return self.ca_dir / "crl.der"

    @property
    def rabbitmq_admin_secret(self) -> Path:
        """The password iotauth's RabbitMQ management identity uses (0600; see :mod:`iotauth.rabbitmq`)."""
        return self.root / "rabbitmq" / "admin.secret"

    @property
    def is_initialised(self) -> bool:
        return self.config_file.exists() and self.issuing_cert.exists()

    def require_initialised(self) -> None:
        """Raise a clear error unless ``iotauth init`` has run for this home."""
        if not self.root.exists():
            raise ConfigError(f"home directory {self.root} does not exist; run 'iotauth init' first")
        if not self.is_initialised:
            raise ConfigError(f"{self.root} is not an initialised iotauth home; run 'iotauth init' first")


def parse_bind(text: str, default_port: int) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT``, ``HOST`` or ``:PORT``) with a clear error."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"bad address {text!r}: missing ']' after an IPv6 address")
        host, port_text = text[1:end], text[end + 1 :].removeprefix(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ConfigError(f"bad address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad address {text!r}: port must be 0-65535")
    return host or "0.0.0.0", port  # noqa: S104 - ':PORT' explicitly asks for every interface


def registry_location(home: Home, explicit: str | None = None) -> str:
    """``--registry``, else ``$IOTAUTH_REGISTRY``, else the SQLite file in the home."""
    return explicit or os.environ.get(REGISTRY_ENV) or str(home.registry_db)


@dataclass(frozen=True)
class Profile:
    """What a class of identities may hold (key types, validity) and do (topics).

    Topic templates may use ``{device_id}`` and ``{profile}``; they are filled in
    only with validated identity values by :mod:`iotauth.policy`.
    """

    name: str
    validity: timedelta = timedelta(days=365)
    key_types: frozenset[str] = frozenset({"p256", "p384"})
    rsa_min_bits: int = 2048
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    limits: SessionLimits = field(default_factory=SessionLimits)


DEFAULT_DEVICE_PROFILE = Profile(
    name=DEFAULT_PROFILE,
    publish=("devices/{device_id}/telemetry/#", "devices/{device_id}/state"),
    subscribe=("devices/{device_id}/commands/#",),
)


@dataclass(frozen=True)
class ServeSettings:
    """``[serve]``: the HTTP service. No admin credentials exist until you configure them."""

    bind: str = "127.0.0.1:8443"
    admin_token_sha256: tuple[str, ...] = ()
    broker_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class EmqxSettings:
    """``[emqx]``: optional REST API used to kick revoked clients off an EMQX cluster."""

    base_url: str | None = None
    api_key: str | None = None
    api_secret_env: str = "IOTAUTH_EMQX_API_SECRET"  # noqa: S105 - names the variable holding it


@dataclass(frozen=True)
class RabbitmqSettings:
    """``[rabbitmq]``: this home's devices connect to a RabbitMQ cluster authorised by ``iotauth serve``.

    ``enabled`` narrows the device id alphabet (no ``.``; see
    :func:`~iotauth.identity.validate_device_id`) and switches on the
    ``/rabbitmq/*`` endpoints; ``management_urls`` are the nodes the
    revocation follower kicks devices through (any one that answers).
    """

    enabled: bool = False
    management_urls: tuple[str, ...] = ()
    admin_secret_env: str = "IOTAUTH_RABBITMQ_ADMIN_SECRET"  # noqa: S105 - names the variable holding it


@dataclass(frozen=True)
class Settings:
    """Parsed ``iotauth.toml``."""

    trust_domain: str
    profiles: Mapping[str, Profile] = field(
        default_factory=lambda: MappingProxyType({DEFAULT_PROFILE: DEFAULT_DEVICE_PROFILE})
    )
    crl_next_update: timedelta = timedelta(hours=24)
    crl_url: str | None = None
    ocsp_url: str | None = None
    pending_ttl: timedelta = timedelta(hours=1)
    id_template: str = "sensor-{hardware_id}"
    broker_host: str = "localhost"
    broker_port: int = 8883
    serve: ServeSettings = ServeSettings()
    emqx: EmqxSettings = EmqxSettings()
    intake_limits: IntakeLimits = field(default_factory=IntakeLimits)
    rabbitmq: RabbitmqSettings = RabbitmqSettings()

    def check_device_id(self, value: object) -> str:
        """Validate a device id for this home: the safe alphabet, narrowed when RabbitMQ is enabled."""
        return validate_device_id(value, rabbitmq=self.rabbitmq.enabled)

    def profile(self, name: str) -> Profile:
        """Return the named profile or raise a :class:`ConfigError` listing the known ones."""
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            raise ConfigError(f"unknown profile {name!r}; profiles in iotauth.toml: {known}") from None


def load_settings(home: Home) -> Settings:
    """Read and validate ``iotauth.toml`` from ``home``."""
    home.require_initialised()
    try:
        raw = tomllib.loads(home.config_file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{home.config_file} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {home.config_file}: {exc.strerror}") from exc
    return parse_settings(raw, source=str(home.config_file))


def parse_settings(raw: Mapping[str, Any], source: str = CONFIG_NAME) -> Settings:
    """Build :class:`Settings` from a parsed TOML document, rejecting unknown or bad values."""
    reader = _Reader(raw, source)
    try:
        trust_domain = validate_trust_domain(reader.get("trust_domain", str))
    except InvalidIdentity as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    crl = reader.table("crl")
    ocsp = reader.table("ocsp")
    provisioning = reader.table("provisioning")
    broker = reader.table("broker")
    serve = reader.table("serve")
    emqx = reader.table("emqx")
    rabbitmq = _parse_rabbitmq(reader.table("rabbitmq"))
    intake, session_limits = parse_limits(broker.table("limits").raw, f"{source}: [broker.limits]")
    profiles = {DEFAULT_PROFILE: replace(DEFAULT_DEVICE_PROFILE, limits=session_limits)}
    for name, table in reader.table("profiles").raw.items():
        profiles[name] = _parse_profile(name, _Reader(_as_table(table, f"profiles.{name}", source), source),
                                        session_limits)
    settings = Settings(
        trust_domain=trust_domain,
        profiles=MappingProxyType(profiles),
        crl_next_update=timedelta(hours=crl.get("next_update_hours", float, 24.0, minimum=0.01)),
        crl_url=crl.get("distribution_url", str, None) or None,
        ocsp_url=ocsp.get("url", str, None) or None,
        pending_ttl=timedelta(minutes=provisioning.get("pending_ttl_minutes", float, 60.0, minimum=0.0)),
        id_template=provisioning.get("id_template", str, "sensor-{hardware_id}"),
        broker_host=broker.get("host", str, "localhost"),
        broker_port=broker.get("port", int, 8883, minimum=1),
        serve=ServeSettings(
            bind=serve.get("bind", str, ServeSettings.bind),
            admin_token_sha256=tuple(
                _strings(serve.get("admin_token_sha256", list, []), "serve.admin_token_sha256", serve)
            ),
            broker_networks=tuple(
                _strings(
                    serve.get("broker_networks", list, list(ServeSettings.broker_networks)),
                    "serve.broker_networks",
                    serve,
                )
            ),
        ),
        emqx=EmqxSettings(
            base_url=emqx.get("base_url", str, None) or None,
            api_key=emqx.get("api_key", str, None) or None,
            api_secret_env=emqx.get("api_secret_env", str, EmqxSettings.api_secret_env),
        ),
        intake_limits=intake,
        rabbitmq=rabbitmq,
    )
    if rabbitmq.enabled:
        _check_rabbitmq_compatible(settings, source)
    return settings


def _parse_rabbitmq(table: _Reader) -> RabbitmqSettings:
    urls = tuple(_strings(table.get("management_urls", list, []), "rabbitmq.management_urls", table))
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{table.source}: rabbitmq.management_urls must be http(s) URLs, got {url!r}")
    return RabbitmqSettings(
        enabled=table.get("enabled", bool, False),
        management_urls=urls,
        admin_secret_env=table.get("admin_secret_env", str, RabbitmqSettings.admin_secret_env),
    )


def _check_rabbitmq_compatible(settings: Settings, source: str) -> None:
    """What RabbitMQ cannot express is refused when the setting is made, not found missing in the field."""
    try:
        literal = "".join(part for part, *_ in string.Formatter().parse(settings.id_template))
    except ValueError:
        literal = settings.id_template  # malformed: the station reports it; '.' is still refused here
    if RABBITMQ_RESERVED in literal:
        raise ConfigError(
            f"{source}: [provisioning] id_template {settings.id_template!r} puts '.' into device ids, which RabbitMQ "
            "reads as a topic level break ([rabbitmq] enabled = true); use '-' or '_'"
        )
    for profile in settings.profiles.values():
        for rule in (*profile.publish, *profile.subscribe):
            if "." in rule or "*" in rule:
                raise ConfigError(
                    f"{source}: profiles.{profile.name} rule {rule!r} contains '.' or '*', which RabbitMQ's MQTT "
                    "plugin turns into a level break or a wildcard ([rabbitmq] enabled = true); such a rule could "
                    "never match there"
                )


def _parse_profile(name: str, table: _Reader, default_limits: SessionLimits) -> Profile:
    try:
        validate_profile_name(name)
    except InvalidIdentity as exc:
        raise ConfigError(f"{table.source}: {exc}") from exc
    base = DEFAULT_DEVICE_PROFILE if name == DEFAULT_PROFILE else Profile(name=name)
    key_types = frozenset(table.get("key_types", list, sorted(base.key_types)))
    unknown = key_types - KEY_TYPES
    if unknown or not key_types:
        raise ConfigError(
            f"{table.source}: profiles.{name}.key_types must list some of {sorted(KEY_TYPES)}, got {sorted(key_types)}"
        )
    rsa_min_bits = table.get("rsa_min_bits", int, base.rsa_min_bits, minimum=2048)
    return Profile(
        name=name,
        validity=timedelta(days=table.get("validity_days", float, base.validity.days, minimum=0.0001)),
        key_types=key_types,
        rsa_min_bits=rsa_min_bits,
        publish=tuple(_strings(table.get("publish", list, list(base.publish)), f"profiles.{name}.publish", table)),
        subscribe=tuple(
            _strings(table.get("subscribe", list, list(base.subscribe)), f"profiles.{name}.subscribe", table)
        ),
        limits=override(default_limits, table.table("limits").raw, f"{table.source}: [profiles.{name}.limits]"),
    )


def _strings(values: list[Any], where: str, table: _Reader) -> list[str]:
    if not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{table.source}: {where} must be a list of strings")
    return values


def _as_table(value: object, where: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: [{where}] must be a table")
    return value


@dataclass(frozen=True)
class _Reader:
    raw: Mapping[str, Any]
    source: str

    def table(self, key: str) -> _Reader:
        return _Reader(_as_table(self.raw.get(key, {}), key, self.source), self.source)

    def get(self, key: str, kind: type[Any], default: Any = ..., minimum: float | None = None) -> Any:
        if key not in self.raw:
            if default is ...:
                raise ConfigError(f"{self.source}: missing required setting {key!r}")
            return default
        value = self.raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"{self.source}: {key!r} must be {kind.__name__}, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.source}: {key!r} must be at least {minimum}, got {value!r}")
        return value


def default_config_text(trust_domain: str, *, rabbitmq: bool = False) -> str:
    """The commented ``iotauth.toml`` that ``iotauth init`` writes (``rabbitmq``: with ``[rabbitmq]`` enabled)."""
    return f'''# iotauth configuration. See README.md, "Configuration reference".
trust_domain = "{trust_domain}"

[crl]
# How long a published CRL stays valid (nextUpdate). Republish before it lapses.
next_update_hours = 24
# Optional URL written into each device certificate's CRL distribution point.
# distribution_url = "http://pki.example.com/crl.der"

[ocsp]
# Optional OCSP responder URL written into each device certificate's AIA.
# url = "http://pki.example.com/ocsp"

[provisioning]
# Pending certificates whose delivery never reached COMMIT are revoked after this.
pending_ttl_minutes = 60
# Device ids assigned by the station; {{hardware_id}} and {{model}} are available.
id_template = "sensor-{{hardware_id}}"

[broker]
# Written to devices by the station (PUT_CONFIG).
host = "localhost"
port = 8883

[broker.limits]
# Before authentication: what anyone on the network can make 'iotauth broker' hold.
max_pending = 4096               # connections in the TLS handshake or waiting for CONNECT, in total
max_pending_per_address = 64     # ... per source address
max_pending_per_network = 256    # ... per /24 (IPv4) or /64 (IPv6)
max_waiting_per_address = 1024   # beyond those, connections wait unread (no TLS work) for their source's turn
max_waiting = 16384
failures_per_second = 20.0       # new connections per address that never authenticate (refunded on success)
failure_burst = 200
handshake_timeout = 10.0         # seconds; both deadlines shrink to min_timeout as the pending total fills up
connect_timeout = 10.0
min_timeout = 1.0
max_connect_bytes = 65536
# After authentication, per session (override any of these in [profiles.NAME.limits]).
max_packet_size = 262144         # bytes, fixed header included
max_subscriptions = 100
max_filters_per_subscribe = 16
max_inflight = 32                # unacknowledged QoS 1/2 messages in each direction
max_queued = 1000                # QoS 1/2 messages kept for a persistent session while it is offline
max_queued_bytes = 4194304
max_retained = 100               # retained messages a device may own

[serve]
# 'iotauth serve' (HTTP: EMQX / mosquitto-go-auth authorizer, CRL, OCSP, admin API).
bind = "127.0.0.1:8443"
# SHA-256 of admin API tokens ('iotauth serve token' makes one). No token, no admin API.
admin_token_sha256 = []
# Broker-facing endpoints answer only these networks.
broker_networks = ["127.0.0.0/8", "::1/128"]

[rabbitmq]
# Devices connect to a RabbitMQ cluster authorised by 'iotauth serve' ('iotauth export rabbitmq').
# Enabling it refuses '.' in device ids: RabbitMQ reads it as a topic level break.
enabled = {"true" if rabbitmq else "false"}
# Management API of the nodes revoked devices are kicked through (any one that answers).
# management_urls = ["http://rabbit-1:15672", "http://rabbit-2:15672", "http://rabbit-3:15672"]

[emqx]
# Optional: kick revoked clients through the EMQX REST API (DELETE /api/v5/clients/{{clientid}}).
# base_url = "http://emqx:18083"
# api_key = "iotauth"
# The API secret is read from this environment variable, never from this file.
api_secret_env = "IOTAUTH_EMQX_API_SECRET"

# Profiles: key policy, validity and topic rights. Templates may use {{device_id}}
# and {{profile}}; everything not allowed here is denied.
[profiles.default]
validity_days = 365
key_types = ["p256", "p384"]
publish = ["devices/{{device_id}}/telemetry/#", "devices/{{device_id}}/state"]
subscribe = ["devices/{{device_id}}/commands/#"]

# A back-end service that reads every device's telemetry and sends commands.
[profiles.ingest]
validity_days = 90
key_types = ["p256", "p384"]
publish = ["devices/+/commands/#"]
subscribe = ["devices/+/telemetry/#", "devices/+/state"]

[profiles.ingest.limits]
max_subscriptions = 1000
'''
