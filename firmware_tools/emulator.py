"""An emulated device that speaks the provisioning protocol: ``python -m firmware_tools.emulator``.

It is a real program on the far end of a real serial line, so the station is
tested exactly as it runs on the line:

* ``--pty`` opens a pseudo-terminal and prints its path (``/dev/pts/N``) as
  the first line on stdout; ``--port DEV`` attaches to an existing serial
  device instead.
* ``--state DIR`` is the device's flash: hardware id, private key, CSR,
  certificate object, config and the committed mark are files there, each
  replaced atomically, so provisioning survives a restart (or a SIGKILL)
  exactly as on a device. For convenience it also exports ``key.pem``,
  ``cert.pem``, ``chain.pem``, ``fullchain.pem``, ``ca.pem`` and
  ``config.json`` for an MQTT client to use (:attr:`Flash.EXPORTS`).
* Keys are real (P-256 by default), CSRs and PROVE signatures are real.
* ``--baud N`` paces both directions at N baud (10 bits per byte, 8N1) and
  ``--keygen-ms N`` makes key generation take N ms, so benchmarks see the
  timing of a real line.
* ``--fault KIND:STEP[:N]`` injects one fault at the N-th request (default 1)
  of a step; see :data:`FAULT_KINDS`.
* ``--boards N`` emulates a fixture that is fed N boards in turn: after a
  board commits, the next HELLO meets a fresh blank board (for benchmarks).
* ``--keygen-command CMD`` makes keys and CSRs with a real device stack
  instead (``firmware_tools/mbedtls/keygen_csr.c`` compiled against mbedTLS):
  the emulator stays the reference device, the key material is the library's.
* ``--violate RULE`` breaks one rule of PROTOCOL.md on purpose (see
  :data:`VIOLATIONS`), so ``python -m firmware_tools.conformance`` can be seen
  to fail against it.

The wire codec is the station's own (:mod:`iotauth.provisioning.codec`): one
codec in code, byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from iotauth.errors import FrameError, ProtocolError
from iotauth.provisioning.codec import MAX_PAYLOAD, SEQ_UNSOLICITED, Deframer, Frame
from iotauth.provisioning.messages import (
    ERROR_FOR_PROTOCOL_CODE,
    REQUESTS,
    Capability,
    CertAck,
    Commit,
    Committed,
    ConfigAck,
    Csr,
    DeviceState,
    Erase,
    Erased,
    Error,
    ErrorCode,
    GenerateKey,
    Hashes,
    Hello,
    Info,
    KeyAck,
    KeyType,
    KeyTypes,
    Message,
    MsgType,
    Prove,
    PutCert,
    PutConfig,
    PutKey,
    ReadBack,
    Signature,
    parse_message,
)
from iotauth.provisioning.objects import (
    MAX_CERT_OBJECT,
    MAX_CONFIG_OBJECT,
    MAX_KEY_OBJECT,
    ZERO_HASH,
    DeviceConfig,
    decode_cert_bundle,
    generate_key,
    sha256,
    sign_proof,
    spki_der,
    wire_key_type,
)

PROTOCOL_VERSION = 1
DEFAULT_MODEL = "iotauth-emu"
DEFAULT_FIRMWARE = "1.0.0-emu"
EXIT_DISCONNECTED = 3
STEPS = {t.name.lower(): t for t in MsgType if t in REQUESTS}
FAULT_KINDS = {
    "corrupt": "execute the request, then flip one byte of the reply on the wire",
    "drop": "execute the request, then lose the reply (a retransmit gets the cached reply)",
    "stall": "go silent before executing (for --stall-ms, 0 = until killed), then carry on",
    "disconnect": "execute the request, then vanish from the line without replying (exit status 3)",
    "reboot": "execute the request, then reset: RAM (retransmit cache, partial uploads) is lost, flash kept",
    "nak": "refuse without executing: ERROR FLASH_WRITE for writes, BUSY otherwise",
    "badcsr": "GENERATE_KEY: the new key's stored CSR carries a broken signature (a firmware bug)",
}
VIOLATIONS = {
    "cache": "execute a retransmitted request again instead of resending the cached reply (section 2)",
    "precedence": "answer LOCKED before UNSUPPORTED (section 3.9)",
    "keep-buffer": "keep a completed upload's buffer after its validation failed (section 3.3)",
}
_WRITES = {MsgType.GENERATE_KEY, MsgType.PUT_KEY, MsgType.PUT_CERT, MsgType.PUT_CONFIG, MsgType.COMMIT, MsgType.ERASE}
_LIMITS = {MsgType.PUT_KEY: MAX_KEY_OBJECT, MsgType.PUT_CERT: MAX_CERT_OBJECT, MsgType.PUT_CONFIG: MAX_CONFIG_OBJECT}
_ACKS: dict[MsgType, type[KeyAck] | type[CertAck] | type[ConfigAck]] = {
    MsgType.PUT_KEY: KeyAck,
    MsgType.PUT_CERT: CertAck,
    MsgType.PUT_CONFIG: ConfigAck,
}


class Refused(Exception):
    """The device answers the request with ERROR (code, text, arg)."""

    def __init__(self, code: ErrorCode, text: str, arg: int = 0) -> None:
        super().__init__(text)
        self.reply = Error(code, arg, text[:200])


# -- flash -------------------------------------------------------------------------------------


class Flash:
    """The device's non-volatile storage: one file per item, each replaced atomically.

    Items are fsynced before the device replies, as real firmware must do.
    Exports (PEM copies for an MQTT client) are conveniences outside the
    protocol: replaced atomically but not fsynced. Reads are served from a
    RAM copy, which a reset discards (:meth:`forget`).
    """

    ITEMS = ("key.der", "csr.der", "cert.bin", "config.bin", "committed")
    EXPORTS = ("key.pem", "cert.pem", "chain.pem", "fullchain.pem", "ca.pem", "config.json")

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._cache: dict[str, bytes | None] = {}

    def read(self, name: str) -> bytes | None:
        if name not in self._cache:
            try:
                self._cache[name] = (self.root / name).read_bytes()
            except FileNotFoundError:
                self._cache[name] = None
        return self._cache[name]

    def write(self, name: str, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                if durable:
                    os.fsync(out.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, self.root / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._cache[name] = data

    def export(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.write(name, data, mode, durable=False)

    def remove(self, *names: str) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()
            self._cache[name] = None

    def forget(self) -> None:
        self._cache.clear()


@dataclass(frozen=True)
class Identity:
    hardware_id: str
    model: str
    firmware: str


def load_identity(flash: Flash, hardware_id: str | None, model: str, firmware: str) -> Identity:
    """The burned-in identity: chosen on first start, then read back from flash forever."""
    stored = flash.read("identity.json")
    if stored is not None:
        data = json.loads(stored)
        return Identity(str(data["hardware_id"]), str(data["model"]), firmware)
    identity = Identity(hardware_id or f"EMU-{secrets.token_hex(4).upper()}", model, firmware)
    flash.write("identity.json", json.dumps({"hardware_id": identity.hardware_id, "model": model}).encode(), 0o644)
    return identity


# -- the device ------------------------------------------------------------------------------


@dataclass
class _Upload:
    total: int
    data: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Options:
    capabilities: Capability = Capability.KEYGEN | Capability.PUT_KEY
    key_types: KeyTypes = KeyTypes.P256 | KeyTypes.P384
    max_payload: int = MAX_PAYLOAD
    keygen_seconds: float = 0.0
    keygen_command: tuple[str, ...] = ()
    violations: frozenset[str] = frozenset()  # rules deliberately broken (see VIOLATIONS)


def external_keygen(command: Sequence[str], key_type: KeyType, subject: str, workdir: Path) -> tuple[bytes, bytes]:
    """Run a device stack's own key generator: ``COMMAND TYPE SUBJECT_CN DIR`` writes DIR/key.der and DIR/csr.der.

    This is how the emulator stays the reference device while its key and CSR
    come from real firmware code (``firmware_tools/mbedtls/keygen_csr.c``
    compiled against mbedTLS). The private key is DER (PKCS#8 or SEC1); the
    directory is private to the device's flash and removed afterwards.
    """
    out = Path(tempfile.mkdtemp(dir=workdir, prefix=".keygen-"))
    try:
        done = subprocess.run([*command, key_type.profile_name, subject, str(out)],  # noqa: S603 - the operator's own tool
                              capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise Refused(ErrorCode.BUSY, f"key generator failed ({done.returncode})")
        return (out / "key.der").read_bytes(), (out / "csr.der").read_bytes()
    finally:
        shutil.rmtree(out, ignore_errors=True)


class Device:
    """The protocol logic of one board: requests in, replies out; flash and RAM state."""

    def __init__(self, flash: Flash, identity: Identity, options: Options) -> None:
        self.flash = flash
        self.identity = identity
        self.options = options
        self._uploads: dict[MsgType, _Upload] = {}
        self._key: PrivateKeyTypes | None = None
        self.break_next_csr = False  # the badcsr fault

    def reboot(self) -> None:
        """Lose RAM, keep flash."""
        self._uploads.clear()
        self._key = None
        self.flash.forget()

    # -- flash views --

    def key(self) -> PrivateKeyTypes | None:
        if self._key is None:
            der = self.flash.read("key.der")
            if der is not None:
                self._key = serialization.load_der_private_key(der, password=None)
        return self._key

    def cert_object(self) -> bytes | None:
        return self.flash.read("cert.bin")

    def leaf(self) -> bytes | None:
        obj = self.cert_object()
        return decode_cert_bundle(obj)[0] if obj else None

    def committed(self) -> bytes | None:
        mark = self.flash.read("committed")
        return bytes.fromhex(mark.decode()) if mark else None

    def state(self) -> DeviceState:
        state = DeviceState(0)
        if self.flash.read("key.der") is not None:
            state |= DeviceState.HAS_KEY
        if self.cert_object() is not None:
            state |= DeviceState.HAS_CERT
        if self.flash.read("config.bin") is not None:
            state |= DeviceState.HAS_CONFIG
        if self.committed() is not None:
            state |= DeviceState.COMMITTED
        return state

    # -- requests --

    def handle(self, msg: Message) -> Message:
        try:
            if isinstance(msg, Hello):
                return self.info()
            if isinstance(msg, GenerateKey):
                return self._generate(msg)
            if isinstance(msg, PutKey | PutCert | PutConfig):
                return self._put(msg)
            if isinstance(msg, ReadBack):
                return self._hashes()
            if isinstance(msg, Prove):
                return self._prove(msg)
            if isinstance(msg, Commit):
                return self._commit(msg)
            if isinstance(msg, Erase):
                return self._erase(msg)
            raise Refused(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE.name} is not a request")
        except Refused as refusal:
            return refusal.reply

    def info(self) -> Info:
        key = self.key()
        leaf = self.leaf()
        return Info(
            protocol_version=PROTOCOL_VERSION,
            max_payload=self.options.max_payload,
            capabilities=self.options.capabilities,
            key_types=self.options.key_types,
            state=self.state(),
            hardware_id=self.identity.hardware_id,
            model=self.identity.model,
            firmware=self.identity.firmware,
            public_key=spki_der(key.public_key()) if key is not None else b"",
            cert_fingerprint=sha256(leaf) if leaf is not None else b"",
        )

    def _unlocked(self) -> None:
        if self.committed() is not None:
            raise Refused(ErrorCode.LOCKED, "device is committed; ERASE first")

    def _generate(self, msg: GenerateKey) -> Csr:
        if "precedence" in self.options.violations:
            self._unlocked()  # rule-breaking: LOCKED checked before UNSUPPORTED
        if not self.options.capabilities & Capability.KEYGEN:
            raise Refused(ErrorCode.UNSUPPORTED, "this device cannot generate keys; use PUT_KEY")
        if not self.options.key_types & msg.key_type.flag:
            raise Refused(ErrorCode.UNSUPPORTED, f"key type {msg.key_type.name} not supported")
        self._unlocked()
        key = self.key()
        if key is None or msg.replace:
            if msg.offset:
                raise Refused(ErrorCode.BAD_STATE, "no key yet: start at offset 0")
            key = self._new_key(msg.key_type)
        elif wire_key_type(key.public_key()) is not msg.key_type:
            raise Refused(ErrorCode.BAD_STATE, "a key of another type is stored; set REPLACE")
        csr = self._csr(key)
        if msg.offset >= len(csr):
            raise Refused(ErrorCode.BAD_OFFSET, f"offset {msg.offset} is past the CSR's end", len(csr))
        chunk = csr[msg.offset : msg.offset + self.options.max_payload - 4]
        return Csr(len(csr), msg.offset, chunk)

    def _new_key(self, key_type: KeyType) -> PrivateKeyTypes:
        started = time.monotonic()
        csr = None
        if self.options.keygen_command:
            der, csr = external_keygen(self.options.keygen_command, key_type, self.identity.hardware_id[:64],
                                       self.flash.root)
            key = serialization.load_der_private_key(der, password=None)
        else:
            key = generate_key(key_type)
        remaining = self.options.keygen_seconds - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        self._store_key(key)
        if csr is not None:
            self.flash.write("csr.der", csr)
        return key

    def _store_key(self, key: PrivateKeyTypes) -> None:
        old = self.key()
        if old is not None and spki_der(old.public_key()) != spki_der(key.public_key()):
            self.flash.remove("cert.bin", "cert.pem", "chain.pem", "fullchain.pem")
        self.flash.remove("csr.der")
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        self.flash.write("key.der", der)
        self.flash.export("key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()), 0o600)
        self._key = key

    def _csr(self, key: PrivateKeyTypes) -> bytes:
        stored = self.flash.read("csr.der")
        if stored is not None:
            return stored
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.identity.hardware_id[:64])])
        builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            csr = builder.sign(key, None)
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            digest = hashes.SHA384() if key.curve.name == "secp384r1" else hashes.SHA256()
            csr = builder.sign(key, digest)
        else:
            raise Refused(ErrorCode.BAD_STATE, "stored key cannot sign")
        der = csr.public_bytes(serialization.Encoding.DER)
        if self.break_next_csr:  # flip the signature's last byte: still DER, no longer a valid signature
            self.break_next_csr = False
            der = der[:-1] + bytes([der[-1] ^ 0x01])
        self.flash.write("csr.der", der)
        return der

    def _put(self, msg: PutKey | PutCert | PutConfig) -> Message:
        kind = msg.TYPE
        if kind is MsgType.PUT_KEY and not self.options.capabilities & Capability.PUT_KEY:
            raise Refused(ErrorCode.UNSUPPORTED, "this device does not accept keys")
        self._unlocked()
        if msg.total > min(_LIMITS[kind], 0xFFFF):
            raise Refused(ErrorCode.TOO_LARGE, f"{kind.name} object of {msg.total} bytes is too large")
        if kind is MsgType.PUT_CERT and self.key() is None:
            raise Refused(ErrorCode.BAD_STATE, "no key stored; a certificate needs its key first")
        upload = self._uploads.get(kind)
        if msg.offset == 0:
            upload = self._uploads[kind] = _Upload(msg.total)
        if upload is None or upload.total != msg.total:
            self._uploads.pop(kind, None)  # a changed total ends the upload: the host restarts at 0
            raise Refused(ErrorCode.BAD_OFFSET, "no upload of this total in progress; restart at offset 0", 0)
        end = msg.offset + len(msg.data)
        if msg.offset == len(upload.data):
            upload.data += msg.data
        elif not (end <= len(upload.data) and upload.data[msg.offset : end] == msg.data):
            raise Refused(ErrorCode.BAD_OFFSET, f"expected offset {len(upload.data)}", len(upload.data))
        ack = _ACKS[kind]
        if len(upload.data) < upload.total:
            return ack(len(upload.data), False)
        obj = bytes(upload.data)
        if "keep-buffer" not in self.options.violations:
            del self._uploads[kind]  # complete: stored, or refused at validation; either way the buffer is gone
        self._store(kind, obj)
        return ack(len(obj), True, sha256(obj))

    def _store(self, kind: MsgType, obj: bytes) -> None:
        if kind is MsgType.PUT_KEY:
            self._store_key(self._parse_key(obj))
        elif kind is MsgType.PUT_CERT:
            self._store_cert(obj)
        else:
            self._store_config(obj)

    def _parse_key(self, obj: bytes) -> PrivateKeyTypes:
        if not _is_pkcs8(obj):
            raise Refused(ErrorCode.BAD_PAYLOAD, "KEY object is not PKCS#8 (a bare SEC1 key is not accepted)")
        try:
            key = serialization.load_der_private_key(obj, password=None)
        except (ValueError, TypeError):
            raise Refused(ErrorCode.BAD_PAYLOAD, "KEY object is not a PKCS#8 DER private key") from None
        kind = wire_key_type(key.public_key())
        if kind is None or not self.options.key_types & kind.flag:
            raise Refused(ErrorCode.UNSUPPORTED, "key type not supported")
        return key

    def _store_cert(self, obj: bytes) -> None:
        try:
            ders = decode_cert_bundle(obj)
            certs = [x509.load_der_x509_certificate(der) for der in ders]
        except (ProtocolError, ValueError):
            raise Refused(ErrorCode.BAD_PAYLOAD, "CERT object is not a certificate bundle") from None
        key = self.key()
        if key is None or spki_der(certs[0].public_key()) != spki_der(key.public_key()):
            raise Refused(ErrorCode.KEY_MISMATCH, "certificate does not match the stored key")
        pems = [c.public_bytes(serialization.Encoding.PEM) for c in certs]
        self.flash.write("cert.bin", obj)
        self.flash.export("cert.pem", pems[0])
        self.flash.export("chain.pem", b"".join(pems[1:]))
        self.flash.export("fullchain.pem", b"".join(pems))

    def _store_config(self, obj: bytes) -> None:
        try:
            config = DeviceConfig.decode(obj)
            anchors = [x509.load_der_x509_certificate(der) for der in config.trust_anchors]
        except (ProtocolError, ValueError):
            raise Refused(ErrorCode.BAD_PAYLOAD, "CONFIG object is malformed") from None
        self.flash.write("config.bin", obj)
        self.flash.export("ca.pem", b"".join(a.public_bytes(serialization.Encoding.PEM) for a in anchors))
        summary = {"device_id": config.device_id, "broker_host": config.broker_host, "broker_port": config.broker_port}
        self.flash.export("config.json", json.dumps(summary, indent=2).encode())

    def _hashes(self) -> Hashes:
        key = self.key()
        obj = self.cert_object()
        config = self.flash.read("config.bin")
        return Hashes(
            state=self.state(),
            key=sha256(spki_der(key.public_key())) if key is not None else ZERO_HASH,
            cert=sha256(decode_cert_bundle(obj)[0]) if obj else ZERO_HASH,
            chain=sha256(obj) if obj else ZERO_HASH,
            config=sha256(config) if config else ZERO_HASH,
        )

    def _prove(self, msg: Prove) -> Signature:
        key = self.key()
        if key is None:
            raise Refused(ErrorCode.BAD_STATE, "no key stored")
        algorithm, signature = sign_proof(key, msg.nonce)
        return Signature(algorithm, signature)

    def _commit(self, msg: Commit) -> Committed:
        committed = self.committed()
        if committed is not None:
            if committed == msg.fingerprint:
                return Committed(committed)
            raise Refused(ErrorCode.LOCKED, "committed with another certificate; ERASE first")
        leaf = self.leaf()
        if self.key() is None or leaf is None or self.flash.read("config.bin") is None:
            raise Refused(ErrorCode.BAD_STATE, "key, certificate and config must all be stored before COMMIT")
        if sha256(leaf) != msg.fingerprint:
            raise Refused(ErrorCode.BAD_STATE, "COMMIT fingerprint does not match the stored certificate")
        self.flash.write("committed", msg.fingerprint.hex().encode(), 0o644)
        return Committed(msg.fingerprint)

    def _erase(self, msg: Erase) -> Erased:
        if msg.hardware_id != self.identity.hardware_id:
            raise Refused(ErrorCode.CONFIRM_MISMATCH, "ERASE confirmation does not name this device")
        self.flash.remove("committed", *Flash.ITEMS, *Flash.EXPORTS)
        self.reboot()
        return Erased()


def _is_pkcs8(obj: bytes) -> bool:
    """PrivateKeyInfo starts SEQUENCE { INTEGER version, SEQUENCE algorithm, ... }; SEC1 has an OCTET STRING second."""
    try:
        pos = 2 + (obj[1] & 0x7F if obj[1] & 0x80 else 0)
        if obj[0] != 0x30 or obj[pos] != 0x02:
            return False
        pos += 2 + obj[pos + 1]
        return obj[pos] == 0x30
    except IndexError:
        return False


# -- faults ----------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    step: MsgType
    nth: int = 1
    seen: int = 0
    fired: bool = False


def parse_fault(spec: str) -> Fault:
    """``KIND:STEP[:N]``, e.g. ``drop:generate_key`` or ``disconnect:put_cert:2``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in FAULT_KINDS or parts[1] not in STEPS:
        raise argparse.ArgumentTypeError(
            f"bad fault {spec!r}: use KIND:STEP[:N] with KIND in {sorted(FAULT_KINDS)} and STEP in {sorted(STEPS)}"
        )
    nth = int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else 1
    return Fault(parts[0], STEPS[parts[1]], max(nth, 1))


class Faults:
    """One-shot faults, matched by request type and occurrence."""

    def __init__(self, faults: Sequence[Fault]) -> None:
        self._faults = list(faults)

    def take(self, step: MsgType) -> str | None:
        chosen = None
        for fault in self._faults:
            if fault.step is step and not fault.fired:
                fault.seen += 1
                if fault.seen == fault.nth and chosen is None:
                    fault.fired = True
                    chosen = fault.kind
        return chosen


# -- the line ----------------------------------------------------------------------------------


class Line:
    """The device end of the serial line, paced at the emulated baud rate."""

    def __init__(self, fd: int, baud: int, keep_open: int | None = None) -> None:
        self.fd = fd
        self._keep_open = keep_open
        self._byte_time = 10.0 / baud if baud > 0 else 0.0
        self._tx_free = 0.0
        self.rx_done = 0.0

    def read(self, timeout: float | None = None) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return b""
        try:
            data = os.read(self.fd, 4096)
        except OSError as exc:
            raise EOFError(str(exc)) from exc
        if not data:
            raise EOFError("line closed")
        now = time.monotonic()
        self.rx_done = max(self.rx_done, now) + len(data) * self._byte_time
        return data

    def wait_rx(self) -> None:
        """Let the bytes just read 'arrive' at line speed before the device acts on them."""
        _sleep_until(self.rx_done)

    def write(self, data: bytes) -> None:
        if self._byte_time:
            self._tx_free = max(self._tx_free, time.monotonic()) + len(data) * self._byte_time
            _sleep_until(self._tx_free)
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            view = view[written:]

    def drain_input(self) -> None:
        while self.read(0):
            pass

    def close(self) -> None:
        for fd in (self.fd, self._keep_open):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def open_pty() -> tuple[int, str, int]:
    """A pseudo-terminal in raw mode; the emulator keeps its own handle on the slave end.

    Holding the slave open means the host may open and close the port as often
    as it likes without the master seeing a hang-up, just as a UART does not
    notice whether anyone listens.
    """
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    return master, os.ttyname(slave), slave


class Emulator:
    """The serve loop: frames in, faults applied, replies out (with a retransmit cache)."""

    def __init__(self, line: Line, boards: Boards, faults: Faults, *, stall_seconds: float, boot_seconds: float,
                 verbose: bool) -> None:
        self.line = line
        self.boards = boards
        self.faults = faults
        self.stall_seconds = stall_seconds
        self.boot_seconds = boot_seconds
        self.verbose = verbose
        self.deframer = Deframer()
        self._cache: tuple[int, int, bytes] | None = None

    @property
    def device(self) -> Device:
        return self.boards.current

    def serve(self) -> None:
        while True:
            data = self.line.read()
            for event in self.deframer.feed(data):
                self.line.wait_rx()
                if isinstance(event, FrameError):
                    self._log(f"frame error {event.code}")
                    code = ErrorCode.OVERSIZE if event.code == "oversize" else ErrorCode.BAD_FRAME
                    self.line.write(Error(code, 0, event.code).encode(SEQ_UNSOLICITED))
                elif self._on_frame(event):
                    self.deframer.reset()
                    break

    def _on_frame(self, frame: Frame) -> bool:
        """Handle one frame; True if the device reset and pending input must be discarded."""
        options = self.device.options
        if self._cache is not None and self._cache[:2] == (frame.seq, frame.crc) and "cache" not in options.violations:
            self._log(f"retransmit seq={frame.seq}: cached reply")
            self.line.write(self._cache[2])
            return False
        try:
            if frame.version == PROTOCOL_VERSION and frame.type not in REQUESTS:
                raise ProtocolError("unknown-type", f"type 0x{frame.type:02x} is not a request")
            if len(frame.payload) > options.max_payload:
                raise ProtocolError("oversize", "payload exceeds this device's maximum")
            msg = parse_message(frame)
            if frame.seq == SEQ_UNSOLICITED:
                raise ProtocolError("bad-payload", "seq 0 is reserved for the device; request not executed")
        except ProtocolError as exc:
            refusal = Error(ERROR_FOR_PROTOCOL_CODE.get(exc.code, ErrorCode.BAD_PAYLOAD), 0, str(exc)[:200])
            if frame.seq == SEQ_UNSOLICITED:  # never executed, never cached (PROTOCOL.md section 2)
                self.line.write(refusal.encode(SEQ_UNSOLICITED))
            else:
                self._reply(frame, refusal)
            return False
        if isinstance(msg, Hello):
            self.boards.on_hello()
        fault = self.faults.take(msg.TYPE)
        self._log(f"rx {msg.TYPE.name} seq={frame.seq}" + (f" fault={fault}" if fault else ""))
        if fault == "stall":
            self._stall()
        if fault == "badcsr":
            self.device.break_next_csr = True
        if fault == "nak":
            code = ErrorCode.FLASH_WRITE if msg.TYPE in _WRITES else ErrorCode.BUSY
            self._reply(frame, Error(code, 0, "injected fault"))
            return False
        reply = self.device.handle(msg)
        if isinstance(reply, Committed):
            self.boards.on_commit()
        wire = reply.encode(frame.seq)
        self._cache = (frame.seq, frame.crc, wire)
        if fault == "disconnect":
            self._log("disconnecting")
            self.line.close()
            os._exit(EXIT_DISCONNECTED)
        if fault == "reboot":
            self._log("rebooting")
            self._cache = None
            self.device.reboot()
            time.sleep(self.boot_seconds)
            self.line.drain_input()
            return True
        if fault == "drop":
            return False
        if fault == "corrupt":
            wire = _corrupt(wire)
        self.line.write(wire)
        return False

    def _reply(self, frame: Frame, reply: Message) -> None:
        wire = reply.encode(frame.seq)
        self._cache = (frame.seq, frame.crc, wire)
        self.line.write(wire)

    def _stall(self) -> None:
        if self.stall_seconds > 0:
            time.sleep(self.stall_seconds)
            return
        while True:  # hung firmware: only a power cycle (killing the process) helps
            with contextlib.suppress(EOFError):
                self.line.read(1.0)

    def _log(self, text: str) -> None:
        if self.verbose:
            print(f"[{self.device.identity.hardware_id}] {text}", file=sys.stderr, flush=True)


def _corrupt(wire: bytes) -> bytes:
    data = bytearray(wire)
    index = len(data) // 2
    flipped = data[index] ^ 0x55
    data[index] = flipped if flipped else data[index] ^ 0xAA
    return bytes(data)


class Boards:
    """The board(s) on this port: one, or a fixture fed ``count`` boards in turn."""

    def __init__(self, state: Path, hardware_id: str | None, model: str, firmware: str, options: Options,
                 count: int) -> None:
        self._state = state
        self._hardware_id = hardware_id
        self._model = model
        self._firmware = firmware
        self._options = options
        self._count = count
        self._index = 0
        self._swap = False
        self.current = self._board(0)

    def _board(self, index: int) -> Device:
        root = self._state if self._count <= 1 else self._state / f"board-{index + 1:05d}"
        flash = Flash(root)
        hardware_id = self._hardware_id
        if self._count > 1:
            hardware_id = f"{hardware_id or 'EMU'}-{index + 1:05d}"
        return Device(flash, load_identity(flash, hardware_id, self._model, self._firmware), self._options)

    def on_commit(self) -> None:
        self._swap = self._count > 1 and self._index + 1 < self._count

    def on_hello(self) -> None:
        if self._swap:
            self._swap = False
            self._index += 1
            self.current = self._board(self._index)


def _key_types(text: str) -> KeyTypes:
    flags = KeyTypes(0)
    for name in filter(None, (n.strip() for n in text.split(","))):
        try:
            flags |= KeyType.from_profile_name(name).flag
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown key type {name!r}; use p256, p384, ed25519") from None
    if not flags:
        raise argparse.ArgumentTypeError("at least one key type is needed")
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_tools.emulator",
        description="Emulated device for the iotauth provisioning protocol.",
        epilog="fault kinds: " + "; ".join(f"{k}: {v}" for k, v in FAULT_KINDS.items()),
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true", help="open a pseudo-terminal; print its path first on stdout")
    where.add_argument("--port", metavar="DEV", help="attach to an existing serial device")
    parser.add_argument("--state", required=True, type=Path, metavar="DIR", help="flash directory (kept across runs)")
    parser.add_argument("--hardware-id", help="hardware id on first start (default: random EMU-XXXXXXXX)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--firmware", default=DEFAULT_FIRMWARE)
    parser.add_argument("--baud", type=int, default=0, help="emulate this link speed (0: as fast as the pty)")
    parser.add_argument("--keygen-ms", type=float, default=0.0, help="emulated key generation time")
    parser.add_argument("--keygen-command", metavar="CMD",
                        help="make keys and CSRs with this program instead (e.g. the mbedTLS keygen_csr helper): "
                             "it is run as CMD TYPE SUBJECT_CN DIR and writes DIR/key.der and DIR/csr.der")
    parser.add_argument("--no-keygen", action="store_true", help="a device that cannot make keys (host-key mode)")
    parser.add_argument("--no-put-key", action="store_true", help="a device that refuses host-generated keys")
    parser.add_argument("--key-types", type=_key_types, default=KeyTypes.P256 | KeyTypes.P384,
                        help="comma list of p256, p384, ed25519 (default p256,p384)")
    parser.add_argument("--max-payload", type=int, default=MAX_PAYLOAD, help="largest frame payload (64-1024)")
    parser.add_argument("--fault", type=parse_fault, action="append", default=[], metavar="KIND:STEP[:N]")
    parser.add_argument("--violate", action="append", default=[], choices=sorted(VIOLATIONS), metavar="RULE",
                        help="break a protocol rule on purpose, to see a conformance check fail: "
                             + "; ".join(f"{k}: {v}" for k, v in VIOLATIONS.items()))
    parser.add_argument("--stall-ms", type=float, default=0.0, help="length of a stall fault (0: until killed)")
    parser.add_argument("--boot-ms", type=float, default=50.0, help="time a reboot fault keeps the device deaf")
    parser.add_argument("--boards", type=int, default=1, help="boards fed to this fixture in turn (benchmarks)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests to stderr (never key material)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 64 <= args.max_payload <= MAX_PAYLOAD:
        build_parser().error(f"--max-payload must be 64-{MAX_PAYLOAD}")
    capabilities = Capability(0)
    if not args.no_keygen:
        capabilities |= Capability.KEYGEN
    if not args.no_put_key:
        capabilities |= Capability.PUT_KEY
    options = Options(capabilities, args.key_types, args.max_payload, args.keygen_ms / 1000.0,
                      tuple(shlex.split(args.keygen_command)) if args.keygen_command else (),
                      frozenset(args.violate))
    boards = Boards(args.state, args.hardware_id, args.model, args.firmware, options, args.boards)
    if args.pty:
        master, path, slave = open_pty()
        line = Line(master, args.baud, keep_open=slave)
    else:
        import serial

        port = serial.Serial(args.port, baudrate=args.baud or 115200, timeout=0)
        line, path = Line(port.fileno(), args.baud), args.port
    signal.signal(signal.SIGTERM, _terminate)
    print(path, flush=True)
    emulator = Emulator(line, boards, Faults(args.fault), stall_seconds=args.stall_ms / 1000.0,
                        boot_seconds=args.boot_ms / 1000.0, verbose=args.verbose)
    try:
        emulator.serve()
    except (EOFError, KeyboardInterrupt):
        return 0
    finally:
        line.close()
    return 0


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
