"""Proxy mode's TLS material in memory: what the key server's context allows, and what a repr of the client's
files shows."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from kleidi import pki
from kleidi.config import RemoteConfig, ServeRemoteConfig
from kleidi.remote_tls import build_context, load_client

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    pki.init(root, [pki.Request("server", "ks-1", ("127.0.0.1",)), pki.Request("client", "cp-1")])
    return root


def test_the_client_material_repr_never_shows_the_private_key(certs: Path) -> None:
    material = load_client(
        RemoteConfig(
            endpoints=["127.0.0.1:1"],
            ca_cert=str(certs / "ca.pem"),
            client_cert=str(certs / "client-cp-1.pem"),
            client_key=str(certs / "client-cp-1-key.pem"),
        )
    )
    key = (certs / "client-cp-1-key.pem").read_bytes()
    assert material.key == key
    shown = repr(material)
    assert "key=" not in shown and repr(key) not in shown and "PRIVATE KEY" not in shown
    assert "cp-1" in shown  # the rest is still there to read


def test_the_key_server_context_allows_no_renegotiation_and_no_resumption_by_ticket(certs: Path) -> None:
    context, _ = build_context(
        ServeRemoteConfig(
            listen="127.0.0.1:1",
            ca_cert=str(certs / "ca.pem"),
            cert=str(certs / "server-ks-1.pem"),
            key=str(certs / "server-ks-1-key.pem"),
        )
    )
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.options & ssl.OP_NO_TICKET and context.num_tickets == 0
    assert context.verify_mode == ssl.CERT_REQUIRED and context.minimum_version == ssl.TLSVersion.TLSv1_2
