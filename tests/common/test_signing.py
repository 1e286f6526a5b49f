"""App-bundle signatures: a site accepts only the exact bundle a trusted key signed."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import pki, signing

FAB = b"PK\x03\x04 a stand-in for the bundle's exact bytes"


def test_a_signed_bundle_verifies_with_the_signers_key_among_the_trusted():
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    value = str(signing.sign(FAB, key, signed_at=1_700_000_000))
    # Rotation: a site may trust the old and the new key at once.
    accepted = signing.verify(FAB, value, [other.public_key(), key.public_key()])
    assert accepted.key_id == signing.key_id(key.public_key())
    assert accepted.signed_at == 1_700_000_000


def test_a_tampered_byte_is_refused():
    key = Ed25519PrivateKey.generate()
    value = str(signing.sign(FAB, key))
    tampered = FAB[:-1] + bytes([FAB[-1] ^ 1])
    with pytest.raises(signing.AppSignatureError, match="does not match this bundle"):
        signing.verify(tampered, value, [key.public_key()])


def test_a_changed_signing_time_is_refused():
    key = Ed25519PrivateKey.generate()
    signature = signing.sign(FAB, key, signed_at=100)
    moved = signing.Signature(signature.key_id, 200, signature.signature)
    with pytest.raises(signing.AppSignatureError, match="does not match this bundle"):
        signing.verify(FAB, str(moved), [key.public_key()])


def test_a_bundle_signed_by_another_key_is_refused_naming_it():
    ours, theirs = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    value = str(signing.sign(FAB, theirs))
    with pytest.raises(signing.AppSignatureError) as refused:
        signing.verify(FAB, value, [ours.public_key()])
    assert str(refused.value).startswith(signing.REFUSAL)
    assert f"signed by key {signing.key_id(theirs.public_key())}, which this site does not " in str(
        refused.value
    )


def test_a_forged_signature_under_a_trusted_key_id_is_refused():
    ours, theirs = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    forged = signing.Signature(
        signing.key_id(ours.public_key()), 5, signing.sign(FAB, theirs, signed_at=5).signature
    )
    with pytest.raises(signing.AppSignatureError, match="does not match this bundle"):
        signing.verify(FAB, str(forged), [ours.public_key()])


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "it is unsigned"),
        ("v0:abc:1:AAAA", "is not a v1 signature"),
        ("v1:abc:soon:AAAA", "is not a v1 signature"),
        ("v1:abc:1:not base64!", "is not a v1 signature"),
    ],
)
def test_a_missing_or_malformed_signature_is_refused(value: str, reason: str):
    key = Ed25519PrivateKey.generate()
    with pytest.raises(signing.AppSignatureError, match=reason):
        signing.verify(FAB, value, [key.public_key()])


def test_a_site_that_trusts_no_key_refuses_everything():
    key = Ed25519PrivateKey.generate()
    with pytest.raises(signing.AppSignatureError, match="trusts no app-signing key"):
        signing.verify(FAB, str(signing.sign(FAB, key)), [])


def test_key_files_private_owner_only_public_checked(tmp_path: Path):
    key_id = signing.make_key_pair(tmp_path / "state/app-signing.key", tmp_path / "app.pub")
    assert (tmp_path / "state/app-signing.key").stat().st_mode & 0o777 == 0o600
    private = signing.load_private_key(tmp_path / "state/app-signing.key")
    public = signing.load_public_key(tmp_path / "app.pub")
    assert signing.key_id(public) == key_id == signing.key_id(private.public_key())
    with pytest.raises(signing.RadFLError, match="exists"):
        signing.make_key_pair(tmp_path / "other.key", tmp_path / "app.pub")
    (tmp_path / "state/app-signing.key").chmod(0o644)
    with pytest.raises(pki.KeyFileError, match="readable by others"):
        signing.load_private_key(tmp_path / "state/app-signing.key")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(pki.KeyFileError, match="junk.pub is not a PEM public key"):
        signing.load_public_key(tmp_path / "junk.pub")
    with pytest.raises(pki.KeyFileError, match="missing.pub"):
        signing.load_public_key(tmp_path / "missing.pub")
