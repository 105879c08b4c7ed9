"""Reading a device's CSR as real device stacks write it, without accepting anything weaker.

mbedTLS 2.x (and SDKs built on it) encodes the CSR's *outer* ECDSA
``signatureAlgorithm`` with an explicit NULL parameter, where RFC 5758 §3.2
says the parameter MUST be absent (mbedTLS issue #2924). OpenSSL accepts such
a CSR; ``cryptography`` refuses it as malformed DER.

Normalising it is sound: the CSR's signature covers only
``certificationRequestInfo`` (RFC 2986 §4.2), never the outer
AlgorithmIdentifier, so rewriting that identifier changes nothing the
signature vouches for. The signature is then verified as usual, with the
algorithm the identifier names. Only this one deviation is rewritten (an ECDSA
identifier whose parameter is exactly ``NULL``); every other encoding is handed
to ``cryptography`` unchanged and judged by it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from iotauth.errors import CsrRejected

# DER of the ECDSA signature algorithm OIDs (RFC 5758 §3.2) a device may use.
_ECDSA_OIDS = {
    bytes.fromhex("06082a8648ce3d040302"): "ecdsa-with-SHA256",
    bytes.fromhex("06082a8648ce3d040303"): "ecdsa-with-SHA384",
    bytes.fromhex("06082a8648ce3d040304"): "ecdsa-with-SHA512",
}
_NULL = b"\x05\x00"
_SEQUENCE = 0x30
_BIT_STRING = 0x03


@dataclass(frozen=True)
class DeviceCsr:
    """A parsed CSR whose signature verified.

    Attributes:
        csr: the request (re-encoded when normalised).
        normalised: what was rewritten before parsing, for the journal; None if nothing.
    """

    csr: x509.CertificateSigningRequest
    normalised: str | None = None


def load_device_csr(der: bytes) -> DeviceCsr:
    """Parse ``der`` as a PKCS#10 CSR and verify its self-signature (proof of possession).

    Raises:
        CsrRejected: with a message that says what is wrong (not DER, which
            part, or a signature that does not verify).
    """
    fixed, note = _normalise_signature_algorithm(der)
    try:
        csr = x509.load_der_x509_csr(fixed)
    except ValueError as exc:
        raise CsrRejected(f"the CSR is not a valid DER PKCS#10 request ({_parse_detail(exc)})") from None
    try:
        valid = csr.is_signature_valid
    except Exception as exc:  # an unsupported algorithm surfaces here, not at load time
        raise CsrRejected(f"the CSR's signature cannot be checked: {exc}") from None
    if not valid:
        raise CsrRejected("the CSR's signature does not verify with its own public key (no proof of possession)")
    return DeviceCsr(csr, note)


def _parse_detail(exc: ValueError) -> str:
    text = str(exc)
    if "ParseError" in text:  # e.g. "error parsing asn1 value: ParseError { kind: ExtraData, location: [...] }"
        return text.split("ParseError", 1)[1].strip(" {}").replace('"', "")[:160]
    return text[:160]


def _normalise_signature_algorithm(der: bytes) -> tuple[bytes, str | None]:
    """Drop a NULL parameter from an ECDSA outer signatureAlgorithm; anything else is returned unchanged."""
    try:
        tag, body_start, end = _tlv(der, 0)
        if tag != _SEQUENCE or end != len(der):
            return der, None
        _, _, info_end = _tlv(der, body_start)
        alg_tag, alg_start, alg_end = _tlv(der, info_end)
        sig_tag, _, sig_end = _tlv(der, alg_end)
    except ValueError:
        return der, None
    if alg_tag != _SEQUENCE or sig_tag != _BIT_STRING or sig_end != end:
        return der, None
    algorithm = der[alg_start:alg_end]
    for oid, name in _ECDSA_OIDS.items():
        if algorithm == oid + _NULL:
            body = der[body_start:info_end] + _encode(_SEQUENCE, oid) + der[alg_end:sig_end]
            note = f"outer signatureAlgorithm {name} carried a NULL parameter (RFC 5758 section 3.2: absent)"
            return _encode(_SEQUENCE, body), note
    return der, None


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """One DER element at ``pos``: (tag, start of its contents, end of the element)."""
    if pos + 2 > len(data):
        raise ValueError("truncated")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 3 or pos + count > len(data):
            raise ValueError("bad length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated")
    return tag, pos, pos + length


def _encode(tag: int, body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        return bytes([tag, length]) + body
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + body
