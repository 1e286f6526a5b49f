"""App-bundle signatures: the coordinator signs the FAB it runs, a site runs only signed FABs.

Flower 1.42's own check (``flower-supernode --trusted-entities``) cannot be used for a bundle
submitted from a folder: the SuperLink attaches verification records only to apps fetched from
Flower Hub (see ``deploy/README.md``, "Signed apps"). So RadFL signs and checks the bundle itself:

* ``radfl coordinator init`` makes an Ed25519 key pair: ``DIR/state/app-signing.key`` (0600)
  and ``DIR/app-signing.pub``, which every site receives with ``ca.crt``.
* ``radfl coordinator run`` builds the FAB with Flower's own (deterministic) builder, signs
  ``"radfl-app-signature-v1\\n" + sha256(FAB) + "\\n" + signed_at`` and passes the result as the
  run-config key ``app-signature`` (``v1:KEY_ID:SIGNED_AT:BASE64``).
* The site's ClientApp launcher (``client/launcher.py``) hashes the exact FAB bytes it received
  and checks the signature against the site's trusted keys before the bundle is installed; a
  refusal raises :class:`AppSignatureError`, whose message names the reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import pki
from common.errors import RadFLError

#: The run-config key that carries the signature (empty in pyproject: unsigned).
SIGNATURE_KEY = "app-signature"
VERSION = "v1"
_DOMAIN = b"radfl-app-signature-v1\n"
#: The message of every refusal starts with this (the deploy test looks for it).
REFUSAL = "app bundle refused"


class AppSignatureError(RadFLError):
    """A bundle is unsigned, signed by an untrusted key, or changed after it was signed."""

    code = "E-APP-SIGNATURE"
    category = "site refused an app bundle that is not signed by the coordinator"


@dataclass(frozen=True)
class Signature:
    """A parsed ``app-signature`` value."""

    key_id: str
    signed_at: int
    signature: bytes

    def __str__(self) -> str:
        encoded = base64.b64encode(self.signature).decode("ascii")
        return f"{VERSION}:{self.key_id}:{self.signed_at}:{encoded}"


# ----------------------------------------------------------------------------- keys
def make_key_pair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 signing key (PKCS#8 PEM, 0600) and its public key (PEM); return
    the key id. Refuses to overwrite either file."""
    if Path(public_path).exists():
        raise RadFLError(f"{public_path} exists; move it away before making a new signing key")
    key = Ed25519PrivateKey.generate()
    pki.write_private(
        Path(private_path),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    Path(public_path).write_bytes(public_pem(key.public_key()))
    return key_id(key.public_key())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the raw public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
        mode = Path(path).stat().st_mode & 0o777
    except OSError as exc:
        raise pki.KeyFileError(f"app-signing key {path}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        raise pki.KeyFileError(
            f"app-signing key {path} is readable by others (mode {mode:o}); chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise pki.KeyFileError(f"app-signing key {path} is not an unencrypted PEM key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise pki.KeyFileError(f"app-signing key {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise pki.KeyFileError(f"trusted app-signing key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise pki.KeyFileError(
            f"trusted app-signing key {path} is not a PEM public key (the coordinator's "
            "app-signing.pub)"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise pki.KeyFileError(f"trusted app-signing key {path} is not an Ed25519 key")
    return key


# ------------------------------------------------------------------ sign and verify
def fab_sha256(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()


def _message(fab_hash: str, signed_at: int) -> bytes:
    return _DOMAIN + f"{fab_hash}\n{signed_at}".encode("ascii")


def sign(fab: bytes, key: Ed25519PrivateKey, *, signed_at: int | None = None) -> Signature:
    """Sign the SHA-256 of the exact bundle bytes, with the signing time (Unix seconds)."""
    when = int(time.time()) if signed_at is None else signed_at
    return Signature(key_id(key.public_key()), when, key.sign(_message(fab_sha256(fab), when)))


def parse(value: str) -> Signature:
    """Parse an ``app-signature`` value; an empty or malformed one is refused."""
    if not value:
        raise AppSignatureError(
            f"{REFUSAL}: it is unsigned (run-config key {SIGNATURE_KEY} is empty); this site "
            "runs only bundles the coordinator signed (`radfl coordinator run`)"
        )
    parts = value.split(":")
    if len(parts) != 4 or parts[0] != VERSION:
        raise AppSignatureError(
            f"{REFUSAL}: run-config key {SIGNATURE_KEY} is not a {VERSION} signature"
        )
    try:
        return Signature(parts[1], int(parts[2]), base64.b64decode(parts[3], validate=True))
    except (ValueError, binascii.Error) as exc:
        raise AppSignatureError(
            f"{REFUSAL}: run-config key {SIGNATURE_KEY} is not a {VERSION} signature"
        ) from exc


def verify(fab: bytes, value: str, trusted: Sequence[Ed25519PublicKey]) -> Signature:
    """Return the signature when one of the ``trusted`` keys signed exactly ``fab``; raise
    :class:`AppSignatureError` naming the reason otherwise."""
    if not trusted:
        raise AppSignatureError(f"{REFUSAL}: this site trusts no app-signing key")
    signature = parse(value)
    by_id = {key_id(key): key for key in trusted}
    key = by_id.get(signature.key_id)
    if key is None:
        raise AppSignatureError(
            f"{REFUSAL}: signed by key {signature.key_id}, which this site does not trust "
            f"(trusted: {', '.join(sorted(by_id))})"
        )
    digest = fab_sha256(fab)
    try:
        key.verify(signature.signature, _message(digest, signature.signed_at))
    except InvalidSignature as exc:
        raise AppSignatureError(
            f"{REFUSAL}: the signature of key {signature.key_id} does not match this bundle "
            f"(sha256 {digest[:16]}...): it was changed after signing, or the signature is "
            "forged"
        ) from exc
    return signature
