"""TLS for the simulator: HeyGen's SDK reaches its chat socket only over ``wss://`` on 443.

``@heygen/streaming-avatar`` 2.0.16 opens ``wss://<hostname of basePath>/v1/ws/streaming.chat``
whatever scheme and port ``basePath`` has, so a browser app pointed at the simulator needs it
on TLS port 443 of the same host. :func:`server_context` makes the server side: a certificate
and key from files, or a self-signed certificate made at start for the names given (browsers
then need ``--ignore-certificate-errors`` or the certificate added to their trust store).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SELF_SIGNED_DAYS = 30


def self_signed(names: Iterable[str]) -> tuple[bytes, bytes]:
    """A self-signed certificate valid for ``names`` (DNS names or IP addresses) and
    ``localhost``/``127.0.0.1``, for :data:`SELF_SIGNED_DAYS`; (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in (*names, "localhost", "127.0.0.1"):
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "avatar-gateway sim")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # An hour back: clocks of the machines that check it may lag.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def server_context(cert_file: str = "", key_file: str = "",
                   names: Iterable[str] = ()) -> ssl.SSLContext:
    """A server-side TLS context: from ``cert_file`` (PEM, may hold the chain) and
    ``key_file`` (empty: the key is in ``cert_file``), or self-signed for ``names``.

    :raises OSError: a file cannot be read.
    :raises ssl.SSLError: the files do not hold a matching certificate and key.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
        return context
    certificate, key = self_signed(names)
    # The ssl module loads certificates from files only; the key lives on disk for an instant.
    with tempfile.TemporaryDirectory(prefix="avatar-gateway-sim-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(certificate)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        context.load_cert_chain(cert_path, key_path)
    return context
