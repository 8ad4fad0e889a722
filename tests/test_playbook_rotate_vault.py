"""playbooks/rotate.yml with the kleidi_vault backend against a real OpenBao, on two local node roots.

As tests/test_playbook_rotate.py does for SoftHSM2: site.yml's first play installs kleidi (AppRole credentials per
node), a stand-in for the kubelet runs a real `kleidi serve` per node from the node's kleidi.yaml, and rotate.yml
runs with the admin policy docs/vault.md gives. Without variables it rotates the transit key once and every plugin
serves version 2; given a target version it converges there (two versions up in one run), and a second run with the
same target rotates nothing. Data wrapped under version 1 still unwraps; no secret shows in the output."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.ansible_run import PlayResult, run_playbook
from tests.backends.openbao import OpenBao, shared_dev_server
from tests.kleidi_nodes import bare_kubeadm_node, nodes_inventory
from tests.kubelet import StaticPods
from tests.plugin import REPO
from tests.test_playbook_rotate import said
from tests.test_role_kleidi_vault import Names, admin_policy

pytestmark = pytest.mark.integration

INSTALL = REPO / "tests" / "playbooks" / "kleidi_install.yml"
ROTATE = REPO / "playbooks" / "rotate.yml"
HOSTS = ("cp-1", "cp-2")


@dataclass
class VaultNodes:
    base: Path
    server: OpenBao
    names: Names = field(default_factory=lambda: Names("approle"))
    admin: str = ""
    outputs: list[str] = field(default_factory=list)

    def root(self, host: str) -> Path:
        return self.base / "nodes" / host

    @property
    def roots(self) -> list[Path]:
        return [self.root(host) for host in HOSTS]

    def prepare(self) -> None:
        n = self.names
        policy = admin_policy(n) + f'path "{n.mount}/keys/{n.key}/rotate" {{\n  capabilities = ["update"]\n}}\n'
        self.server.client().sys.create_or_update_policy(f"kleidi-admin-{n.tag}", policy)
        self.admin = self.server.token([f"kleidi-admin-{n.tag}"], ttl="1h")
        for root in self.roots:
            bare_kubeadm_node(root)

    def play(self, playbook: Path, *args: str, **extra: Any) -> PlayResult:
        inventory = nodes_inventory(self.base, {host: {"kleidi_node_root": str(self.root(host))} for host in HOSTS})
        variables = {
            "kleidi_backend_role": "kleidi_vault",
            "kleidi_vault_address": self.server.address,
            "kleidi_vault_admin_token": self.admin,
            "kleidi_plugin_health_timeout": 30,
            **self.names.role_vars(),
        }
        result = run_playbook(playbook, inventory, *args, extra_vars={**variables, **extra})
        self.outputs.append(result.output)
        assert self.admin not in said(result), "the admin token shows in ansible-playbook's output"
        for host in HOSTS:
            for name in ("vault-role-id", "vault-secret-id"):
                path = self.root(host) / "etc/kleidi" / name
                if path.exists():
                    assert path.read_text().strip() not in said(result), f"{name} shows in the output"
        return result

    def latest_version(self) -> int:
        answer = requests.get(
            f"{self.server.address}/v1/{self.names.mount}/keys/{self.names.key}",
            headers={"X-Vault-Token": self.server.root_token},
            timeout=10,
        )
        return int(answer.json()["data"]["latest_version"])


@pytest.fixture(scope="module")
def vault_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VaultNodes, StaticPods]]:
    nodes = VaultNodes(tmp_path_factory.mktemp("rotate-vault"), shared_dev_server())
    nodes.prepare()
    with StaticPods(nodes.base / "pods", nodes.roots, lambda root: {}) as pods:
        nodes.play(INSTALL).assert_ok()
        assert not pods.errors, pods.errors
        yield nodes, pods


def key_ids(nodes: VaultNodes, pods: StaticPods) -> list[str]:
    found = []
    for root in nodes.roots:
        with pods.plugin(root).client() as kms:
            found.append(kms.status().key_id)
    return found


def test_rotate_goes_to_the_next_version_then_to_a_target_and_stays_there(
    vault_nodes: tuple[VaultNodes, StaticPods],
) -> None:
    nodes, pods = vault_nodes
    [first, second] = key_ids(nodes, pods)
    assert first == second and ":v1:" in first
    data_key = secrets.token_bytes(32)
    with pods.plugin(nodes.root("cp-1")).client() as kms:
        wrapped = kms.encrypt(data_key, uid="before-rotation")

    result = nodes.play(ROTATE).assert_ok()
    assert nodes.latest_version() == 2
    [one, two] = key_ids(nodes, pods)
    assert one == two and ":v2:" in one
    assert f"old key_id: {first}" in said(result) and f"new key_id: {one}" in said(result)
    assert "The old KEK is kept: every version stays in Vault." in said(result)
    assert all(starts == 1 for starts in pods.starts.values()), "a Vault rotation restarts no plugin"

    result = nodes.play(ROTATE, kleidi_rotate_target=4).assert_ok()
    assert nodes.latest_version() == 4
    [one, two] = key_ids(nodes, pods)
    assert one == two and ":v4:" in one
    nodes.play(ROTATE, kleidi_rotate_target=4).assert_unchanged()
    assert nodes.latest_version() == 4

    for root in nodes.roots:
        with pods.plugin(root).client() as kms:
            assert kms.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == data_key
    record = json.loads((nodes.base / "inventory/.kleidi-state/rotation.json").read_text())
    assert (record["phase"], record["target"], record["new_key_id"]) == ("done", "4", one)


def test_a_target_below_the_latest_version_is_refused(vault_nodes: tuple[VaultNodes, StaticPods]) -> None:
    nodes, _ = vault_nodes
    result = nodes.play(ROTATE, kleidi_rotate_target=1)
    assert result.returncode != 0
    assert "Vault's key versions only go up" in said(result)
    assert "Nothing was changed" in said(result)
