"""Device-behaviour vectors: request sequences with the replies and the resulting state PROTOCOL.md requires.

Written to ``vectors/behaviour.json`` by ``python -m firmware_tools.make_vectors``
and replayed against a real device by ``python -m firmware_tools.conformance``.
Each case names the rule it checks (a section of PROTOCOL.md). The objects
are deterministic (a fixed P-256 key, and certificates signed with RFC 6979
deterministic ECDSA by a fixed test CA), so the file is reproducible; the
test CA's private key is in the file, because the runner signs a certificate
for whatever key a device generates. It is a published test key: never trust it.

Format (byte strings are lower-case hex)::

    {"objects": {NAME: hex, ...}, "ca_key": hex (PKCS#8), "cases": [CASE, ...]}
    CASE  = {"name", "rule", "start": "blank"|"keyed"|"written"|"committed",
             "requires": [CAPABILITY, ...], "steps": [STEP, ...], "state": [STATE BIT NAME, ...]}
    STEP  = {"send": REQUEST, "expect": REPLY} | {"retransmit": true, "expect": REPLY}
    REQUEST = {"type": NAME, FIELD: value, ...}  (fields as in PROTOCOL.md; "data" may be
              {"object": NAME, "from": i, "to": j}), or {"type": NAME, "payload": hex} (sent as is),
              optionally "seq": n and "version": n
    REPLY = {"type": NAME, FIELD: value, ...} or {"error": CODE NAME, "arg": n};
            "sha256": "object:NAME" | "zero"; "identical": true (same bytes as the previous reply)

``start`` is reached from any state with ERASE (then PUT_KEY of ``key_p256``, or
GENERATE_KEY P-256 on a device without PUT_KEY; then PUT_CONFIG and PUT_CERT;
then COMMIT). The object ``cert`` is made by the runner: the bundle of a
certificate for the key the device holds, signed by the test CA.
"""

from __future__ import annotations

import datetime as dt
import struct
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iotauth.provisioning.objects import DeviceConfig, encode_cert_bundle

CA_SCALAR = 0x5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0
KEY_SCALAR = 0x0B0A0D0C0B0A0D0C0B0A0D0C0B0A0D0C0B0A0D0C0B0A0D0C0B0A0D0C0B0A0D0C
OTHER_SCALAR = 0x0102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F20
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DEVICE_ID = "conformance-0001"
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


def ca_key() -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(CA_SCALAR, ec.SECP256R1())


def ca_certificate() -> x509.Certificate:
    key = ca_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iotauth conformance test CA (untrusted)")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(EPOCH).not_valid_after(EPOCH + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256(), ecdsa_deterministic=True))


def device_certificate(public_key: ec.EllipticCurvePublicKey, serial: int = 2) -> x509.Certificate:
    """A leaf for ``public_key`` from the test CA (deterministic for a given key)."""
    issuer = ca_certificate().subject
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID)])
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(serial).not_valid_before(EPOCH).not_valid_after(EPOCH + dt.timedelta(days=365))
            .sign(ca_key(), hashes.SHA256(), ecdsa_deterministic=True))


