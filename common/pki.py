"""Certificates and keys of a federation, made with ``cryptography``.

* The coordinator's certificate authority (EC P-384, self-signed) signs the SuperLink's TLS
  certificate, whose subject alternative names list every host name and IP address sites dial.
  Sites trust the federation through the CA certificate alone.
* Each site makes its own EC P-384 key pair (OpenSSH format, as Flower's SuperNode reads it) and
  sends only the public key to the coordinator. Private keys never travel and are written
  readable by their owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import RadFLError

CURVE = ec.SECP384R1()
#: NIST curves Flower accepts for SuperNode authentication.
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
CA_DAYS = 3650
SERVER_DAYS = 825
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class KeyFileError(RadFLError):
    """A key or certificate file is missing, unreadable or of the wrong kind."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed certificate authority for the federation ``name``."""
    key = new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "RadFL federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate signed by the CA, valid for every name and IP in ``hosts``."""
    if not hosts:
        raise RadFLError("the SuperLink certificate needs at least one --host")
    key = new_key()
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def certificate_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*names.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in names.get_values_for_type(x509.IPAddress)
    ]


def site_key_pair() -> tuple[bytes, bytes]:
    """A site's authentication key pair: OpenSSH private key and public key bytes."""
    key = new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def read_site_public_key(path: Path) -> bytes:
    """A site's public key file, checked: OpenSSH format, an EC key on a NIST curve."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"public key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            f"public key {path} is not an OpenSSH public key (make one with `radfl site keygen`)"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise KeyFileError(f"public key {path} is not an EC key on a NIST curve (P-256/384/521)")
    return data.strip() + b"\n"


def check_site_private_key(path: Path) -> None:
    """Raise unless ``path`` holds an OpenSSH EC private key readable by its owner only."""
    try:
        data = Path(path).read_bytes()
        mode = Path(path).stat().st_mode & 0o777
    except OSError as exc:
        raise KeyFileError(f"private key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"private key {path} is not an unencrypted OpenSSH private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"private key {path} is not an EC key")
    if mode & 0o077:
        raise KeyFileError(
            f"private key {path} is readable by others (mode {mode:o}); chmod 600 it"
        )


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable and writable by its owner only (created that way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"certificate {path} cannot be read: {exc}") from exc


def check_site_name(name: str) -> str:
    if not SITE_NAME.match(name):
        raise RadFLError(
            f"site name {name!r} must be lower-case letters, digits and dashes (at most 63)"
        )
    return name


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
