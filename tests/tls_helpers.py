"""Throwaway PKI for TLS/mTLS tests: a CA, a server certificate and a client certificate.

    pki = make_pki(tmp_path / "pki")               # pki.ca, pki.cert/.key (server), pki.client_cert/.client_key
    Broker(dir, tls=pki, require_certificate=True)  # Broker reads .ca/.cert/.key, like http_fault_server.TlsFiles

A second ``make_pki`` in another directory is a CA the first one's peers do not trust.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki", "make_pki"]


@dataclass(frozen=True)
class Pki:
    """PEM files: the CA to trust, the server's cert + key, a client cert + key (same CA)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def make_pki(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
             client_name: str = "edge-test-device") -> Pki:
    """Write ca.pem, server.pem/.key for ``hosts`` and client.pem/.key for ``client_name`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edge-runtime test CA {directory.name}")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _leaf(ca_key, ca_name, server_key, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, now,
                   x509.SubjectAlternativeName(names))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _leaf(ca_key, ca_name, client_key, client_name, ExtendedKeyUsageOID.CLIENT_AUTH, now, None)
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key",
              directory / "client.pem", directory / "client.key")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for cert, key, cert_path, key_path in ((server, server_key, pki.cert, pki.key),
                                           (client, client_key, pki.client_cert, pki.client_key)):
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return pki


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: datetime.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, key: ec.EllipticCurvePrivateKey, name: str,
          usage: x509.ObjectIdentifier, now: datetime.datetime,
          san: x509.SubjectAlternativeName | None) -> x509.Certificate:
    builder = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_name, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )
