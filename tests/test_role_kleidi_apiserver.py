"""The kleidi_apiserver role against a kubeadm node's files: what it refuses before changing anything, and how it
stops, with its backups named, when the node's apiserver does not come back."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.ansible_run import local_inventory, run_playbook
from tests.plugin import REPO

pytestmark = pytest.mark.integration

PLAYBOOK = REPO / "tests" / "playbooks" / "kleidi_apiserver.yml"
AESCBC_CONFIG = {
    "apiVersion": "apiserver.config.k8s.io/v1",
    "kind": "EncryptionConfiguration",
    "resources": [
        {
            "resources": ["secrets"],
            "providers": [
                {"aescbc": {"keys": [{"name": "key1", "secret": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}]}}
            ],
        }
    ],
}


def kubeadm_node(root: Path, version: str) -> Path:
    """The apiserver manifest and aescbc configuration kubeadm and an operator would have left on a node."""
    manifests = root / "etc/kubernetes/manifests"
    manifests.mkdir(parents=True)
    (root / "etc/kubernetes/encryption").mkdir()
    (root / "etc/kubernetes/encryption/config.yaml").write_text(yaml.safe_dump(AESCBC_CONFIG))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kube-apiserver", "namespace": "kube-system"},
        "spec": {
            "containers": [
                {
                    "name": "kube-apiserver",
                    "image": f"registry.k8s.io/kube-apiserver:{version}",
                    "command": [
                        "kube-apiserver",
                        "--advertise-address=127.0.0.1",
                        "--encryption-provider-config=/etc/kubernetes/encryption/config.yaml",
                    ],
                    "volumeMounts": [{"name": "enc", "mountPath": "/etc/kubernetes/encryption", "readOnly": True}],
                }
            ],
            "volumes": [{"name": "enc", "hostPath": {"path": "/etc/kubernetes/encryption", "type": "Directory"}}],
        },
    }
    manifest = manifests / "kube-apiserver.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    return manifest


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def inventory(tmp_path: Path, root: Path) -> Path:
    # Nothing listens on this port: the apiserver "does not come back".
    host = {"kleidi_node_root": str(root), "kleidi_apiserver_port": 1, "kleidi_apiserver_ready_timeout": 2}
    return local_inventory(tmp_path / "hosts.yml", {"cp-1": host})


def test_kubernetes_older_than_1_29_is_refused_before_anything_changes(tmp_path: Path) -> None:
    root = tmp_path / "node"
    kubeadm_node(root, "v1.28.9")
    before = files(root)
    result = run_playbook(PLAYBOOK, inventory(tmp_path, root))
    assert result.returncode != 0
    assert "runs Kubernetes 1.28" in result.output and "GA from 1.29" in result.output
    assert files(root) == before


def test_an_apiserver_that_does_not_come_back_stops_the_play_with_the_backups_named(tmp_path: Path) -> None:
    root = tmp_path / "node"
    manifest = kubeadm_node(root, "v1.31.4")
    original_manifest = manifest.read_bytes()
    original_config = (root / "etc/kubernetes/encryption/config.yaml").read_bytes()
    result = run_playbook(PLAYBOOK, inventory(tmp_path, root))
    assert result.returncode != 0
    assert "did not\nbecome ready" in result.output or "did not become ready" in " ".join(result.output.split())
    backups = sorted((root / "var/backups/kleidi").rglob("*.yaml"))
    assert {b.name for b in backups} == {"kube-apiserver.yaml", "config.yaml"}
    for backup in backups:
        assert str(backup) in result.output, f"the failure message does not name {backup}"
        original = original_manifest if backup.name == "kube-apiserver.yaml" else original_config
        assert backup.read_bytes() == original
    # The manifests directory holds the manifest only: a backup there would be run by the kubelet.
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["kube-apiserver.yaml"]
    changed = yaml.safe_load(manifest.read_text())["spec"]["containers"][0]["command"]
    assert "--encryption-provider-config-automatic-reload=true" in changed
    assert "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=" not in result.output, "the aescbc key was printed"
