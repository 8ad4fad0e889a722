"""Control-plane node roots as site.yml leaves them, for the day-two playbooks' tests: the kubeadm files of
tests/test_role_kleidi_apiserver.py, wired by the kleidi_apiserver role's own module functions (the same
EncryptionConfiguration and manifest edits the role makes), and a real plugin serving on the node's socket."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from tests.ansible_run import local_inventory
from tests.backends.softhsm import SoftHsm
from tests.plugin import KleidiProcess
from tests.role_modules import apiserver_module
from tests.test_role_kleidi_apiserver import kubeadm_node
from tests.test_role_kleidi_plugin_health import serve

ENDPOINT = "unix:///run/kleidi/kleidi.sock"
CONFIG = "/etc/kubernetes/encryption/config.yaml"


def kms_provider(name: str = "kleidi", endpoint: str = ENDPOINT) -> dict[str, Any]:
    return {"apiVersion": "v2", "name": name, "endpoint": endpoint, "timeout": "3s"}


def wired_node(root: Path, resources: tuple[str, ...] = ("secrets",), version: str = "v1.31.4") -> Path:
    """A kubeadm node (aescbc before kleidi) after site.yml: kms first, the flags and both mounts, and the kleidi
    command where the role installs it (<root>/opt/kleidi/bin/kleidi, here the test's own). Returns the
    EncryptionConfiguration's host path."""
    manifest = kubeadm_node(root, version)
    enc = apiserver_module("kleidi_encryption_config")
    pods = apiserver_module("kleidi_apiserver_manifest")
    config = root / CONFIG.lstrip("/")
    merged = enc.merge(yaml.safe_load(config.read_text()), list(resources), kms_provider())
    config.write_text(yaml.safe_dump(merged, sort_keys=False))
    pod = pods.apply(
        yaml.safe_load(manifest.read_text()),
        "kube-apiserver",
        {"encryption-provider-config": CONFIG, "encryption-provider-config-automatic-reload": "true"},
        [
            {"name": "kleidi-encryption-config", "path": str(Path(CONFIG).parent), "read_only": True},
            {"name": "kleidi-socket", "path": "/run/kleidi"},
        ],
        str(manifest),
    )
    manifest.write_text(yaml.safe_dump(pod, sort_keys=False))
    (root / "run" / "kleidi").mkdir(parents=True, exist_ok=True)
    venv = root / "opt/kleidi/bin"
    venv.mkdir(parents=True)
    (venv / "kleidi").symlink_to(Path(sys.executable).with_name("kleidi"))
    return config


def serve_plugin(stack: ExitStack, root: Path, hsm: SoftHsm) -> KleidiProcess:
    """A real kleidi plugin on <root>/run/kleidi/kleidi.sock (the socket the EncryptionConfiguration names)."""
    return serve(stack, root, hsm)


APISERVER = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "kube-apiserver", "namespace": "kube-system"},
    "spec": {
        "containers": [
            {
                "name": "kube-apiserver",
                "image": "registry.k8s.io/kube-apiserver:v1.31.4",
                "command": ["kube-apiserver", "--advertise-address=127.0.0.1"],
            }
        ]
    },
}


def bare_kubeadm_node(root: Path) -> None:
    """What a kubeadm control-plane node has before kleidi (/etc, the apiserver's manifest), plus the kleidi command
    where the kleidi_plugin role puts its virtualenv: this test's own, so no wheel is built."""
    manifests = root / "etc/kubernetes/manifests"
    manifests.mkdir(parents=True)
    (manifests / "kube-apiserver.yaml").write_text(yaml.safe_dump(APISERVER))
    (root / "opt/kleidi/bin").mkdir(parents=True)
    (root / "opt/kleidi/bin/kleidi").symlink_to(Path(sys.executable).with_name("kleidi"))


def nodes_inventory(base: Path, hosts: dict[str, dict[str, Any]]) -> Path:
    """A local inventory of the nodes, on the system Python as a real node's, plus localhost (the controller)."""
    system = {"ansible_python_interpreter": "/usr/bin/python3"}
    (base / "inventory").mkdir(exist_ok=True)
    inventory = local_inventory(base / "inventory" / "hosts.yml", {h: {**system, **v} for h, v in hosts.items()})
    data = yaml.safe_load(inventory.read_text())
    data["all"]["hosts"] = {"localhost": {"ansible_connection": "local", **system}}
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    return inventory
