"""``init``, ``issue`` and ``crl``."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from iotauth.authority import Authority, Issued, operator_actor
from iotauth.bootstrap import KeyPlan, initialise_home
from iotauth.certs import pem
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, success, warn
from iotauth.errors import CsrRejected, OutputNotWritten, PkiError
from iotauth.files import os_error_text, write_public
from iotauth.keystore import ca_passphrase, root_passphrase


@click.command()
@click.option("--trust-domain", help="SPIFFE trust domain written into every device URI SAN. [default: iotauth.local]")
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="Host name or IP for the broker's server certificate (repeatable). [default: localhost, 127.0.0.1]",
)
@click.option("--key-type", type=click.Choice(["p256", "p384"]), default="p256", show_default=True)
@click.option("--root-key-uri", metavar="URI",
              help="pkcs11: URI of the root key on a token (created, or adopted if it exists).")
@click.option("--issuing-key-uri", metavar="URI",
              help="pkcs11: URI of the issuing CA key on a token (created, or adopted if it exists).")
@click.option("--pkcs11-module", metavar="PATH", help="PKCS#11 module for URIs without ?module-path=.")
@click.option("--offline-root", is_flag=True,
              help="Export the root key (encrypted) to --root-key-out and keep none in the home.")
@click.option("--root-key-out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where --offline-root writes the encrypted root key (outside the home).")
@click.option("--root-passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the offline root's passphrase. [default: $IOTAUTH_ROOT_PASSPHRASE]")
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
    root_key_uri: str | None,
    issuing_key_uri: str | None,
    pkcs11_module: str | None,
    offline_root: bool,
    root_key_out: Path | None,
    root_passphrase_file: Path | None,
    rabbitmq: bool,
    as_json: bool,
) -> None:
    """Create the CA hierarchy, the broker certificate, iotauth.toml and the registry."""
    if offline_root != (root_key_out is not None):
        raise click.UsageError("--offline-root and --root-key-out go together")
    passphrase = ca_passphrase()
    keys = KeyPlan(
        root_key_uri=root_key_uri,
        issuing_key_uri=issuing_key_uri,
        pkcs11_module=pkcs11_module,
        offline_root=root_key_out,
        root_passphrase=root_passphrase(root_passphrase_file) if offline_root else None,
    )
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
            keys=keys,
        )
    )
    data = {
        "home": str(result.home),
        "trust_domain": result.trust_domain,
        "root_fingerprint": result.root_fingerprint,
        "issuing_fingerprint": result.issuing_fingerprint,
        "server_names": list(result.server_names),
        "ca_keys_encrypted": result.encrypted,
        "root_key": result.root_key,
        "issuing_key": result.issuing_key,
        "adopted_token_keys": list(result.adopted),
        "root_key_exported": str(result.root_key_exported) if result.root_key_exported else None,
        "device_ids": "A-Z a-z 0-9 _ - (no '.': RabbitMQ reads it as a topic level break)"
        if result.rabbitmq
        else "A-Z a-z 0-9 . _ -",
    }
    if result.unencrypted_key_files:
        warn(
            "IOTAUTH_CA_PASSPHRASE is not set: the CA private keys are stored UNENCRYPTED "
            f"(mode 0600) in {ctx.home.ca_dir}. Set it before 'iotauth init' to encrypt them at rest."
        )
    if as_json:
        emit_json(data)
        return
    success(f"initialised iotauth home {result.home}")
    fields("CA", data)
    if result.root_key_exported is not None:
        warn(f"the root key is ONLY in {result.root_key_exported}: store it off-site; the home holds no copy")


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

    async def work(authority: Authority) -> Issued:
        return await authority.issue(
            csr, device_id, profile, hardware_id=hardware_id, activate=not pending, actor=operator_actor(),
            idempotent=True,
        )

    issued = run(ctx.with_authority(work))
    body = issued.pem + (pem(issued.chain[0]) if fullchain else b"")
    record = issued.record.as_dict()
    if out is not None:
        _write_out(out, body, issued, fullchain)
    if as_json:
        emit_json({**record, "pem": body.decode(), "out": str(out) if out else None, "reused": issued.reused})
        return
    if out is None:
        sys.stdout.write(body.decode())
    verb = "already issued (same device and key; nothing new was issued):" if issued.reused else "issued"
    success(f"{verb} {record['status']} certificate {record['serial']} for {device_id}"
            + (f" -> {out}" if out else ""))


def _write_out(out: Path, body: bytes, issued: Issued, fullchain: bool) -> None:
    """Write the certificate file; if that fails, say that it *is* issued and how to fetch it again."""
    try:
        write_public(out, body)
    except OSError as exc:
        device_id, serial = issued.record.device_id, issued.record.serial
        again = f"iotauth devices show {device_id} --pem" + (" --fullchain" if fullchain else "") + f" > {out}"
        raise OutputNotWritten(
            f"certificate {serial} for {device_id} is issued and {issued.record.status.value} in the registry, "
            f"but {out} could not be written: {os_error_text(exc)}. Fetch it again with '{again}' "
            "(or re-run this command: the same CSR returns the same certificate)"
        ) from exc


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
        try:
            write_public(out, body)
        except OSError as exc:
            raise PkiError(f"CRL #{published.number} is published in {ctx.home.ca_dir}, but {out} could not be "
                           f"written: {os_error_text(exc)}") from exc
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
