"""``init``, ``issue`` and ``crl``."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from iotauth.authority import Authority, ca_passphrase, operator_actor
from iotauth.bootstrap import initialise_home
from iotauth.certs import pem
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, success, warn
from iotauth.errors import CsrRejected
from iotauth.files import write_public


@click.command()
@click.option("--trust-domain", help="SPIFFE trust domain written into every device URI SAN. [default: iotauth.local]")
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="Host name or IP for the broker's server certificate (repeatable). [default: localhost, 127.0.0.1]",
)
@click.option("--key-type", type=click.Choice(["p256", "p384"]), default="p256", show_default=True)
@click.option(
    "--rabbitmq",
    is_flag=True,
    help="Devices will connect to RabbitMQ: [rabbitmq] enabled = true (no '.' in device ids).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_cli
def init(
    ctx: CliContext,
    trust_domain: str | None,
    server_names: tuple[str, ...],
    key_type: str,
    rabbitmq: bool,
    as_json: bool,
) -> None:
    """Create the CA hierarchy, the broker certificate, iotauth.toml and the registry."""
    passphrase = ca_passphrase()
    result = run(
        initialise_home(
            ctx.home,
            trust_domain,
            server_names or ("localhost", "127.0.0.1"),
            key_type=key_type,
            passphrase=passphrase,
            registry=ctx.registry_url,
            rabbitmq=rabbitmq,
            actor=operator_actor(),
        )
    )
    data = {
        "home": str(result.home),
        "trust_domain": result.trust_domain,
        "root_fingerprint": result.root_fingerprint,
        "issuing_fingerprint": result.issuing_fingerprint,
        "server_names": list(result.server_names),
        "ca_keys_encrypted": result.encrypted,
        "device_ids": "A-Z a-z 0-9 _ - (no '.': RabbitMQ reads it as a topic level break)"
        if result.rabbitmq
        else "A-Z a-z 0-9 . _ -",
    }
    if passphrase is None:
        warn(
            "IOTAUTH_CA_PASSPHRASE is not set: the CA private keys are stored UNENCRYPTED "
            f"(mode 0600) in {ctx.home.ca_dir}. Set it before 'iotauth init' to encrypt them at rest."
        )
    if as_json:
        emit_json(data)
        return
    success(f"initialised iotauth home {result.home}")
    fields("CA", data)


def _read_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CsrRejected(f"cannot read CSR file {path}: {exc.strerror}") from exc
    for loader in (x509.load_pem_x509_csr, x509.load_der_x509_csr):
        try:
            return loader(data)
        except ValueError:
            continue
    raise CsrRejected(f"{path} is not a PEM or DER certificate signing request")


@click.command()
@click.argument("device_id")
@click.option(
    "--csr",
    "csr_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM or DER CSR; only its key and signature are used.",
)
@click.option("--profile", default="default", show_default=True, help="Profile from iotauth.toml.")
@click.option("--hardware-id", help="Hardware id to bind to the device (stored as the subject serialNumber).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the certificate PEM here.")
@click.option("--fullchain", is_flag=True, help="Append the issuing CA certificate to the PEM output.")
@click.option("--pending", is_flag=True, help="Record as pending (not yet delivered) instead of active.")
@click.option("--json", "as_json", is_flag=True, help="Print the record (with PEM) as JSON.")
@pass_cli
def issue(
    ctx: CliContext,
    device_id: str,
    csr_path: Path,
    profile: str,
    hardware_id: str | None,
    out: Path | None,
    fullchain: bool,
    pending: bool,
    as_json: bool,
) -> None:
    """Issue a certificate for DEVICE_ID from a CSR (manual issuance and tool integration)."""
    csr = _read_csr(csr_path)

    async def work(authority: Authority) -> tuple[bytes, dict[str, object]]:
        issued = await authority.issue(
            csr, device_id, profile, hardware_id=hardware_id, activate=not pending, actor=operator_actor()
        )
        body = issued.pem + (pem(issued.chain[0]) if fullchain else b"")
        return body, issued.record.as_dict()

    body, record = run(ctx.with_authority(work))
    if out is not None:
        write_public(out, body)
    if as_json:
        emit_json({**record, "pem": body.decode(), "out": str(out) if out else None})
        return
    if out is None:
        sys.stdout.write(body.decode())
    success(f"issued {record['status']} certificate {record['serial']} for {device_id}" + (f" -> {out}" if out else ""))


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the CRL here.")
@click.option("--der", is_flag=True, help="DER instead of PEM for --out / stdout.")
@click.option("--json", "as_json", is_flag=True, help="Print CRL number, entry count and paths as JSON.")
@pass_cli
def crl(ctx: CliContext, out: Path | None, der: bool, as_json: bool) -> None:
    """Sign a fresh CRL from the registry and publish it to <home>/ca/crl.pem and crl.der."""
    if der and out is None and sys.stdout.isatty() and not as_json:
        raise click.UsageError("refusing to write a binary DER CRL to the terminal; use --out FILE")
    published = run(ctx.with_authority(lambda authority: authority.publish_crl(ctx.home)))
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    body = published.crl.public_bytes(encoding)
    if out is not None:
        write_public(out, body)
    info = {
        "number": published.number,
        "entries": published.entries,
        "next_update": published.crl.next_update_utc.isoformat() if published.crl.next_update_utc else None,
        "pem": str(ctx.home.crl_pem),
        "der": str(ctx.home.crl_der),
        "out": str(out) if out else None,
    }
    if as_json:
        emit_json(info)
    elif out is None:
        sys.stdout.buffer.write(body)
    else:
        success(f"CRL #{published.number} with {published.entries} entries written to {out}")


COMMANDS = (init, issue, crl)
