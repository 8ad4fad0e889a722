"""One simulated kubeadm control-plane node with kleidi installed, for the day-two playbooks' tests.

molecule/default's prepare.yml lays the node down (PKI, admin.conf, an aescbc EncryptionConfiguration, the
kube-apiserver manifest) and starts its node agent, which runs the apiserver stand-in; then playbooks/site.yml
installs kleidi on it exactly as on the molecule nodes: SoftHSM2 token and KEK, the plugin's static pod run by the
agent, the apiserver wired and waited for. Each node gets a state root and a loopback address of its own, so it
shares nothing with molecule's nodes or another test's."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kleidi.client import KmsClient
from tests.ansible_run import PlayResult, local_inventory, run_playbook
from tests.plugin import REPO

SCENARIO = REPO / "molecule" / "default"
GROUP_VARS = REPO / "inventories" / "molecule" / "group_vars"
# What a kleidi run may change on a node: every file here is compared byte for byte, with mode and owner.
WATCHED = (
    "/etc/kubernetes/manifests",
    "/etc/kubernetes/encryption",
    "/etc/kubernetes/enc",
    "/etc/kubernetes/patches",
    "/etc/kleidi",
    "/etc/tmpfiles.d",
)

FileState = tuple[bytes, int, int, int]


@dataclass
class LifecycleNode:
    state: Path
    inventory: Path
    address: str
    vars: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.state / "cp-1"

    def path(self, node_path: str) -> Path:
        return self.root / node_path.lstrip("/")

    def run(self, playbook: str, *args: str, **extra_vars: Any) -> PlayResult:
        """One of the project's playbooks, as an operator runs it."""
        return self.run_playbook(REPO / "playbooks" / playbook, *args, **extra_vars)

    def run_playbook(self, playbook: Path, *args: str, **extra_vars: Any) -> PlayResult:
        return run_playbook(playbook, self.inventory, *args, extra_vars=extra_vars or None)

    def files(self) -> dict[str, FileState]:
        """Every file a kleidi run may change, by node path: bytes, mode, owner, group."""
        found = {}
        for top in WATCHED:
            base = self.path(top)
            for path in sorted(base.rglob("*")) if base.exists() else []:
                if path.is_file():
                    info = path.stat()
                    found["/" + str(path.relative_to(self.root))] = (
                        path.read_bytes(),
                        info.st_mode & 0o7777,
                        info.st_uid,
                        info.st_gid,
                    )
        return found

    def config(self, node_path: str) -> Any:
        return yaml.safe_load(self.path(node_path).read_text())

    def kms(self) -> KmsClient:
        """A client on the plugin's socket, where the node's pod binds it."""
        return KmsClient(str(self.path("/run/kleidi/kleidi.sock")), 5.0)

    def pods(self) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, str(SCENARIO / "simnode" / "node_agent.py"), "status", "--state-dir", str(self.agent)],
            capture_output=True,
            text=True,
            check=True,
        )
        status: dict[str, Any] = yaml.safe_load(done.stdout)
        return dict(status.get("pods") or {})

    @property
    def agent(self) -> Path:
        return self.state / "agents" / "cp-1"

    def pkcs11_tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        """pkcs11-tool on the node's token, logged in with the user PIN (given through the environment)."""
        env = {
            **os.environ,
            "SOFTHSM2_CONF": str(self.path("/etc/kleidi/softhsm2.host.conf")),
            "KLEIDI_TEST_PIN": self.vars["kleidi_softhsm_pin"],
        }
        argv = ["pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "kleidi", "--login"]
        done = subprocess.run(
            [*argv, "--pin", "env:KLEIDI_TEST_PIN", *args], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done


@contextmanager
def lifecycle_node(tmp: Path, name: str) -> Iterator[tuple[LifecycleNode, dict[str, FileState]]]:
    """A node with kleidi installed by site.yml, and the files of the node as they were before the install."""
    state = Path(f"/var/tmp/kleidi-{name}-{secrets.token_hex(3)}")
    address = f"127.0.{random.randint(100, 250)}.{random.randint(2, 250)}"
    group_vars: dict[str, Any] = yaml.safe_load((GROUP_VARS / "kube_control_plane.yml").read_text())
    group_vars |= yaml.safe_load((GROUP_VARS / "all" / "simnode.yml").read_text())
    group_vars["simnode_state_root"] = str(state)
    inventory = local_inventory(
        tmp / "hosts.yml",
        {"cp-1": {"kleidi_node_root": str(state / "cp-1"), "kleidi_node_address": address, **group_vars}},
    )
    node = LifecycleNode(state, inventory, address, group_vars)
    try:
        run_playbook(SCENARIO / "prepare.yml", inventory).assert_ok()
        before = node.files()
        node.run("site.yml").assert_ok()
        yield node, before
    finally:
        subprocess.run(
            [sys.executable, str(SCENARIO / "simnode" / "node_agent.py"), "stop", "--state-dir", str(node.agent)],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(state, ignore_errors=True)
