"""Steps 4-7 of a provisioning run: the key, the certificate, and delivering both to the board.

The order is what keeps every certificate in the field revocable: the
certificate is recorded durably (as *pending*) before PUT_CERT sends it, and
a key is certified at most once (see :mod:`iotauth.provisioning.planner`).
"""

from __future__ import annotations

import asyncio

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PublicKeyTypes

from iotauth.certs import fingerprint, now_utc, public_key_sha256, serial_hex
from iotauth.errors import CsrRejected, ProvisioningError
from iotauth.pki.csr import load_device_csr
from iotauth.pki.keys import check_key_allowed, generate_private_key
from iotauth.provisioning import planner
from iotauth.provisioning.board import Board
from iotauth.provisioning.context import RunState
from iotauth.provisioning.messages import KeyType
from iotauth.provisioning.objects import DeviceConfig, encode_cert_bundle, sha256, spki_der, wire_key_type
from iotauth.provisioning.planner import KeyAction, Plan
from iotauth.provisioning.results import Step
from iotauth.registry import CertificateRecord


class Certification:
    """Steps 4-7 of a provisioning run: the key, the certificate, and delivering both to the board."""

    def __init__(self, run: RunState, board: Board, plan: Plan, board_key: PublicKeyTypes | None) -> None:
        self.run = run
        self.board = board
        self.plan = plan
        self.board_key = board_key
        self.csr: x509.CertificateSigningRequest | None = None
        self.reuse: CertificateRecord | None = None

    # -- 4 key -----------------------------------------------------------------------------

    async def key(self) -> None:
        run, key = self.run, self.plan.key
        if key is None:
            raise ProvisioningError("no key plan")
        await run.supersede(key.supersede)
        if key.action is KeyAction.REUSE and key.reuse is not None:
            self.reuse = key.reuse
            run.resumed = True
            run.public_key = self.board_key
            run.done({"key_source": "board", "reused_certificate": self.reuse.serial,
                       "public_key_sha256": self.reuse.public_key_sha256}, detail="resuming")
            return
        if key.action is KeyAction.HOST:
            await self._put_host_key(key.key_type)
            return
        rejected: str | None = None
        try:
            csr, der, normalised = await self._read_csr(key)
        except CsrRejected as exc:
            retry = planner.rekey_after_rejection(key)
            if retry is None:
                raise ProvisioningError(f"the device's CSR was refused: {exc}") from None
            # The kept key was never certified: replacing it loses nothing, and a stuck board recovers.
            rejected, key = str(exc), retry
            run.begin(Step.KEY, "CSR refused: replacing the key")
            try:
                csr, der, normalised = await self._read_csr(key)
            except CsrRejected as again:
                raise ProvisioningError(f"the device's CSR was refused, also over a new key: {again}") from None
        public_key = csr.public_key()
        keep = key.action is KeyAction.KEEP
        self.csr, run.public_key = csr, public_key
        run.resumed = run.resumed or keep
        run.done({"key_source": "board", "key_type": _key_type(public_key).profile_name,
                   "public_key_sha256": public_key_sha256(public_key), "csr_sha256": sha256(der).hex(),
                   "new_key": not keep, "csr_normalised": normalised, "rejected_csr": rejected})

    async def _read_csr(self, key: planner.KeyPlan) -> tuple[x509.CertificateSigningRequest, bytes, str | None]:
        """GENERATE_KEY and read the CSR; refuse (:class:`CsrRejected`) one the station cannot certify, saying why."""
        der = await self.board.read_csr(key.key_type, key.action is KeyAction.REPLACE)
        parsed = load_device_csr(der)
        public_key = parsed.csr.public_key()
        if key.action is KeyAction.KEEP and (self.board_key is None
                                             or spki_der(public_key) != spki_der(self.board_key)):
            # Not a bad CSR but a board that contradicts itself: no re-key, the run fails.
            raise ProvisioningError("the CSR's key is not the key the device reported in INFO")
        kind = wire_key_type(public_key)
        if kind is not key.key_type:
            got = kind.profile_name if kind is not None else type(public_key).__name__
            raise CsrRejected(f"the CSR's key is {got}, but the station asked for {key.key_type.profile_name}")
        check_key_allowed(public_key, self.run.context.options.key_types, self.run.context.rsa_min_bits)
        return parsed.csr, der, parsed.normalised

    async def _put_host_key(self, key_type: KeyType) -> None:
        """Host-key mode: make the key here, write it, and drop it.

        The private key exists only in this function: as the OpenSSL key
        object (freed, and its scalar cleared by OpenSSL, when dropped) and as
        one bytearray that is zeroed after the write. It is never logged,
        journaled or written anywhere but the device. (Python cannot promise
        that transient immutable copies, such as the frame bytes, are wiped
        before the memory is reused.)
        """
        run = self.run
        private_key = generate_private_key(key_type.profile_name)
        public_key = private_key.public_key()
        secret = bytearray(private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        del private_key
        try:
            await run.context.authority.check_public_key_free(public_key, run.assigned_id())
            digest = await self.board.put_key(bytes(secret))
            if digest != sha256(bytes(secret)):
                raise ProvisioningError("the device stored a different key than was sent")
        finally:
            secret[:] = bytes(len(secret))
        run.public_key = public_key
        run.done({"key_source": "host", "key_type": key_type.profile_name,
                   "public_key_sha256": public_key_sha256(public_key), "new_key": True})

    # -- 5 issue ---------------------------------------------------------------------------

    async def issue(self) -> None:
        """Issue (durably, as pending) while the config, which needs no certificate, is written.

        The config carries the device id, broker and trust anchor, nothing
        secret and nothing that depends on the certificate, so writing it
        during issuance hides the registry's commit behind the wire. The
        certificate itself is only sent (step 6) after its record is durable.
        """
        run = self.run
        config = self._config_object()
        certify = asyncio.ensure_future(self._certify())
        try:
            if await self.board.put_config(config) != sha256(config):
                raise ProvisioningError("the device acknowledged a different config object")
        except BaseException:
            await asyncio.wait([certify])  # never abandon a registry write half way
            if not certify.cancelled():
                certify.exception()
            raise
        run.cert = await certify
        run.check_issued(run.cert)
        run.done({"serial": serial_hex(run.cert), "fingerprint": fingerprint(run.cert),
                   "reused": self.reuse is not None})

    async def _certify(self) -> x509.Certificate:
        if self.reuse is not None:
            return x509.load_pem_x509_certificate(self.reuse.pem.encode())
        run = self.run
        device_id = run.assigned_id()
        key = run.public_key
        if key is None:
            raise ProvisioningError("no public key to certify")
        if self.plan.had_certificates:
            options = run.context.options
            await run.supersede(planner.orphaned(await run.registry.certificates_of(device_id),
                                                 public_key_sha256(key), pending_ttl=options.pending_ttl,
                                                 now=now_utc(), force=options.force))
        await run.journal.barrier()
        context = run.context
        authority, profile, operator = context.authority, context.options.profile, context.operator
        if self.csr is not None:
            issued = await authority.issue(self.csr, device_id, profile, hardware_id=run.hardware_id,
                                           activate=False, actor=operator, exclusive=True)
        else:
            issued = await authority.issue_for_key(_certifiable(key), device_id, profile,
                                                   hardware_id=run.hardware_id, activate=False, actor=operator,
                                                   exclusive=True)
        return issued.certificate

    # -- 6 write / 7 verify ------------------------------------------------------------------

    def _cert_object(self) -> bytes:
        der = serialization.Encoding.DER
        issuing = self.run.context.authority.ca.issuing_cert
        return encode_cert_bundle([self.run.certificate().public_bytes(der), issuing.public_bytes(der)])

    def _config_object(self) -> bytes:
        authority = self.run.context.authority
        settings, root = authority.settings, authority.ca.root_cert
        anchors = (root.public_bytes(serialization.Encoding.DER),)
        return DeviceConfig(self.run.assigned_id(), settings.broker_host, settings.broker_port, anchors).encode()

    async def write(self) -> None:
        bundle = self._cert_object()
        if await self.board.put_cert(bundle) != sha256(bundle):
            raise ProvisioningError("the device acknowledged a different certificate object")
        self.run.done({"cert_object_bytes": len(bundle), "config_bytes": len(self._config_object())})

    async def verify(self) -> None:
        bundle, config = self._cert_object(), self._config_object()
        cert = self.run.certificate()
        hashes = await self.board.read_back()
        expected = {
            "key": sha256(spki_der(cert.public_key())),
            "cert": bytes.fromhex(fingerprint(cert)),
            "chain": sha256(bundle),
            "config": sha256(config),
        }
        wrong = [name for name, digest in expected.items() if getattr(hashes, name) != digest]
        if wrong:
            raise ProvisioningError(f"read-back mismatch: {', '.join(wrong)}")
        self.run.done({name: digest.hex() for name, digest in expected.items()})


def _key_type(key: PublicKeyTypes) -> KeyType:
    kind = wire_key_type(key)
    if kind is None:
        raise ProvisioningError(f"unsupported key algorithm {type(key).__name__}")
    return kind


def _certifiable(key: PublicKeyTypes) -> CertificatePublicKeyTypes:
    _key_type(key)
    return key  # type: ignore[return-value]
