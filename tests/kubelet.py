"""The one thing of a kubelet a test of the Ansible roles on local node roots needs: run the plugin's static pod, and
replace it when its manifest changes.

The kleidi_plugin role writes `<node root>/etc/kubernetes/manifests/kleidi.yaml` with a checksum annotation of
kleidi.yaml, so a changed kleidi.yaml changes the manifest and the kubelet replaces the pod. `StaticPods` watches
each node's manifest and (re)starts a real `kleidi serve` whenever the manifest's content changes, with the node's
own kleidi.yaml: its node paths (pin file, SoftHSM2 config, TPM store) are read under the node root, and it
listens where the node's apiserver would dial it (`<node root>/run/kleidi/kleidi.sock`). What it does not do that a
kubelet does (the container's mounts, user, probes) is molecule/default/simnode's part."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.plugin import KleidiProcess, free_port

MANIFEST = "etc/kubernetes/manifests/kleidi.yaml"
CONFIG = "etc/kleidi/kleidi.yaml"


def node_config(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    """kleidi.yaml as the node's plugin sees it, turned into what a process outside the node's mounts needs."""
    config = dict(config)
    provider = dict(config.get(config["provider"]) or {})
    for key in ("pin_file", "token_file", "role_id_file", "secret_id_file", "ca_cert", "client_cert", "client_key"):
        if str(provider.get(key) or "").startswith("/"):
            provider[key] = f"{root}{provider[key]}"
    auth = provider.get("auth")
    if isinstance(auth, dict):
        provider["auth"] = {
            key: (
                f"{root}{value}" if key.endswith(("_file", "_cert", "_key")) and str(value).startswith("/") else value
            )
            for key, value in auth.items()
        }
    config[config["provider"]] = provider
    config["listen"] = f"unix://{root}{str(config['listen']).removeprefix('unix://')}"
    config["metrics_listen"] = f"127.0.0.1:{free_port()}"
    config["health_interval"] = "1s"
    return config


class StaticPods:
    """A plugin per node root, replaced whenever the node's static pod manifest changes. ``env(root)`` gives the
    process environment for a node (SOFTHSM2_CONF or the TPM store under that node's root)."""

    def __init__(self, workdir: Path, roots: list[Path], env: Callable[[Path], dict[str, str]]) -> None:
        self.workdir, self.roots, self.env = workdir, roots, env
        self.plugins: dict[Path, KleidiProcess] = {}
        self.starts: dict[Path, int] = dict.fromkeys(roots, 0)
        self.errors: list[str] = []
        self._seen: dict[Path, bytes] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StaticPods:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for plugin in self.plugins.values():
            plugin.stop()

    def watched(self, root: Path) -> bytes:
        """What, when it changes, replaces the node's plugin (raises FileNotFoundError while it is not there)."""
        return (root / MANIFEST).read_bytes()

    def node_config(self, root: Path) -> dict[str, Any]:
        """The plugin's config as a process on this host runs it."""
        return node_config(root, yaml.safe_load((root / CONFIG).read_text()))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for root in self.roots:
                try:
                    content = self.watched(root)
                except FileNotFoundError:
                    continue
                if self._seen.get(root) == content:
                    continue
                self._seen[root] = content
                try:
                    self._replace(root)
                except Exception as exc:  # reported by the test that reads errors
                    self.errors.append(f"{root.name}: {exc}")

    def _replace(self, root: Path) -> None:
        with self._lock:
            old = self.plugins.pop(root, None)
            if old is not None:
                old.stop()
            config = self.node_config(root)
            self.starts[root] += 1
            plugin = KleidiProcess(self.workdir / f"{root.name}-{self.starts[root]}", config, env=self.env(root))
            plugin.socket = config["listen"].removeprefix("unix://")
            (root / "run" / "kleidi").mkdir(parents=True, exist_ok=True)
            plugin.start()
            self.plugins[root] = plugin

    def plugin(self, root: Path) -> KleidiProcess:
        with self._lock:
            return self.plugins[root]


def softhsm_env(root: Path) -> dict[str, str]:
    """SoftHSM2 pointed at the host-path config the kleidi_softhsm role writes beside the node's own."""
    return {**os.environ, "SOFTHSM2_CONF": f"{root}/etc/kleidi/softhsm2.host.conf"}
