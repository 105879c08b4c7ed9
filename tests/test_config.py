"""iotauth.toml parsing: defaults, profiles and clear errors."""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from iotauth.config import Home, parse_settings
from iotauth.config_text import default_config_text
from iotauth.errors import ConfigError, InvalidIdentity


def test_default_config_has_default_and_ingest_profiles() -> None:
    settings = parse_settings(tomllib.loads(default_config_text("factory.test")))
    assert settings.trust_domain == "factory.test"
    default = settings.profile("default")
    assert default.publish == ("devices/{device_id}/telemetry/#", "devices/{device_id}/state",
                               "devices/{device_id}/rotation/request")
    assert default.subscribe == ("devices/{device_id}/commands/#", "devices/{device_id}/rotation/response")
    assert default.key_types == {"p256", "p384"}
    assert default.renew_after == 0.66
    assert settings.rotation.max_renewals_per_hour == 3 and settings.rotation.max_clock_skew == timedelta(minutes=10)
    assert settings.profile("renewer").subscribe == ("devices/+/rotation/request",)
    assert "devices/+/telemetry/#" in settings.profile("ingest").subscribe
    assert settings.crl_next_update == timedelta(hours=24)
    # EMQX: no certificate, no entry; the push bans and resets the node caches unless told otherwise.
    assert (settings.emqx.require_certificate, settings.emqx.ban, settings.emqx.reset_node_cache) == (True,) * 3
    relaxed = parse_settings({"trust_domain": "x.test", "emqx": {"require_certificate": False, "ban": False}})
    assert (relaxed.emqx.require_certificate, relaxed.emqx.ban, relaxed.emqx.reset_node_cache) == (False, False, True)


def test_builtin_default_profile_applies_without_a_profiles_table() -> None:
    settings = parse_settings({"trust_domain": "x.test"})
    assert settings.profile("default").subscribe == ("devices/{device_id}/commands/#",
                                                     "devices/{device_id}/rotation/response")
    renewer = settings.profile("renewer")  # built in, like default: homes made before rotation get it too
    assert renewer.publish == ("devices/+/rotation/response", "devices/+/commands/rotate")
    assert renewer.limits.max_retained >= 1_000_000 and renewer.limits.max_inflight > 32


