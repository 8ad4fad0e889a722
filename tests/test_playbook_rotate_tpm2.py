"""playbooks/rotate.yml with the kleidi_tpm2 backend on one local node root, against a software TPM (swtpm behind
tpm2-abrmd on a private session bus).

site.yml's first play installs kleidi (tests/playbooks/kleidi_install.yml), a stand-in for the kubelet runs a real
`kleidi serve` from the node's kleidi.yaml and replaces it when the static pod's manifest changes. rotate.yml,
without variables, adds a new AES key and a new HMAC key (kleidi-kek-2, kleidi-mac-2) to the TPM token and keeps
the old pair; the plugin serves the new pair and still unwraps what the old one wrapped. A second run with the same
target and site.yml's roles afterwards change nothing. No PIN shows in the output."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ansible_run import PlayResult, run_playbook
from tests.backends.tpm import SoftwareTPM
from tests.kleidi_nodes import bare_kubeadm_node, nodes_inventory
from tests.kubelet import StaticPods
from tests.plugin import REPO
from tests.test_playbook_rotate import said

pytestmark = pytest.mark.integration

INSTALL = REPO / "tests" / "playbooks" / "kleidi_install.yml"
ROTATE = REPO / "playbooks" / "rotate.yml"
PTOOL = REPO / "roles" / "kleidi_tpm2" / "files" / "ptool.py"
PIN = "pin-" + secrets.token_hex(8)
SO_PIN = "so-" + secrets.token_hex(8)
TCTI = "tabrmd:bus_type=session"


class TpmNode:
    def __init__(self, base: Path, tpm: SoftwareTPM) -> None:
        self.base, self.tpm = base, tpm
        self.root = base / "nodes" / "cp-1"
        bare_kubeadm_node(self.root)

    def env(self, root: Path) -> dict[str, str]:
        """What the plugin's container gets from the fact's env, with the store under the node root."""
        return {
            **os.environ,
            "DBUS_SESSION_BUS_ADDRESS": self.tpm.dbus_address,
            "TPM2_PKCS11_STORE": f"{root}/var/lib/kleidi/tpm2",
            "TPM2_PKCS11_TCTI": TCTI,
            "TSS2_LOG": "all+NONE",
        }

    def play(self, playbook: Path, *args: str, **extra: Any) -> PlayResult:
        node = {
            "kleidi_node_root": str(self.root),
            "kleidi_tpm2_tcti": TCTI,
            "kleidi_tpm2_env": {"DBUS_SESSION_BUS_ADDRESS": self.tpm.dbus_address},
        }
        inventory = nodes_inventory(self.base, {"cp-1": node})
        variables = {
            "kleidi_backend_role": "kleidi_tpm2",
            "kleidi_tpm2_pin": PIN,
            "kleidi_tpm2_so_pin": SO_PIN,
            "kleidi_plugin_health_timeout": 60,
        }
        result = run_playbook(playbook, inventory, *args, extra_vars={**variables, **extra})
        for secret in (PIN, SO_PIN):
            assert secret not in said(result), "a PIN shows in ansible-playbook's output"
        return result

    def labels(self) -> list[str]:
        """The labels of the token's objects, as the role's own tpm2_ptool wrapper reads them (no PIN needed)."""
        done = subprocess.run(
            ["/usr/bin/python3", "-c", PTOOL.read_text(), "state", "kleidi-tpm"],
            input="{}",
            env={**self.env(self.root), "TPM2TOOLS_TCTI": TCTI},
            capture_output=True,
            text=True,
            check=True,
        )
        return sorted(json.loads(done.stdout)["labels"])


@pytest.fixture(scope="module")
def tpm_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TpmNode, StaticPods]]:
    with SoftwareTPM() as tpm:
        node = TpmNode(tmp_path_factory.mktemp("rotate-tpm"), tpm)
        with StaticPods(node.base / "pods", [node.root], node.env) as pods:
            node.play(INSTALL).assert_ok()
            assert not pods.errors, pods.errors
            yield node, pods


def test_rotate_adds_a_new_key_pair_and_the_plugin_serves_it(tpm_node: tuple[TpmNode, StaticPods]) -> None:
    node, pods = tpm_node
    with pods.plugin(node.root).client(timeout=10) as kms:
        old_key_id = kms.status().key_id
        data_key = secrets.token_bytes(32)
        wrapped = kms.encrypt(data_key, uid="before-rotation")
    assert old_key_id.startswith("pkcs11:aes-cbc-hmac:kleidi-kek-1+kleidi-mac-1:")

    result = node.play(ROTATE).assert_ok()
    assert node.labels() == ["kleidi-kek-1", "kleidi-kek-2", "kleidi-mac-1", "kleidi-mac-2"]
    with pods.plugin(node.root).client(timeout=10) as kms:
        new_key_id = kms.status().key_id
        assert new_key_id.startswith("pkcs11:aes-cbc-hmac:kleidi-kek-2+kleidi-mac-2:")
        assert kms.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == data_key
    assert f"old key_id: {old_key_id}" in said(result) and f"new key_id: {new_key_id}" in said(result)
    kleidi_yaml = yaml.safe_load((node.root / "etc/kleidi/kleidi.yaml").read_text())["pkcs11"]
    assert (kleidi_yaml["key_label"], kleidi_yaml["hmac_key_label"]) == ("kleidi-kek-2", "kleidi-mac-2")

    node.play(ROTATE, kleidi_rotate_target="kleidi-kek-2").assert_unchanged()
    node.play(INSTALL).assert_unchanged()
    assert node.labels() == ["kleidi-kek-1", "kleidi-kek-2", "kleidi-mac-1", "kleidi-mac-2"]
    assert pods.starts[node.root] == 2, "the plugin was restarted once, for the rotation"
