"""OpenSSL's subject name hash, which names files in hashed certificate and CRL directories.

Erlang's ``ssl_crl_hash_dir`` (RabbitMQ's CRL cache) looks a peer's CRL up as
``<hash of the issuer name>.r0`` (then ``.r1``...), with the same hash as
``openssl x509 -hash`` and ``openssl crl -hash``: ``X509_NAME_hash_ex``, the
first four bytes (little-endian) of the SHA-1 of the name's *canonical*
encoding. Canonical (OpenSSL ``crypto/x509/x_name.c``, ``x509_name_canon`` and
``asn1_string_canon``): every text attribute is converted to UTF-8, ASCII
whitespace is trimmed at both ends and collapsed to one space inside, ASCII
letters are lower-cased, and it is re-encoded as a UTF8String; other value
types are kept as they are; the RDN SETs are concatenated without the outer
SEQUENCE. Tested against the ``openssl`` binary.
"""

from __future__ import annotations

import hashlib

from cryptography import x509

from iotauth.errors import PkiError

_UTF8, _PRINTABLE, _T61, _IA5, _VISIBLE, _UNIVERSAL, _BMP = 0x0C, 0x13, 0x14, 0x16, 0x1A, 0x1C, 0x1E
_TEXT_CODECS = {
    _UTF8: "utf-8",
    _PRINTABLE: "ascii",
    _T61: "latin-1",  # OpenSSL treats T61String as ISO 8859-1
    _IA5: "ascii",
    _VISIBLE: "ascii",
    _UNIVERSAL: "utf-32-be",
    _BMP: "utf-16-be",
}
_ASCII_SPACE = " \t\n\v\f\r"


def openssl_name_hash(name: x509.Name) -> str:
    """The 8 lower-case hex digits ``openssl x509 -hash`` prints for a certificate with this subject."""
    canonical = b"".join(_tlv(0x31, b"".join(sorted(_canonical_entry(entry) for entry in rdn)))
                         for rdn in _rdns(name.public_bytes()))
    return f"{int.from_bytes(hashlib.sha1(canonical).digest()[:4], 'little'):08x}"  # noqa: S324 - OpenSSL's name


def crl_file_name(issuer: x509.Name, index: int = 0) -> str:
    """The file name ``ssl_crl_hash_dir`` (and OpenSSL's ``-CRLfile`` directories) look a CRL up under."""
    return f"{openssl_name_hash(issuer)}.r{index}"


def _canonical_entry(entry: bytes) -> bytes:
    children = _children(entry)
    if len(children) != 2 or children[0][0] != 0x06:
        raise PkiError("a name attribute must be an OID and a value")
    oid, (tag, content) = children
    codec = _TEXT_CODECS.get(tag)
    if codec is None:
        return _tlv(0x30, _tlv(*oid) + _tlv(tag, content))
    try:
        text = content.decode(codec)
    except UnicodeDecodeError as exc:
        raise PkiError(f"name attribute is not valid {codec}: {exc}") from exc
    canon = " ".join(part for part in _split_ascii_space(text) if part)
    lowered = "".join(c.lower() if c.isascii() else c for c in canon)
    return _tlv(0x30, _tlv(*oid) + _tlv(_UTF8, lowered.encode("utf-8")))


def _split_ascii_space(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    for char in text:
        if char in _ASCII_SPACE:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


# -- a minimal DER reader: Name = SEQUENCE OF SET OF SEQUENCE { OID, value } -------------------


def _read(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """One TLV at ``offset``: (tag, content, next offset)."""
    if offset + 2 > len(data):
        raise PkiError("truncated DER in a name")
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or offset + count > len(data):
            raise PkiError("bad DER length in a name")
        length = int.from_bytes(data[offset: offset + count], "big")
        offset += count
    if offset + length > len(data):
        raise PkiError("truncated DER in a name")
    return tag, data[offset: offset + length], offset + length


def _children(content: bytes) -> list[tuple[int, bytes]]:
    found: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(content):
        tag, value, offset = _read(content, offset)
        found.append((tag, value))
    return found


def _rdns(der: bytes) -> list[list[bytes]]:
    tag, body, end = _read(der, 0)
    if tag != 0x30 or end != len(der):
        raise PkiError("a name must be one DER SEQUENCE")
    rdns = []
    for set_tag, set_body in _children(body):
        if set_tag != 0x31:
            raise PkiError("a name's RDN must be a SET")
        rdns.append([entry for entry_tag, entry in _children(set_body) if entry_tag == 0x30])
    return rdns


def _tlv(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + content
