"""``iotauth export rabbitmq``: the files, checked with the tools that read them (OpenSSL, Erlang), and misuse.

The files running a real cluster is ``test_rabbitmq_cluster.py``; this module
checks what can be checked without one, quickly, including what must be refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from iotauth.authority import Authority, open_authority
from iotauth.config import Home, load_settings
from iotauth.errors import ConfigError, InvalidIdentity, PkiError
from iotauth.export.rabbitmq import ExportOptions, export
from iotauth.pki.keys import PrivateKey
from iotauth.registry import Registry, open_registry
from tests.fixtures import iotauth_executable
from tests.fixtures.rabbitmq import enable_rabbitmq

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]
ERL = shutil.which("erl")


def options(url: str = "https://127.0.0.1:8443", account: str | None = None) -> ExportOptions:
    return ExportOptions(mqtt=("0.0.0.0", 8883), management=("127.0.0.1", 15672), serve_url=url,  # noqa: S104
                         account=account)


async def fresh(home: Home, registry: Registry) -> Authority:
    return await open_authority(home, registry)


async def test_nothing_is_exported_unless_the_home_is_set_up_for_rabbitmq(
    home: Home, authority: Authority, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"set \[rabbitmq\] enabled = true"):
        await export(home, authority, load_settings(home), tmp_path / "out", options())
    assert not (tmp_path / "out").exists()


async def test_the_files_say_what_the_integration_depends_on(home: Home, registry: Registry, tmp_path: Path) -> None:
    enable_rabbitmq(home)
    result = await export(home, await fresh(home, registry), load_settings(home), tmp_path / "out", options())
    conf = result.files.config.read_text()
    settings_lines = {line.split(" = ")[0]: line.split(" = ", 1)[1] for line in conf.splitlines() if " = " in line
                      and not line.startswith("#")}
    assert [k for k in settings_lines if k.startswith("auth_backends")] == ["auth_backends.1"]
    assert settings_lines["auth_backends.1"] == "http"  # never 'internal' (see iotauth.rabbitmq)
    assert settings_lines["auth_http.http_method"] == "post"  # the management password stays out of URLs
    assert settings_lines["auth_http.user_path"] == "https://127.0.0.1:8443/rabbitmq/user"
    assert settings_lines["listeners.tcp"] == "none" and settings_lines["mqtt.listeners.tcp"] == "none"
    assert settings_lines["mqtt.allow_anonymous"] == "false" and settings_lines["mqtt.ssl_cert_login"] == "true"
    assert settings_lines["default_user"] != "guest" and len(settings_lines["default_pass"]) >= 24
    advanced = result.files.advanced.read_text()
    assert "{crl_check, peer}" in advanced and "{fail_if_no_peer_cert, true}" in advanced
    assert "{ignore_colons_in_username, true}" in advanced
    assert '{server_name_indication, "localhost"}' in advanced  # an IP URL is checked against a name of the cert
    assert result.files.plugins.read_text() == "[rabbitmq_management,rabbitmq_mqtt,rabbitmq_auth_backend_http].\n"
    assert oct(result.files.key.stat().st_mode & 0o777) == "0o600"
    assert oct(home.rabbitmq_admin_secret.stat().st_mode & 0o777) == "0o600"
    assert home.rabbitmq_admin_secret.read_text() not in conf + advanced  # RabbitMQ never holds it


def test_the_crl_is_where_openssl_and_erlang_look_for_it(home: Home, registry: Registry, tmp_path: Path) -> None:
    enable_rabbitmq(home)

    async def work() -> Path:
        async with await open_registry(home.registry_db) as reg:
            result = await export(home, await open_authority(home, reg), load_settings(home), tmp_path / "o", options())
            return result.crl_file

    crl_file = asyncio.run(work())
    hashed = subprocess.run(["openssl", "crl", "-hash", "-noout", "-in", str(crl_file)], capture_output=True,
                            text=True, check=True).stdout.strip()
    issuer = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(home.issuing_cert)],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert crl_file.name == f"{hashed}.r0" == f"{issuer}.r0"
    verified = subprocess.run(["openssl", "crl", "-noout", "-in", str(crl_file), "-CAfile", str(home.chain_file)],
                              capture_output=True, text=True, check=False)
    assert "verify OK" in verified.stdout + verified.stderr


def erlang_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.skipif(ERL is None, reason="Erlang comes with rabbitmq-server")
async def test_advanced_config_is_erlang_even_for_awkward_paths(home: Home, registry: Registry, tmp_path: Path) -> None:
    enable_rabbitmq(home)
    out = tmp_path / 'we"ird\\dir ü'
    result = await export(home, await fresh(home, registry), load_settings(home), out, options("https://h.test:1"))
    program = (f"{{ok, [Terms]}} = file:consult({erlang_string(str(result.files.advanced))}), "
               "{rabbit, R} = lists:keyfind(rabbit, 1, Terms), {ssl_options, O} = lists:keyfind(ssl_options, 1, R), "
               "{crl_cache, {_, {_, [{dir, D}]}}} = lists:keyfind(crl_cache, 1, O), "
               "{rabbitmq_mqtt, [{ignore_colons_in_username, true}]} = lists:keyfind(rabbitmq_mqtt, 1, Terms), "
               'io:setopts([{encoding, unicode}]), io:format("~ts", [D]), halt().')
    read = subprocess.run([str(ERL), "-noshell", "-eval", program], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"})
    assert read.returncode == 0, read.stdout + read.stderr
    assert read.stdout == str(result.files.crl_dir)
    assert "server_name_indication" not in result.files.advanced.read_text()  # a host name is checked as is


async def test_plain_http_to_serve_needs_no_tls_options(home: Home, registry: Registry, tmp_path: Path) -> None:
    enable_rabbitmq(home)
    result = await export(home, await fresh(home, registry), load_settings(home), tmp_path / "o",
                          options("http://127.0.0.1:8080"))
    assert "rabbitmq_auth_backend_http" not in result.files.advanced.read_text()
    with pytest.raises(ConfigError, match="must be http"):
        await export(home, await fresh(home, registry), load_settings(home), tmp_path / "o", options("ftp://x"))


@pytest.mark.skipif(os.geteuid() != 0, reason="handing the key to another account needs root")
async def test_the_key_goes_to_rabbitmq_s_account_and_an_unreadable_place_is_refused(
    home: Home, registry: Registry, tmp_path: Path
) -> None:
    try:
        account = pwd.getpwnam("rabbitmq")
    except KeyError:
        pytest.skip("no 'rabbitmq' account (it comes with rabbitmq-server)")
    enable_rabbitmq(home)
    private = tmp_path / "private"  # pytest's tmp tree is 0700 root: RabbitMQ could not even reach it
    with pytest.raises(ConfigError, match=r"runs as 'rabbitmq' and cannot reach .*: .* is not searchable"):
        await export(home, await fresh(home, registry), load_settings(home), private, options(account="rabbitmq"))
    public = Path(tempfile.mkdtemp(prefix="iotauth-export-test-"))
    public.chmod(0o755)
    try:
        result = await export(home, await fresh(home, registry), load_settings(home), public / "out",
                              options(account="rabbitmq"))
        assert (result.files.key.stat().st_uid, result.files.key.stat().st_mode & 0o777) == (account.pw_uid, 0o600)
        assert result.account_checked == "rabbitmq"
    finally:
        shutil.rmtree(public, ignore_errors=True)
    with pytest.raises(ConfigError, match="no such user"):
        await export(home, await fresh(home, registry), load_settings(home), public, options(account="no-such-acct"))


async def test_devices_rabbitmq_cannot_keep_apart_are_reported(
    home: Home, registry: Registry, authority: Authority, csr_factory: CsrFactory, tmp_path: Path
) -> None:
    await authority.issue(csr_factory()[1], "old.sensor", actor="op")  # before the home used RabbitMQ
    enable_rabbitmq(home)
    result = await export(home, await fresh(home, registry), load_settings(home), tmp_path / "o", options())
    assert result.unusable_devices == ("old.sensor",)
    with pytest.raises(InvalidIdentity, match="RabbitMQ"):
        await (await fresh(home, registry)).issue(csr_factory()[1], "new.sensor", actor="op")


async def test_without_the_ca_key_only_a_current_published_crl_is_shipped(
    home: Home, registry: Registry, tmp_path: Path
) -> None:
    enable_rabbitmq(home)
    settings = load_settings(home)
    locked = Authority(None, registry, settings, signing_unavailable=PkiError("CA key locked"))
    with pytest.raises(ConfigError, match="no CRL has been published"):
        await export(home, locked, settings, tmp_path / "o", options())
    signer = await fresh(home, registry)
    await signer.publish_crl(home, now=datetime.now(UTC) - timedelta(days=3))  # its nextUpdate is long gone
    with pytest.raises(ConfigError, match=r"expired .* RabbitMQ refuses every device"):
        await export(home, locked, settings, tmp_path / "o", options())
    await signer.publish_crl(home)
    result = await export(home, locked, settings, tmp_path / "o", options())
    assert result.crl_file.read_bytes() == home.crl_pem.read_bytes()


def test_the_cli_exports_with_json_and_refuses_a_home_without_rabbitmq(home: Home, tmp_path: Path) -> None:
    command = [iotauth_executable(), "--home", str(home.root), "export", "rabbitmq", "--out", str(tmp_path / "o"),
               "--user", "", "--json"]
    refused = subprocess.run(command, capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "enabled = true" in refused.stderr and "Traceback" not in refused.stderr
    enable_rabbitmq(home)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["serve_url"] == "https://127.0.0.1:8443" and report["unusable_devices"] == []
    assert Path(report["crl"]).parent == tmp_path / "o" / "crl"
