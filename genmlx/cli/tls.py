"""``genmlx tls selfsigned``: a certificate and key for the master's HTTPS (``spec.master.tls``).

The certificate names this machine as clients reach it: its host name, ``NAME.local``,
``localhost``, and every IP address of its interfaces (and any ``--name`` given), so the CLI and
clients on the LAN can check it. It is self-signed: the CLI on this machine trusts it through the
manifest; elsewhere, point ``SSL_CERT_FILE`` (or the client's own setting) at the certificate, or
use a certificate from a real authority instead. Made with ``cryptography`` (EC P-256, SHA-256).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import socket
from pathlib import Path

from genmlx.core.home import genmlx_home
from genmlx.core.mdns import interface_addresses

VALID_DAYS = 825  # the longest validity Apple's platforms accept for a TLS server certificate


def add_tls_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tls", help="the master's HTTPS: make a self-signed certificate")
    actions = p.add_subparsers(required=True, metavar="ACTION")
    selfsigned = actions.add_parser("selfsigned", help="write a certificate and key for spec.master.tls")
    selfsigned.set_defaults(run=cmd_tls_selfsigned)
    selfsigned.add_argument("--name", action="append", default=[], help="another DNS name or IP (repeatable)")
    selfsigned.add_argument("--out", type=Path, help="directory to write into (default: $GENMLX_HOME/tls)")


def cmd_tls_selfsigned(args: argparse.Namespace) -> int:
    out = args.out or genmlx_home() / "tls"
    cert_path, key_path = write_self_signed(out, names_of_this_machine() + args.name)
    print(f"wrote {cert_path} and {key_path} (the key readable by you alone)")
    print("\nIn cluster.yaml:\n")
    print("  master:")
    print("    tls:")
    print(f"      certFile: {cert_path}")
    print(f"      keyFile: {key_path}")
    print(
        "\nThe master reads them when it starts. Clients elsewhere check the master against "
        f"{cert_path.name}: copy it to them (SSL_CERT_FILE, or the client's own CA setting)."
    )
    return 0


def names_of_this_machine() -> list[str]:
    host = socket.gethostname().split(".")[0]
    return [host, f"{host}.local", "localhost", *sorted(interface_addresses())]


def write_self_signed(out: Path, names: list[str]) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` (mode 0600) into ``out`` for ``names``; their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternative_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "cert.pem", out / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    return cert_path, key_path


def alternative_names(names: list[str]) -> list:
    from cryptography import x509

    found: list = []
    for name in dict.fromkeys(names):  # each once, in order
        try:
            found.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            found.append(x509.DNSName(name))
    return found
