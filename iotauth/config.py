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

from iotauth.errors import ConfigError, InvalidIdentity, KeyUriError
from iotauth.identity import RABBITMQ_RESERVED, validate_device_id, validate_profile_name, validate_trust_domain
from iotauth.limits import IntakeLimits, SessionLimits, override, parse_limits
from iotauth.pki.signer import OFFLINE, parse_key_uri
from iotauth.profiles import (
    DEFAULT_DEVICE_PROFILE,
    DEFAULT_PROFILE,
    KEY_TYPES,
    RENEWER_PROFILE,
    Profile,
    renewer_profile,
)

HOME_ENV = "IOTAUTH_HOME"
REGISTRY_ENV = "IOTAUTH_REGISTRY"
CONFIG_NAME = "iotauth.toml"
__all__ = ["DEFAULT_DEVICE_PROFILE", "DEFAULT_PROFILE", "KEY_TYPES", "RENEWER_PROFILE", "Home", "Profile", "Settings",
           "load_settings", "parse_bind", "parse_settings", "registry_location", "renewer_profile"]


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
    def previous_dir(self) -> Path:
        """Issuing CAs replaced by ``iotauth ceremony sign-issuing``, trusted until they expire."""
        return self.ca_dir / "previous"

    @property
    def root_crl_pem(self) -> Path:
        """The root's CRL (the ARL: revoked issuing CAs), signed by ``iotauth ceremony crl``."""
        return self.ca_dir / "root-crl.pem"

    @property
    def root_crl_der(self) -> Path:
        return self.ca_dir / "root-crl.der"

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
class RotationSettings:
    """``[rotation]``: how ``iotauth renewer`` judges renewal requests (windows are per profile: ``renew_after``).

    Attributes:
        max_clock_skew: a request's timestamp may differ this much from the renewer's clock.
        max_renewals_per_hour: new renewal certificates per device and hour (a retry of a pending one is free).
        max_requests_per_minute: requests per device and minute one renewer reads before it refuses unread.
        renewer_id: the renewer's own identity (its certificate's device id, and its MQTT client id).
    """

    max_clock_skew: timedelta = timedelta(minutes=10)
    max_renewals_per_hour: int = 3
    max_requests_per_minute: int = 30
    renewer_id: str = "iotauth-renewer"


@dataclass(frozen=True)
class ServeSettings:
    """``[serve]``: the HTTP service. No admin credentials exist until you configure them."""

    bind: str = "127.0.0.1:8443"
    admin_token_sha256: tuple[str, ...] = ()
    broker_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    metrics_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    """Who may read ``/metrics`` (Prometheus); loopback by default, ``[]`` answers nobody."""
    trusted_proxies: tuple[str, ...] = ()
    """Peers whose ``X-Forwarded-For`` names the client; none by default (the TCP peer is the client)."""


@dataclass(frozen=True)
class EmqxSettings:
    """``[emqx]``: how ``/emqx/authn`` treats a missing certificate, and the optional revocation push.

    Attributes:
        require_certificate: refuse a CONNECT for which EMQX passed no ``cert_pem``.
        base_url, api_key, api_secret_env: the REST API the push calls (off when ``base_url`` is unset).
        ban: also ban revoked and suspended devices by client id, so no cache can re-admit them.
        reset_node_cache: reset EMQX's authn/authz node caches (6.2+) before each batch of kicks.
    """

    require_certificate: bool = True
    base_url: str | None = None
    api_key: str | None = None
    api_secret_env: str = "IOTAUTH_EMQX_API_SECRET"  # noqa: S105 - names the variable holding it
    ban: bool = True
    reset_node_cache: bool = True


