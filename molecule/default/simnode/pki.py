#!/usr/bin/env python3
"""The PKI kubeadm leaves on control-plane nodes, for the simulated ones.

    pki.py cluster --dir D
        once per cluster: the CAs (cluster, front-proxy, etcd), the service-account key pair and a random
        32-byte aescbc key, shared by every control-plane node as kubeadm shares them.
    pki.py node --cluster-dir D --node-root R --node-name N --address A
        per node: the shared files copied into R/etc/kubernetes/pki, the node's own apiserver serving
        certificate (SANs: the node address and the kubernetes service names), its client certificates and
        R/etc/kubernetes/admin.conf.

Existing files are kept (so a second run changes nothing). Prints {"changed": ..., "created": [...]} and never
any key material. RSA 2048 like kubeadm's default."""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 365
SERVICE_IP = "10.96.0.1"  # first address of kubeadm's default service CIDR 10.96.0.0/12
CLUSTER_ADMINS = "kubeadm:cluster-admins"
SHARED = (
    "ca.crt",
    "ca.key",
    "front-proxy-ca.crt",
    "front-proxy-ca.key",
    "etcd/ca.crt",
    "etcd/ca.key",
    "sa.key",
    "sa.pub",
)
AESCBC_KEY = "encryption-aescbc.key"


class Pki:
    def __init__(self) -> None:
        self.created: list[str] = []

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        self.created.append(str(path))

    def key(self, path: Path) -> rsa.RSAPrivateKey:
        if not path.exists():
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            )
            self._write(path, pem, 0o600)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        return loaded

    def ca(self, directory: Path, name: str, common_name: str) -> None:
        key = self.key(directory / f"{name}.key")
        cert_path = directory / f"{name}.crt"
        if cert_path.exists():
            return
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, True, False, False, False), critical=True
            )  # digitalSignature, keyEncipherment, keyCertSign
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        self._write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def leaf(
        self,
        directory: Path,
        name: str,
        ca_dir: Path,
        ca_name: str,
        common_name: str,
        organizations: tuple[str, ...] = (),
        server: bool = False,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
    ) -> None:
        key = self.key(directory / f"{name}.key")
        cert_path = directory / f"{name}.crt"
        if cert_path.exists():
            return
        ca_key = serialization.load_pem_private_key((ca_dir / f"{ca_name}.key").read_bytes(), password=None)
        assert isinstance(ca_key, rsa.RSAPrivateKey)
        ca_cert = x509.load_pem_x509_certificate((ca_dir / f"{ca_name}.crt").read_bytes())
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        if dns or ips:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        self._write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def cluster(directory: Path) -> list[str]:
    pki = Pki()
    pki.ca(directory, "ca", "kubernetes")
    pki.ca(directory, "front-proxy-ca", "front-proxy-ca")
    pki.ca(directory / "etcd", "ca", "etcd-ca")
    sa_key = pki.key(directory / "sa.key")
    if not (directory / "sa.pub").exists():
        public = sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        pki._write(directory / "sa.pub", public, 0o644)
    if not (directory / AESCBC_KEY).exists():
        pki._write(directory / AESCBC_KEY, base64.b64encode(secrets.token_bytes(32)) + b"\n", 0o600)
    return pki.created


def node(cluster_dir: Path, node_root: Path, node_name: str, address: str) -> list[str]:
    pki = Pki()
    kubernetes = node_root / "etc/kubernetes"
    pki_dir = kubernetes / "pki"
    for name in SHARED:
        target = pki_dir / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            shutil.copy2(cluster_dir / name, target)
            pki.created.append(str(target))
    service_names = (
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    )
    pki.leaf(
        pki_dir, "apiserver", pki_dir, "ca", "kube-apiserver", server=True,
        dns=(node_name, *service_names), ips=(SERVICE_IP, address),
    )  # fmt: skip
    pki.leaf(pki_dir, "apiserver-kubelet-client", pki_dir, "ca", "kube-apiserver-kubelet-client", (CLUSTER_ADMINS,))
    pki.leaf(pki_dir, "apiserver-etcd-client", pki_dir / "etcd", "ca", "kube-apiserver-etcd-client")
    pki.leaf(pki_dir, "front-proxy-client", pki_dir, "front-proxy-ca", "front-proxy-client")
    admin_conf = kubernetes / "admin.conf"
    if not admin_conf.exists():
        # The admin credential lives only inside admin.conf, as kubeadm writes it.
        scratch = kubernetes / ".admin"
        scratch.mkdir(mode=0o700, exist_ok=True)
        sub = Pki()
        sub.leaf(scratch, "admin", pki_dir, "ca", "kubernetes-admin", (CLUSTER_ADMINS,))
        kubeconfig = admin_kubeconfig(
            address,
            (pki_dir / "ca.crt").read_bytes(),
            (scratch / "admin.crt").read_bytes(),
            (scratch / "admin.key").read_bytes(),
        )
        shutil.rmtree(scratch)
        pki._write(admin_conf, yaml.safe_dump(kubeconfig, sort_keys=False).encode(), 0o600)
    return pki.created


def admin_kubeconfig(address: str, ca: bytes, cert: bytes, key: bytes) -> dict[str, object]:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "cluster": {"certificate-authority-data": b64(ca), "server": f"https://{address}:6443"},
                "name": "kubernetes",
            }
        ],
        "contexts": [
            {"context": {"cluster": "kubernetes", "user": "kubernetes-admin"}, "name": "kubernetes-admin@kubernetes"}
        ],
        "current-context": "kubernetes-admin@kubernetes",
        "preferences": {},
        "users": [
            {"name": "kubernetes-admin", "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("cluster", help="the CAs, service-account keys and aescbc key shared by the cluster")
    one.add_argument("--dir", required=True)
    per_node = sub.add_parser("node", help="one control-plane node's PKI directory and admin.conf")
    per_node.add_argument("--cluster-dir", required=True)
    per_node.add_argument("--node-root", required=True)
    per_node.add_argument("--node-name", required=True)
    per_node.add_argument("--address", required=True)
    args = parser.parse_args(argv)
    os.umask(0o022)
    if args.cmd == "cluster":
        created = cluster(Path(args.dir))
    else:
        created = node(Path(args.cluster_dir), Path(args.node_root), args.node_name, args.address)
    print(json.dumps({"changed": bool(created), "created": created}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
