"""CA keys on a real PKCS#11 token (SoftHSM2): create, adopt, sign, and every failure as one clear line."""

from __future__ import annotations

from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, ObjectClass

from iotauth import hsm
from iotauth.errors import MechanismRefused, PkiError, TokenError, TokenLoginFailed, TokenMissing, TokenObjectMissing
from iotauth.keystore import KeyPlace, create_token_key, open_key
from iotauth.pki import create_hierarchy
from iotauth.pki.signer import TokenKey
from tests.fixtures.softhsm import PIN, SoftHsm

SIGN = ec.ECDSA(hashes.SHA256())


@pytest.fixture
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, softhsm: SoftHsm) -> KeyPlace:
    monkeypatch.setenv("IOTAUTH_PKCS11_PIN", PIN)
    return KeyPlace(tmp_path, softhsm.module)


@pytest.mark.parametrize(("key_type", "curve"), [("p256", "secp256r1"), ("p384", "secp384r1")])
def test_a_key_made_on_the_token_stays_there_and_signs_a_hierarchy(
    softhsm: SoftHsm, place: KeyPlace, key_type: str, curve: str
) -> None:
    root, adopted_root = create_token_key(softhsm.uri("root"), place, key_type)
    issuing, adopted_issuing = create_token_key(softhsm.uri("issuing", module=False), place, key_type)
    assert not adopted_root and not adopted_issuing
    assert isinstance(issuing, TokenKey) and issuing.curve.name == curve
    hierarchy = create_hierarchy("hsm.test", key_type, ["localhost"], root_key=root, issuing_key=issuing)
    ca = hierarchy.ca
    ca.issuing_cert.verify_directly_issued_by(ca.root_cert)
    hierarchy.server_cert.verify_directly_issued_by(ca.issuing_cert)
    hierarchy.ocsp_cert.verify_directly_issued_by(ca.issuing_cert)
    with softhsm.session() as session:
        for label in ("root", "issuing"):
            key = session.get_key(ObjectClass.PRIVATE_KEY, label=label)
            assert key[Attribute.SENSITIVE] is True and key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.NEVER_EXTRACTABLE] is True  # generated on the token, never outside it


def test_an_existing_key_is_adopted_not_replaced(softhsm: SoftHsm, place: KeyPlace) -> None:
    first, _ = create_token_key(softhsm.uri("issuing"), place, "p256")
    again, adopted = create_token_key(softhsm.uri("issuing"), place, "p256")
    assert adopted and again.public_key() == first.public_key()
    with softhsm.session() as session:
        assert len(list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))) == 1


def test_an_exportable_key_is_not_adopted(softhsm: SoftHsm, place: KeyPlace) -> None:
    softhsm.import_key(ec.generate_private_key(ec.SECP256R1()), "loose", extractable=True)
    with pytest.raises(TokenError, match="can be exported from the token"):
        create_token_key(softhsm.uri("loose"), place, "p256")


def test_opening_checks_the_key_against_the_certificate(softhsm: SoftHsm, place: KeyPlace) -> None:
    key, _ = create_token_key(softhsm.uri("issuing"), place, "p256")
    assert open_key(softhsm.uri("issuing"), place, what="issuing CA key", expected=key.public_key()).sign(b"x", SIGN)
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(TokenError, match="does not verify"):
        open_key(softhsm.uri("issuing"), place, what="issuing CA key", expected=stranger)


def test_a_wrong_pin_a_missing_pin_and_a_pin_file(softhsm: SoftHsm, place: KeyPlace, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    other = f"{softhsm.label}-b"  # a token this process has not logged in to yet
    softhsm.init_token(other)
    uri = softhsm.uri("k", label=other)
    monkeypatch.setenv("IOTAUTH_PKCS11_PIN", "999999")
    with pytest.raises(TokenLoginFailed, match=f"wrong PIN for token '{other}'"):
        create_token_key(uri, place, "p256")
    monkeypatch.delenv("IOTAUTH_PKCS11_PIN")
    with pytest.raises(TokenLoginFailed, match="needs its user PIN: set IOTAUTH_PKCS11_PIN or add pin-source"):
        create_token_key(uri, place, "p256")
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o644)
    with pytest.raises(PkiError, match="readable by other users"):
        create_token_key(softhsm.uri("k", label=other, extra=f"?pin-source=file:{pin_file}", module=False),
                         place, "p256")
    pin_file.chmod(0o600)
    key, _ = create_token_key(f"pkcs11:token={other};object=k?pin-source={pin_file}", place, "p256")
    assert key.sign(b"x", SIGN)


def test_a_missing_token_a_missing_object_and_a_missing_module(softhsm: SoftHsm, place: KeyPlace) -> None:
    with pytest.raises(TokenMissing, match=r"no token matches token=absent .*tokens present: '" + softhsm.label):
        open_key(softhsm.uri("k", label="absent"), place, what="issuing CA key")
    with pytest.raises(TokenObjectMissing, match=f"no private key object 'nothing' on token '{softhsm.label}'"):
        open_key(softhsm.uri("nothing"), place, what="issuing CA key")
    with pytest.raises(TokenMissing, match=r"cannot load PKCS#11 module /nonexistent/libp11\.so"):
        open_key("pkcs11:token=t;object=k?module-path=/nonexistent/libp11.so", place, what="issuing CA key")


# The search on the session the reinitialisation ended fails (iotauth then reopens it); python-pkcs11 reports
# that failed search once more from its destructor, as an unraisable exception.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_token_that_refuses_ecdsa(softhsm: SoftHsm, place: KeyPlace, monkeypatch: pytest.MonkeyPatch) -> None:
    create_token_key(softhsm.uri("issuing"), place, "p256")
    strict = softhsm.directory / "strict.conf"  # the same tokens, with CKM_ECDSA switched off in the module
    strict.write_text(softhsm.conf.read_text() + "slots.mechanisms = CKM_EC_KEY_PAIR_GEN,CKM_SHA256\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(strict))
    pkcs11.lib(softhsm.module).reinitialize()  # iotauth's session is now gone: it must open a new one
    with pytest.raises(MechanismRefused, match=r"refuses ECDSA signing \(CKM_ECDSA\)"):
        open_key(softhsm.uri("issuing"), place, what="issuing CA key")


def test_an_rsa_key_on_the_token_is_refused_clearly(softhsm: SoftHsm, place: KeyPlace) -> None:
    with softhsm.session() as session:
        session.generate_keypair(KeyType.RSA, 2048, label="rsa-ca", store=True)
    with pytest.raises(MechanismRefused, match="is a RSA key; CA keys on a token must be EC"):
        open_key(softhsm.uri("rsa-ca"), place, what="issuing CA key")


def test_a_dropped_session_is_reopened(softhsm: SoftHsm, place: KeyPlace) -> None:
    key, _ = create_token_key(softhsm.uri("issuing"), place, "p256")
    (connection,) = [c for c in hsm._CONNECTIONS[softhsm.module].values() if c.token.label == softhsm.label]
    connection.session.close()  # as if the token had dropped it (pulled and put back, daemon restarted)
    assert key.sign(b"still signing", SIGN)
