"""``iotauth audit verify`` and ``audit anchor``: a log that lost its history, came from another home, or was
rewritten or cut behind an anchor kept elsewhere, does not verify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from iotauth.registry.audit import event_hash
from iotauth.testing import free_port
from tests.fixtures.cli import iotauth, one_line_error


def registry(home: Path) -> Path:
    return home / "registry.db"


def edit(db: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """Change the database directly, as someone with write access to it can (closed: the WAL is folded in)."""
    conn = sqlite3.connect(db)
    try:
        for statement in statements:
            conn.execute(statement, params if "?" in statement else ())
        conn.commit()
    finally:
        conn.close()


def test_the_reported_truncation_is_refused_by_every_command(cli_home: Path, csr_file: Path) -> None:
    """init, issue d0, revoke d0, truncate -s 0 registry.db: nothing may treat it as a new, empty registry."""
    iotauth(cli_home, "issue", "d0", "--csr", str(csr_file))
    iotauth(cli_home, "revoke", "d0")
    crl_before = (cli_home / "ca" / "crl.pem").read_bytes()
    os.truncate(registry(cli_home), 0)
    for args in (("devices", "list"), ("audit", "verify"), ("crl",), ("revoke", "d0"), ("audit",)):
        one_line_error(iotauth(cli_home, *args, ok=False), "is an empty file, not an iotauth registry")
    assert (cli_home / "ca" / "crl.pem").read_bytes() == crl_before  # no CRL without the revocation was published
    assert registry(cli_home).stat().st_size == 0


def test_init_never_adopts_a_foreign_or_used_registry(tmp_path: Path, cli_home: Path) -> None:
    foreign = tmp_path / "foreign.db"
    edit(foreign, "CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    one_line_error(iotauth(tmp_path / "h1", "--registry", str(foreign), "init", ok=False), "will not adopt it")
    one_line_error(iotauth(tmp_path / "h2", "--registry", str(registry(cli_home)), "init", ok=False),
                   "already holds 1 audit events")
    assert not (tmp_path / "h2" / "ca").exists()  # refused before any CA was made


def test_a_registry_without_its_genesis_does_not_verify(cli_home: Path, tmp_path: Path) -> None:
    """The history is gone: an empty registry made with the schema (the chain of 0 events is 'intact')."""
    fresh = tmp_path / "fresh.db"
    iotauth(tmp_path / "other", "--registry", str(fresh), "init")
    edit(fresh, "DROP TRIGGER events_append_only_delete", "DELETE FROM events",  # the log and its counter dropped
         "UPDATE meta SET value = '0' WHERE key = 'audit_allocated'")
    shutil.copyfile(fresh, registry(cli_home))
    for suffix in ("-wal", "-shm"):
        Path(f"{registry(cli_home)}{suffix}").unlink(missing_ok=True)
    result = iotauth(cli_home, "audit", "verify", ok=False)
    one_line_error(result, "no genesis event 'ca.initialised'")


def test_a_registry_from_another_home_does_not_verify(cli_home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    iotauth(other, "init")
    shutil.copyfile(registry(other), registry(cli_home))
    report = json.loads(iotauth(cli_home, "audit", "verify", "--json", ok=False).stdout)
    assert report["ok"] is False and report["first_bad_id"] == 1
    assert "belongs to another home" in report["problem"]


def test_a_genesis_without_the_root_fingerprint_is_reported_as_a_gap(cli_home: Path) -> None:
    db = registry(cli_home)
    conn = sqlite3.connect(db)
    row = conn.execute("SELECT id, ts, kind, actor, device_id FROM events WHERE id = 1").fetchone()
    conn.close()
    # an old registry: its genesis did not record the root (rewritten consistently: the chain still verifies)
    edit(db, "DROP TRIGGER events_append_only_update", "UPDATE events SET data = '{}', hash = ? WHERE id = 1",
         params=(event_hash("0" * 64, *row, "{}"),))
    result = iotauth(cli_home, "audit", "verify")
    assert "records no root_fingerprint" in result.stderr
    assert json.loads(iotauth(cli_home, "audit", "verify", "--json").stdout)["notes"]


def rewrite_tail(db: Path, keep: int) -> None:
    """Cut the log after event ``keep`` and fix the counter, as someone with write access to the database can."""
    edit(db, "DROP TRIGGER events_append_only_delete", f"DELETE FROM events WHERE id > {keep}",
         f"UPDATE meta SET value = '{keep}' WHERE key = 'audit_allocated'")


def test_a_file_anchor_catches_a_cut_log(cli_home: Path, csr_file: Path, tmp_path: Path) -> None:
    anchor = tmp_path / "offsite" / "head.json"
    iotauth(cli_home, "issue", "a1", "--csr", str(csr_file))
    written = json.loads(iotauth(cli_home, "audit", "anchor", str(anchor), "--json").stdout)
    assert json.loads(anchor.read_text())["head_id"] == written["head_id"] == 3
    iotauth(cli_home, "revoke", "a1")  # the log grows past the anchor: still fine
    assert "extends the anchor" in iotauth(cli_home, "audit", "verify", "--anchor", str(anchor)).stderr
    iotauth(cli_home, "audit", "anchor", str(anchor))  # and the anchor moves forward

    rewrite_tail(registry(cli_home), 3)  # hide the revocation: the chain alone still verifies
    iotauth(cli_home, "audit", "verify")
    one_line_error(iotauth(cli_home, "audit", "verify", "--anchor", str(anchor), ok=False), "events were removed")
    one_line_error(iotauth(cli_home, "audit", "anchor", str(anchor), ok=False), "refusing to anchor")


def test_anchor_errors_are_one_line(cli_home: Path, tmp_path: Path) -> None:
    one_line_error(iotauth(cli_home, "audit", "verify", "--anchor", str(tmp_path / "none.json"), ok=False),
                   "there is no audit anchor")
    bogus = tmp_path / "bogus.json"
    bogus.write_text("[" * 5000)
    one_line_error(iotauth(cli_home, "audit", "verify", "--anchor", str(bogus), ok=False),
                   "not an iotauth audit anchor")
    one_line_error(iotauth(cli_home, "audit", "anchor", f"http://127.0.0.1:{free_port()}/a.json", ok=False),
                   "cannot read audit anchor")


@dataclass
class WebDav:
    """nginx with its DAV module: PUT stores a file, GET reads it back; a bearer token is required."""

    url: str
    root: Path
    token: str


NGINX_CONF = """
{user}
worker_processes 1;
error_log {prefix}/error.log;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /anchors/ {{
            if ($http_authorization != "Bearer {token}") {{ return 401; }}
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
        }}
    }}
}}
"""


@pytest.fixture
def webdav(tmp_path: Path) -> Iterator[WebDav]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light): it serves the URL anchor")
    prefix, root, port = tmp_path / "nginx", tmp_path / "www", free_port()
    prefix.mkdir()
    (root / "anchors").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    token = "anchor-token-0123456789"
    user = "user root root;" if os.geteuid() == 0 else ""  # the worker must reach pytest's private tmp_path
    conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, root=root, port=port, token=token))
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.TransportError:
            assert process.poll() is None and time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
    yield WebDav(url, root, token)
    process.send_signal(signal.SIGQUIT)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def test_a_url_anchor_is_put_and_read_back(cli_home: Path, csr_file: Path, webdav: WebDav) -> None:
    target = f"{webdav.url}/anchors/site-1/head.json"
    env = {"IOTAUTH_ANCHOR_TOKEN": webdav.token}
    one_line_error(iotauth(cli_home, "audit", "anchor", target, ok=False), "HTTP 401")  # no token: a clear error
    iotauth(cli_home, "issue", "u1", "--csr", str(csr_file))
    iotauth(cli_home, "audit", "anchor", target, env=env)
    stored = json.loads((webdav.root / "anchors" / "site-1" / "head.json").read_text())
    assert stored["head_id"] == 3 and stored["format"] == "iotauth-audit-anchor/1"
    iotauth(cli_home, "audit", "verify", "--anchor", target, env=env)
    rewrite_tail(registry(cli_home), 1)
    one_line_error(iotauth(cli_home, "audit", "verify", "--anchor", target, env=env, ok=False), "events were removed")
    one_line_error(iotauth(cli_home, "audit", "anchor", f"{webdav.url}/elsewhere.json", env=env, ok=False),
                   "HTTP 405")
