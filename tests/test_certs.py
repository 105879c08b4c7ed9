"""How every layer names a certificate, a key and a moment."""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric import ec

from iotauth.certs import TIMESTAMP_FORMAT, cert_time, public_key_sha256, timestamp


def test_times_sort_as_text_and_certificate_times_have_whole_seconds() -> None:
    moment = datetime(2026, 11, 29, 8, 5, 3, 250, tzinfo=UTC)
    assert timestamp(moment) == "2026-11-29T08:05:03.000250Z"
    assert datetime.strptime(timestamp(moment), TIMESTAMP_FORMAT).replace(tzinfo=UTC) == moment
    assert cert_time(moment) == "2026-11-29T08:05:03Z"
    assert timestamp(moment) < timestamp(moment.replace(second=4))


def test_a_key_is_named_by_its_subject_public_key_info() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    again = ec.EllipticCurvePublicNumbers(key.public_numbers().x, key.public_numbers().y, ec.SECP256R1()).public_key()
    assert public_key_sha256(key) == public_key_sha256(again)
    assert len(public_key_sha256(key)) == 64