def test_a_configured_renewer_profile_keeps_its_generous_limits() -> None:
    settings = parse_settings({"trust_domain": "x.test", "profiles": {"renewer": {"validity_days": 30,
                                                                                 "limits": {"max_inflight": 64}}}})
    renewer = settings.profile("renewer")
    assert renewer.validity == timedelta(days=30) and renewer.limits.max_inflight == 64
    assert renewer.limits.max_retained >= 1_000_000
    assert renewer.subscribe == ("devices/+/rotation/request",)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "missing required setting 'trust_domain'"),
        ({"trust_domain": "Bad Domain"}, "invalid trust domain"),
        ({"trust_domain": "x.test", "profiles": {"p": {"key_types": ["dsa"]}}}, "key_types"),
        ({"trust_domain": "x.test", "profiles": {"Bad/Name": {}}}, "invalid profile name"),
        ({"trust_domain": "x.test", "profiles": {"p": {"publish": [1]}}}, "list of strings"),
        ({"trust_domain": "x.test", "profiles": {"p": {"rsa_min_bits": 1024}}}, "at least 2048"),
        ({"trust_domain": "x.test", "profiles": {"p": {"renew_after": 1.5}}}, "fraction of the validity"),
        ({"trust_domain": "x.test", "profiles": {"p": {"renew_after": -0.1}}}, "at least 0.0"),
        ({"trust_domain": "x.test", "rotation": {"renewer_id": "a/b"}}, "rotation.renewer_id"),
        ({"trust_domain": "x.test", "rotation": {"max_renewals_per_hour": 0}}, "at least 1"),
        ({"trust_domain": "x.test", "crl": {"next_update_hours": "soon"}}, "must be float"),
        ({"trust_domain": "x.test", "emqx": {"ban": "yes"}}, "'ban' must be bool"),
        ({"trust_domain": "x.test", "emqx": {"require_certificate": 0}}, "'require_certificate' must be bool"),
        ({"trust_domain": "x.test", "serve": {"bind": True}}, "'bind' must be str"),
    ],
)
def test_bad_settings_are_rejected_with_a_clear_message(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(raw)


def test_unknown_profile_lists_known_ones() -> None:
    settings = parse_settings({"trust_domain": "x.test"})
    with pytest.raises(ConfigError, match=r"profiles in iotauth\.toml: default, renewer"):
        settings.profile("nope")


def test_home_resolution_prefers_flag_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IOTAUTH_HOME", str(tmp_path / "env"))
    assert Home.resolve(tmp_path / "flag").root == tmp_path / "flag"
    assert Home.resolve().root == tmp_path / "env"
    monkeypatch.delenv("IOTAUTH_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert Home.resolve().root == tmp_path / "xdg" / "iotauth"


def test_missing_home_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; run 'iotauth init'"):
        Home(tmp_path / "nowhere").require_initialised()


def test_ca_key_uris_default_to_the_home_files_and_are_checked() -> None:
    settings = parse_settings(tomllib.loads(default_config_text("factory.test")))
    assert (settings.ca.issuing_key_uri, settings.ca.root_key_uri, settings.ca.pkcs11_module) == (
        "file:ca/issuing.key", "file:ca/root.key", None)
    offline = parse_settings({"trust_domain": "t.test", "ca": {"root_key_uri": "offline",
                                                              "issuing_key_uri": "pkcs11:token=a;object=b"}})
    assert offline.ca.root_key_uri == "offline"
    with pytest.raises(ConfigError, match=r"\[ca\] a PIN in the key URI"):
        parse_settings({"trust_domain": "t.test", "ca": {"issuing_key_uri": "pkcs11:token=a;object=b?pin-value=1"}})
    with pytest.raises(ConfigError, match="must start with 'file:' or 'pkcs11:'"):
        parse_settings({"trust_domain": "t.test", "ca": {"root_key_uri": "/etc/root.key"}})


def test_rabbitmq_is_off_by_default_and_narrows_device_ids_when_on() -> None:
    plain = parse_settings({"trust_domain": "x.test"})
    assert not plain.rabbitmq.enabled and plain.check_device_id("a.b") == "a.b"
    rabbit = parse_settings({"trust_domain": "x.test", "rabbitmq": {"enabled": True,
                                                                    "management_urls": ["http://r1:15672"]}})
    assert rabbit.rabbitmq.management_urls == ("http://r1:15672",) and rabbit.check_device_id("a_b-1") == "a_b-1"
    with pytest.raises(InvalidIdentity, match=r"RabbitMQ: it reads '\.' as a topic level break"):
        rabbit.check_device_id("a.b")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"provisioning": {"id_template": "sensor.{hardware_id}"}}, r"id_template 'sensor\.\{hardware_id\}' puts '\.'"),
        ({"profiles": {"default": {"publish": ["devices/{device_id}/v1.0/#"]}}}, r"contains '\.' or '\*'"),
        ({"profiles": {"p": {"subscribe": ["devices/*/x"]}}}, r"contains '\.' or '\*'"),
        ({"rabbitmq": {"enabled": "yes"}}, "must be bool"),
        ({"rabbitmq": {"enabled": True, "management_urls": ["rabbit:15672"]}}, "must be http"),
    ],
)
def test_what_rabbitmq_cannot_express_is_refused_when_it_is_enabled(raw: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"trust_domain": "x.test", "rabbitmq": {"enabled": True}}
    with pytest.raises(ConfigError, match=message):
        parse_settings({**base, **raw})
    if "rabbitmq" not in raw:  # the same settings are fine for a home without RabbitMQ
        parse_settings({"trust_domain": "x.test", **raw})