@dataclass(frozen=True)
class CaSettings:
    """``[ca]``: where the CA keys live, as key URIs (:mod:`iotauth.pki.signer`); never a PIN or a passphrase.

    ``root_key_uri`` is ``"offline"`` when ``init --offline-root`` exported the
    root key out of the home. ``pkcs11_module`` is the PKCS#11 module for
    ``pkcs11:`` URIs that carry no ``module-path``.
    """

    issuing_key_uri: str = "file:ca/issuing.key"
    root_key_uri: str = "file:ca/root.key"
    pkcs11_module: str | None = None


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
    id_template: str = "sensor-{hardware_id|safe}"
    broker_host: str = "localhost"
    broker_port: int = 8883
    serve: ServeSettings = ServeSettings()
    emqx: EmqxSettings = EmqxSettings()
    ca: CaSettings = CaSettings()
    intake_limits: IntakeLimits = field(default_factory=IntakeLimits)
    rabbitmq: RabbitmqSettings = RabbitmqSettings()
    rotation: RotationSettings = RotationSettings()

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
    ca = _parse_ca(reader.table("ca"))
    rabbitmq = _parse_rabbitmq(reader.table("rabbitmq"))
    rotation = _parse_rotation(reader.table("rotation"))
    intake, session_limits = parse_limits(broker.table("limits").raw, f"{source}: [broker.limits]")
    profiles = {DEFAULT_PROFILE: replace(DEFAULT_DEVICE_PROFILE, limits=session_limits),
                RENEWER_PROFILE: renewer_profile(session_limits)}
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
        id_template=provisioning.get("id_template", str, "sensor-{hardware_id|safe}"),
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
            metrics_networks=tuple(_strings(serve.get("metrics_networks", list, list(ServeSettings.metrics_networks)),
                                            "serve.metrics_networks", serve)),
            trusted_proxies=tuple(_strings(serve.get("trusted_proxies", list, []), "serve.trusted_proxies", serve)),
        ),
        emqx=EmqxSettings(
            require_certificate=emqx.get("require_certificate", bool, EmqxSettings.require_certificate),
            base_url=emqx.get("base_url", str, None) or None,
            api_key=emqx.get("api_key", str, None) or None,
            api_secret_env=emqx.get("api_secret_env", str, EmqxSettings.api_secret_env),
            ban=emqx.get("ban", bool, EmqxSettings.ban),
            reset_node_cache=emqx.get("reset_node_cache", bool, EmqxSettings.reset_node_cache),
        ),
        ca=ca,
        intake_limits=intake,
        rabbitmq=rabbitmq,
        rotation=rotation,
    )
    if rabbitmq.enabled:
        _check_rabbitmq_compatible(settings, source)
    return settings


def _parse_rotation(table: _Reader) -> RotationSettings:
    defaults = RotationSettings()
    renewer_id = table.get("renewer_id", str, defaults.renewer_id)
    try:
        validate_device_id(renewer_id)
    except InvalidIdentity as exc:
        raise ConfigError(f"{table.source}: rotation.renewer_id: {exc}") from exc
    return RotationSettings(
        max_clock_skew=timedelta(seconds=table.get("max_clock_skew_seconds", float,
                                                   defaults.max_clock_skew.total_seconds(), minimum=1.0)),
        max_renewals_per_hour=table.get("max_renewals_per_hour", int, defaults.max_renewals_per_hour, minimum=1),
        max_requests_per_minute=table.get("max_requests_per_minute", int, defaults.max_requests_per_minute,
                                          minimum=1),
        renewer_id=renewer_id,
    )


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


def _parse_ca(table: _Reader) -> CaSettings:
    """``[ca]``, each URI checked now: a malformed one, or one carrying a PIN, stops every command at once."""
    ca = CaSettings(
        issuing_key_uri=table.get("issuing_key_uri", str, CaSettings.issuing_key_uri),
        root_key_uri=table.get("root_key_uri", str, CaSettings.root_key_uri),
        pkcs11_module=table.get("pkcs11_module", str, None) or None,
    )
    try:
        parse_key_uri(ca.issuing_key_uri)
        if ca.root_key_uri != OFFLINE:
            parse_key_uri(ca.root_key_uri)
    except KeyUriError as exc:
        raise ConfigError(f"{table.source}: [ca] {exc}") from exc
    return ca


def _parse_profile(name: str, table: _Reader, default_limits: SessionLimits) -> Profile:
    try:
        validate_profile_name(name)
    except InvalidIdentity as exc:
        raise ConfigError(f"{table.source}: {exc}") from exc
    base = {DEFAULT_PROFILE: DEFAULT_DEVICE_PROFILE, RENEWER_PROFILE: renewer_profile(default_limits)}.get(
        name, Profile(name=name))
    key_types = frozenset(table.get("key_types", list, sorted(base.key_types)))
    unknown = key_types - KEY_TYPES
    if unknown or not key_types:
        raise ConfigError(
            f"{table.source}: profiles.{name}.key_types must list some of {sorted(KEY_TYPES)}, got {sorted(key_types)}"
        )
    rsa_min_bits = table.get("rsa_min_bits", int, base.rsa_min_bits, minimum=2048)
    renew_after = table.get("renew_after", float, base.renew_after, minimum=0.0)
    if renew_after > 1.0:
        raise ConfigError(f"{table.source}: profiles.{name}.renew_after is a fraction of the validity (0 to 1), "
                          f"got {renew_after}")
    return Profile(
        name=name,
        validity=timedelta(days=table.get("validity_days", float, base.validity.days, minimum=0.0001)),
        key_types=key_types,
        rsa_min_bits=rsa_min_bits,
        publish=tuple(_strings(table.get("publish", list, list(base.publish)), f"profiles.{name}.publish", table)),
        subscribe=tuple(
            _strings(table.get("subscribe", list, list(base.subscribe)), f"profiles.{name}.subscribe", table)
        ),
        limits=override(base.limits if name == RENEWER_PROFILE else default_limits, table.table("limits").raw,
                        f"{table.source}: [profiles.{name}.limits]"),
        renew_after=renew_after,
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
