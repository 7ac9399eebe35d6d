"""hydra-certs: TLS certificates for the coordinator, SuperNode keys for volunteers."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Names every server certificate covers, so one machine can always test it.
LOCAL_HOSTS = ("127.0.0.1", "localhost")
CA_FILES = ("ca.crt", "ca.key")
SERVER_FILES = ("server.pem", "server.key")


def main(argv: list[str] | None = None) -> int:
    """Write the files a command asks for; 0 on success, 2 on a refused request."""
    args = parse_args(argv)
    try:
        if args.command == "server":
            written = make_server_certs(
                Path(args.out), args.host, days=args.days, force=args.force
            )
        else:
            written = make_supernode_keys(Path(args.path), force=args.force)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hydra-certs",
        description="Make the TLS certificates of a SuperLink and the key pairs "
        "SuperNodes authenticate with. Example: hydra-certs server certs "
        "--host hydra.example.org && hydra-certs key keys/alice",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser(
        "server",
        help="a CA and a server certificate signed by it",
        description="Write ca.crt, ca.key, server.pem and server.key into OUT. "
        "The server certificate covers 127.0.0.1, localhost and every --host. "
        "Example: hydra-certs server certs --host hydra.example.org",
    )
    server.add_argument("out", help="folder for the four files (created if missing)")
    server.add_argument(
        "--host",
        action="append",
        default=[],
        help="another DNS name or IP address volunteers reach the SuperLink at "
        "(repeatable)",
    )
    server.add_argument(
        "--days", type=int, default=365, help="validity in days (default: 365)"
    )
    server.add_argument(
        "--force", action="store_true", help="overwrite files that exist"
    )

    key = commands.add_parser(
        "key",
        help="a SuperNode's ECDSA P-384 key pair in OpenSSH format",
        description="Write the private key to PATH and the public key to PATH.pub, "
        'like ssh-keygen -t ecdsa -b 384 -N "" -f PATH. '
        "Example: hydra-certs key keys/alice",
    )
    key.add_argument("path", help="where the private key goes")
    key.add_argument("--force", action="store_true", help="overwrite files that exist")
    return parser.parse_args(argv)


def make_server_certs(
    out: Path, hosts: Iterable[str] = (), days: int = 365, force: bool = False
) -> list[Path]:
    """Write a CA and a server certificate for LOCAL_HOSTS plus hosts into out.

    Returns the paths written: ca.crt, ca.key, server.pem, server.key.
    """
    if days <= 0:
        raise ValueError(f"--days must be a positive number of days, got {days}")
    hosts = list(hosts)
    names = subject_alt_names([*LOCAL_HOSTS, *hosts])
    paths = [out / name for name in CA_FILES + SERVER_FILES]
    refuse_overwrite(paths, force)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    # A minute of slack for clocks that run a little behind the coordinator's.
    not_before, not_after = now - timedelta(minutes=1), now + timedelta(days=days)

    # The CA: self-signed, allowed to sign certificates and nothing else.
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "HydraAI CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True, digital_signature=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )

    # The server certificate: every name volunteers may dial, in the SAN.
    server_key = ec.generate_private_key(ec.SECP384R1())
    common_name = hosts[0] if hosts else "localhost"
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    server_cert = (
        _builder(server_name, ca_name, server_key.public_key(), not_before, not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=False, crl_sign=False, digital_signature=True),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    ca_crt, ca_pem_key, server_pem, server_pem_key = paths
    _write(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(ca_pem_key, _pem_private(ca_key), private=True)
    _write(server_pem, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(server_pem_key, _pem_private(server_key), private=True)
    return paths


def make_supernode_keys(path: Path, force: bool = False) -> list[Path]:
    """Write an ECDSA P-384 key pair in OpenSSH format: path and path.pub.

    The same files as `ssh-keygen -t ecdsa -b 384 -N "" -f path`: the private
    key stays on the volunteer's machine, the .pub goes to the coordinator.
    """
    public = path.with_name(path.name + ".pub")
    refuse_overwrite([path, public], force)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_bytes = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(path, private_bytes, private=True)
    _write(public, public_bytes + f" {path.name}\n".encode())
    return [path, public]


def subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """IP address or DNS entries for hosts, in order, without duplicates."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts):
        if not host or "/" in host or (":" in host and not _is_ip(host)):
            raise ValueError(
                f"--host expects a DNS name or an IP address without a port, "
                f"got '{host}'"
            )
        if _is_ip(host):
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        else:
            names.append(x509.DNSName(host))
    return names


def refuse_overwrite(paths: Iterable[Path], force: bool) -> None:
    """Raise FileExistsError naming the files that exist, unless force is set."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"refusing to replace existing {', '.join(existing)}; keep them, or "
            "pass --force to make new ones (then everyone needs the new files)"
        )


def _builder(subject, issuer, public_key, not_before, not_after):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _key_usage(
    key_cert_sign: bool, crl_sign: bool, digital_signature: bool
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write data; a private key is readable by its owner only."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