def cert_bundle(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return encode_cert_bundle([device_certificate(public_key).public_bytes(DER), ca_certificate().public_bytes(DER)])


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _tlv(*records: tuple[int, bytes]) -> bytes:
    return b"".join(struct.pack(">BH", tag, len(value)) + value for tag, value in records)


def objects() -> dict[str, bytes]:
    key = ec.derive_private_key(KEY_SCALAR, ec.SECP256R1())
    other = ec.derive_private_key(OTHER_SCALAR, ec.SECP256R1())
    anchor = ca_certificate().public_bytes(DER)
    good = (1, DEVICE_ID.encode()), (2, b"broker.example"), (3, b"\x22\xb3"), (4, anchor)
    return {
        "key_p256": _pkcs8(key),
        "key_p256_other": _pkcs8(other),
        "key_p384": _pkcs8(ec.derive_private_key(KEY_SCALAR, ec.SECP384R1())),
        "key_sec1": key.private_bytes(DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()),
        "cert_other_key": cert_bundle(other.public_key()),
        "config": DeviceConfig(DEVICE_ID, "broker.example", 8883, (anchor,)).encode(),
        "config_two_anchors_vendor": _tlv(*good, (4, anchor), (0x80, b"vendor"), (0xFF, b"")),
        "config_tag_00": _tlv((0, b"x"), *good),
        "config_tag_05": _tlv(*good, (5, b"x")),
        "config_tag_7f": _tlv(*good, (0x7F, b"x")),
        "config_descending": _tlv(good[1], good[0], good[2], good[3]),
        "config_two_ids": _tlv(good[0], good[0], *good[1:]),
        "config_port_0": _tlv(good[0], good[1], (3, b"\x00\x00"), good[3]),
        "config_bad_id": _tlv((1, b"../etc"), *good[1:]),
        "config_bad_host": _tlv(good[0], (2, b"broker example"), *good[2:]),
        "config_anchor_not_der": _tlv(*good[:3], (4, b"\x30\x03\x02\x01\x00")),
        "config_no_anchor": _tlv(*good[:3]),
    }


# -- cases -------------------------------------------------------------------------------------


def _send(kind: str, expect: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"send": {"type": kind, **fields}, "expect": expect}


def _err(code: str, arg: int | str | None = None) -> dict[str, Any]:
    return {"error": code} if arg is None else {"error": code, "arg": arg}


def _ack(kind: str, received: int, complete: int = 0, sha256: str = "zero") -> dict[str, Any]:
    return {"type": kind, "received": received, "complete": complete, "sha256": sha256}


def _chunk(name: str, start: int, end: int) -> dict[str, Any]:
    return {"object": name, "from": start, "to": end}


def _put(kind: str, name: str, total: int, start: int, end: int, expect: dict[str, Any]) -> dict[str, Any]:
    return _send(kind, expect, total=total, offset=start, data=_chunk(name, start, end))


def _whole(kind: str, name: str, size: int, expect: dict[str, Any]) -> dict[str, Any]:
    return _put(kind, name, size, 0, size, expect)


def _case(name: str, rule: str, start: str, steps: list[dict[str, Any]], state: list[str],
          requires: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"name": name, "rule": rule, "start": start, "requires": list(requires), "steps": steps, "state": state}


KEYED = ["HAS_KEY"]
WRITTEN = ["HAS_KEY", "HAS_CERT", "HAS_CONFIG"]
COMMITTED = [*WRITTEN, "COMMITTED"]
ACK = {"PUT_KEY": "KEY_ACK", "PUT_CERT": "CERT_ACK", "PUT_CONFIG": "CONFIG_ACK"}


def _config_refused(name: str, rule: str, size: int) -> dict[str, Any]:
    return _case(f"CONFIG refused: {name[len('config_'):].replace('_', ' ')}", rule, "keyed",
                 [_whole("PUT_CONFIG", name, size, _err("BAD_PAYLOAD")),
                  _put("PUT_CONFIG", name, size, 1, 2, _err("BAD_OFFSET", 0)),  # the buffer was dropped
                  _send("READ_BACK", {"type": "HASHES", "config": "zero"})], KEYED)


def cases(sizes: dict[str, int]) -> list[dict[str, Any]]:
    """Every case; ``sizes`` are the lengths of the static objects (cases need them for totals)."""
    cfg, key = sizes["config"], sizes["key_p256"]
    three = cfg // 3
    config_done = _ack("CONFIG_ACK", cfg, 1, "object:config")
    out = [
        # -- precedence (section 3.9) --
        _case("BAD_PAYLOAD before LOCKED", "3.9 precedence", "committed",
              [_send("PUT_KEY", _err("BAD_PAYLOAD"), payload="0000000000")], COMMITTED),
        _case("REPLACE at an offset is BAD_PAYLOAD, even when committed", "3.2, 3.9", "committed",
              [_send("GENERATE_KEY", _err("BAD_PAYLOAD"), payload="01010004")], COMMITTED),
        _case("reserved GENERATE_KEY flag is BAD_PAYLOAD", "3", "blank",
              [_send("GENERATE_KEY", _err("BAD_PAYLOAD"), payload="01020000")], []),
        _case("UNSUPPORTED before LOCKED", "3.9 precedence", "committed",
              [_send("GENERATE_KEY", _err("UNSUPPORTED"), key_type=3, replace=False, offset=0)], COMMITTED,
              ("no_ed25519",)),
        _case("LOCKED before TOO_LARGE", "3.9 precedence", "committed",
              [_send("PUT_CERT", _err("LOCKED"), total=65535, offset=0, data="00")], COMMITTED),
        _case("TOO_LARGE before BAD_STATE", "3.9 precedence", "blank",
              [_send("PUT_CERT", _err("TOO_LARGE"), total=65535, offset=0, data="00")], []),
        _case("BAD_STATE before BAD_OFFSET", "3.9 precedence", "blank",
              [_send("PUT_CERT", _err("BAD_STATE"), total=100, offset=10, data="00")], []),
        _case("unknown request type", "1.3", "blank", [_send("HELLO", _err("UNKNOWN_TYPE"), payload="",
                                                              raw_type=0x30)], []),
        _case("a reply type sent as a request", "1.3", "blank",
              [_send("HELLO", _err("UNKNOWN_TYPE"), payload="", raw_type=0x81)], []),
        _case("protocol version 2", "1.3", "blank",
              [_send("HELLO", _err("UNSUPPORTED_VERSION"), payload="", version=2)], []),
        _case("trailing byte after HELLO", "1.3", "blank", [_send("HELLO", _err("BAD_PAYLOAD"), payload="00")], []),
        _case("seq 0 is never executed", "2", "blank",
              [_send("GENERATE_KEY", {**_err("BAD_PAYLOAD"), "seq": 0}, key_type=1, replace=False, offset=0, seq=0)],
              [], ("keygen",)),
        # -- sequence numbers and the retransmit cache (section 2) --
        _case("a retransmit is answered from the cache, not executed", "2", "blank",
              [_send("GENERATE_KEY", {"type": "CSR", "offset": 0}, key_type=1, replace=True, offset=0),
               {"retransmit": True, "expect": {"identical": True}},
               _send("HELLO", {"type": "INFO", "public_key": "csr"})], KEYED, ("keygen",)),
        _case("the same bytes under a new seq are executed again", "2", "keyed",
              [_send("PUT_CONFIG", config_done, total=cfg, offset=0, data=_chunk("config", 0, cfg)),
               _send("PUT_CONFIG", config_done, total=cfg, offset=0, data=_chunk("config", 0, cfg))],
              ["HAS_KEY", "HAS_CONFIG"]),
        # -- GENERATE_KEY (section 3.2) --
        _case("GENERATE_KEY at an offset with no key: nothing generated", "3.2", "blank",
              [_send("GENERATE_KEY", _err("BAD_STATE"), key_type=1, replace=False, offset=5)], [], ("keygen",)),
        _case("GENERATE_KEY without REPLACE returns the stored key's CSR", "3.2", "blank",
              [_send("GENERATE_KEY", {"type": "CSR", "offset": 0}, key_type=1, replace=False, offset=0),
               _send("GENERATE_KEY", {"type": "CSR", "offset": 0, "identical_data": True}, key_type=1,
                     replace=False, offset=0)], KEYED, ("keygen",)),
        _case("GENERATE_KEY past the CSR's end: BAD_OFFSET with arg = CSR length", "3.2", "blank",
              [_send("GENERATE_KEY", {"type": "CSR", "offset": 0}, key_type=1, replace=False, offset=0),
               _send("GENERATE_KEY", {"error": "BAD_OFFSET", "arg": "csr_total"}, key_type=1, replace=False,
                     offset=65535)],
              KEYED, ("keygen",)),
        _case("REPLACE in WRITTEN: new key, certificate dropped, config kept", "3.2, 4", "written",
              [_send("GENERATE_KEY", {"type": "CSR", "offset": 0}, key_type=1, replace=True, offset=0),
               _send("HELLO", {"type": "INFO", "public_key": "csr", "cert_fingerprint": ""})],
              ["HAS_KEY", "HAS_CONFIG"], ("keygen",)),
        _case("a stored key of another type needs REPLACE", "3.2", "keyed",
              [_send("GENERATE_KEY", _err("BAD_STATE"), key_type=2, replace=False, offset=0)], KEYED,
              ("keygen", "p384")),
        _case("GENERATE_KEY after PUT_KEY: a CSR over the written key", "3.2", "blank",
              [_whole("PUT_KEY", "key_p256", key, _ack("KEY_ACK", key, 1, "object:key_p256")),
               _send("GENERATE_KEY", {"type": "CSR", "offset": 0}, key_type=1, replace=False, offset=0),
               _send("HELLO", {"type": "INFO", "public_key": "csr"})], KEYED, ("keygen", "put_key")),
        # -- chunked uploads (section 3.3) --
        _case("an object in three chunks", "3.3", "keyed",
              [_put("PUT_CONFIG", "config", cfg, 0, three, _ack("CONFIG_ACK", three)),
               _put("PUT_CONFIG", "config", cfg, three, 2 * three, _ack("CONFIG_ACK", 2 * three)),
               _put("PUT_CONFIG", "config", cfg, 2 * three, cfg, config_done)], ["HAS_KEY", "HAS_CONFIG"]),
        _case("a repeated chunk (same data) is acknowledged without change", "3.3 rule 2", "keyed",
              [_put("PUT_CONFIG", "config", cfg, 0, three, _ack("CONFIG_ACK", three)),
               _put("PUT_CONFIG", "config", cfg, three, 2 * three, _ack("CONFIG_ACK", 2 * three)),
               _put("PUT_CONFIG", "config", cfg, three, 2 * three, _ack("CONFIG_ACK", 2 * three)),
               _put("PUT_CONFIG", "config", cfg, 2 * three, cfg, config_done)], ["HAS_KEY", "HAS_CONFIG"]),
        _case("a repeated chunk with other data: BAD_OFFSET, the upload continues", "3.3 rule 2", "keyed",
              [_put("PUT_CONFIG", "config", cfg, 0, 2 * three, _ack("CONFIG_ACK", 2 * three)),
               _send("PUT_CONFIG", _err("BAD_OFFSET", 2 * three), total=cfg, offset=three, data="ff" * 4),
               _put("PUT_CONFIG", "config", cfg, 2 * three, cfg, config_done)], ["HAS_KEY", "HAS_CONFIG"]),
        _case("a chunk overlapping the end of what was received: BAD_OFFSET", "3.3 rule 2", "keyed",
              [_put("PUT_CONFIG", "config", cfg, 0, three, _ack("CONFIG_ACK", three)),
               _put("PUT_CONFIG", "config", cfg, three - 1, three + 5, _err("BAD_OFFSET", three)),
               _put("PUT_CONFIG", "config", cfg, three, cfg, config_done)], ["HAS_KEY", "HAS_CONFIG"]),
        _case("a gap: BAD_OFFSET with the bytes received", "3.3 rule 2", "keyed",
              [_put("PUT_CONFIG", "config", cfg, 0, three, _ack("CONFIG_ACK", three)),
               _put("PUT_CONFIG", "config", cfg, 2 * three, cfg, _err("BAD_OFFSET", three))], KEYED),
        _case("total changed mid-upload: BAD_OFFSET 0 and the upload is dropped", "3.3 rule 2", "keyed",
              [_put("PUT_CONFIG", "config", cfg, 0, three, _ack("CONFIG_ACK", three)),
               _send("PUT_CONFIG", _err("BAD_OFFSET", 0), total=cfg + 1, offset=three,
                     data=_chunk("config", three, 2 * three)),
               _put("PUT_CONFIG", "config", cfg, three, 2 * three, _err("BAD_OFFSET", 0))], KEYED),
        _case("offset > 0 with no upload in progress: BAD_OFFSET 0", "3.3 rule 2", "keyed",
              [_put("PUT_CONFIG", "config", cfg, three, 2 * three, _err("BAD_OFFSET", 0))], KEYED),
        _case("offset 0 restarts an upload", "3.3 rule 1", "keyed",
              [_put("PUT_CONFIG", "config", cfg, 0, 2 * three, _ack("CONFIG_ACK", 2 * three)),
               _put("PUT_CONFIG", "config", cfg, 0, three, _ack("CONFIG_ACK", three)),
               _put("PUT_CONFIG", "config", cfg, 2 * three, cfg, _err("BAD_OFFSET", three))], KEYED),
        _case("a chunk past total is BAD_PAYLOAD", "3.3", "keyed",
              [_send("PUT_CONFIG", _err("BAD_PAYLOAD"), payload="0002000000000000")], KEYED),
        _case("an empty chunk is BAD_PAYLOAD", "3.3", "keyed",
              [_send("PUT_CONFIG", _err("BAD_PAYLOAD"), payload="00100000")], KEYED),
        _case("PUT_CONFIG needs no key (any order)", "3.3, 5", "blank",
              [_whole("PUT_CONFIG", "config", cfg, config_done)], ["HAS_CONFIG"]),
        _case("PUT_CERT needs a key", "3.3", "blank",
              [_send("PUT_CERT", _err("BAD_STATE"), total=10, offset=0, data="01")], []),
        _case("a certificate for another key: KEY_MISMATCH, nothing stored", "3.3", "keyed",
              [_whole("PUT_CERT", "cert_other_key", sizes["cert_other_key"], _err("KEY_MISMATCH")),
               _send("READ_BACK", {"type": "HASHES", "cert": "zero", "chain": "zero"})], KEYED),
        _case("config then certificate (the station's order)", "3.3, 5", "keyed",
              [_whole("PUT_CONFIG", "config", cfg, config_done),
               _send("PUT_CERT", {"type": "CERT_ACK", "complete": 1, "sha256": "object:cert"}, total="cert",
                     offset=0, data={"object": "cert"}),
               _send("READ_BACK", {"type": "HASHES", "key": "stored", "config": "object:config",
                                   "chain": "object:cert"})], WRITTEN),
        # -- objects (section 3.3) --
        _config_refused("config_tag_00", "3.3 CONFIG: tag 0x00", sizes["config_tag_00"]),
        _config_refused("config_tag_05", "3.3 CONFIG: reserved tags 0x05-0x7F", sizes["config_tag_05"]),
        _config_refused("config_tag_7f", "3.3 CONFIG: reserved tags 0x05-0x7F", sizes["config_tag_7f"]),
        _config_refused("config_descending", "3.3 CONFIG: non-decreasing tags", sizes["config_descending"]),
        _config_refused("config_two_ids", "3.3 CONFIG: exactly one device id", sizes["config_two_ids"]),
        _config_refused("config_port_0", "3.3 CONFIG: port 1-65535", sizes["config_port_0"]),
        _config_refused("config_bad_id", "3.3 CONFIG: device id alphabet", sizes["config_bad_id"]),
        _config_refused("config_bad_host", "3.3 CONFIG: host alphabet", sizes["config_bad_host"]),
        _config_refused("config_anchor_not_der", "3.3 CONFIG: anchors are certificates",
                        sizes["config_anchor_not_der"]),
        _config_refused("config_no_anchor", "3.3 CONFIG: at least one anchor", sizes["config_no_anchor"]),
        _case("CONFIG with two anchors and vendor tags is accepted", "3.3 CONFIG", "keyed",
              [_whole("PUT_CONFIG", "config_two_anchors_vendor", sizes["config_two_anchors_vendor"],
                      _ack("CONFIG_ACK", sizes["config_two_anchors_vendor"], 1, "object:config_two_anchors_vendor"))],
              ["HAS_KEY", "HAS_CONFIG"]),
        _case("KEY as bare SEC1 is BAD_PAYLOAD", "3.3 KEY", "blank",
              [_whole("PUT_KEY", "key_sec1", sizes["key_sec1"], _err("BAD_PAYLOAD"))], [], ("put_key",)),
        _case("KEY of a type the device lacks is UNSUPPORTED", "3.3 KEY", "blank",
              [_whole("PUT_KEY", "key_p384", sizes["key_p384"], _err("UNSUPPORTED"))], [], ("put_key", "no_p384")),
        _case("PUT_KEY on a device without the capability", "3.3", "blank",
              [_send("PUT_KEY", _err("UNSUPPORTED"), total=key, offset=0, data=_chunk("key_p256", 0, 10))], [],
              ("no_put_key",)),
        _case("writing the stored key again keeps the certificate", "3.3 KEY", "written",
              [_whole("PUT_KEY", "key_p256", key, _ack("KEY_ACK", key, 1, "object:key_p256")),
               _send("READ_BACK", {"type": "HASHES", "chain": "object:cert", "config": "object:config"})],
              WRITTEN, ("put_key",)),
        _case("writing another key drops the certificate, keeps the config", "3.3 KEY", "written",
              [_whole("PUT_KEY", "key_p256_other", sizes["key_p256_other"],
                      _ack("KEY_ACK", sizes["key_p256_other"], 1, "object:key_p256_other")),
               _send("READ_BACK", {"type": "HASHES", "cert": "zero", "chain": "zero", "config": "object:config"})],
              ["HAS_KEY", "HAS_CONFIG"], ("put_key",)),
        # -- READ_BACK, PROVE, COMMIT, ERASE (sections 3.4-3.7) --
        _case("READ_BACK on a blank device: all zero", "3.4", "blank",
              [_send("READ_BACK", {"type": "HASHES", "state": [], "key": "zero", "cert": "zero", "chain": "zero",
                                   "config": "zero"})], []),
        _case("PROVE with no key", "3.5", "blank", [_send("PROVE", _err("BAD_STATE"), nonce="11" * 32)], []),
        _case("PROVE signs with the stored key", "3.5", "keyed",
              [_send("PROVE", {"type": "SIGNATURE", "verifies": True}, nonce="22" * 32)], KEYED),
        _case("COMMIT without config", "3.6", "keyed",
              [_send("COMMIT", _err("BAD_STATE"), fingerprint="00" * 32)], KEYED),
        _case("COMMIT with another fingerprint", "3.6", "written",
              [_send("COMMIT", _err("BAD_STATE"), fingerprint="00" * 32)], WRITTEN),
        _case("COMMIT, again (idempotent), then another fingerprint is LOCKED", "3.6", "written",
              [_send("COMMIT", {"type": "COMMITTED", "fingerprint": "cert"}, fingerprint="cert"),
               _send("COMMIT", {"type": "COMMITTED", "fingerprint": "cert"}, fingerprint="cert"),
               _send("COMMIT", _err("LOCKED"), fingerprint="00" * 32)], COMMITTED),
        _case("committed: writes are LOCKED, reads and PROVE work", "3.6", "committed",
              [_whole("PUT_CONFIG", "config", cfg, _err("LOCKED")),
               _send("PUT_CERT", _err("LOCKED"), total=10, offset=0, data="01"),
               _send("READ_BACK", {"type": "HASHES", "config": "object:config", "chain": "object:cert"}),
               _send("PROVE", {"type": "SIGNATURE", "verifies": True}, nonce="33" * 32)], COMMITTED),
        _case("ERASE with another hardware id", "3.7", "committed",
              [_send("ERASE", _err("CONFIRM_MISMATCH"), hardware_id="not-this-device")], COMMITTED),
        _case("ERASE returns to BLANK", "3.7", "committed",
              [_send("ERASE", {"type": "ERASED"}, hardware_id="self"),
               _send("HELLO", {"type": "INFO", "public_key": "", "cert_fingerprint": ""})], []),
    ]
    return out


def behaviour_vectors() -> dict[str, Any]:
    blobs = objects()
    sizes = {name: len(data) for name, data in blobs.items()}
    return {
        "description": "device-behaviour vectors: see firmware_tools/behaviour.py for the format",
        "ca_key": ca_key().private_bytes(DER, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).hex(),
        "objects": {name: data.hex() for name, data in blobs.items()},
        "cases": cases(sizes),
    }
