"""The plugin's pod spec, built as data from the Helm values: the one place the static pod's container is made.

The Helm chart renders the same container from the same values; tests/test_pod_spec.py holds the two together."""

from __future__ import annotations

import posixpath
from typing import Any

POD_NAME = "kleidi"
CONFIG_FILE = "kleidi.yaml"
# kleidi.yaml's directory inside the container. The DaemonSet fills it from a ConfigMap and the static pod from the
# host's configDir; the credential files stay at configDir, so neither mount has to nest inside the other.
CONFIG_MOUNT = "/etc/kleidi-config"
CHECKSUM_ANNOTATION = "kleidi.io/config-checksum"
_PROVIDER_SECTIONS = ("pkcs11", "vault", "remote")


def plugin_config(values: dict[str, Any]) -> dict[str, Any]:
    """kleidi.yaml: the values' `config` with only the section its provider names."""
    config = dict(values["config"])
    for section in _PROVIDER_SECTIONS:
        if section != config["provider"]:
            config.pop(section, None)
    return config


def socket_dir(values: dict[str, Any]) -> str:
    listen = str(values["config"]["listen"])
    return posixpath.dirname(listen.removeprefix("unix://"))


def probe_endpoint(values: dict[str, Any]) -> tuple[str, int] | None:
    """Where the kubelet's probes go: the plugin's HTTP endpoint. With hostNetwork a probe without a host goes to
    the node's address, which a loopback listener never hears, so a loopback host is named."""
    listen = str(values["config"].get("metrics_listen") or "")
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)  # kleidi listens on loopback when the host is empty


def image_ref(values: dict[str, Any], default_tag: str) -> str:
    image = values["image"]
    ref = f"{image['repository']}:{image.get('tag') or default_tag}"
    return f"{ref}@{image['digest']}" if image.get("digest") else ref


def _probe(path: str, endpoint: tuple[str, int], timing: dict[str, Any], host_network: bool) -> dict[str, Any]:
    host, port = endpoint
    get: dict[str, Any] = {"path": path, "port": port, "scheme": "HTTP"}
    # Only with hostNetwork is the listener's address the node's; a wildcard one answers on the node address.
    if host_network and host and host not in ("0.0.0.0", "::"):  # noqa: S104
        get["host"] = host
    return {"httpGet": get, **timing}


def container(values: dict[str, Any], default_tag: str) -> dict[str, Any]:
    """The plugin container: command, env, mounts, probes, resources and security context."""
    mounts = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "credentials", "mountPath": values["configDir"], "readOnly": True},
        {"name": "socket", "mountPath": socket_dir(values)},
    ]
    mounts += [
        {"name": vol["name"], "mountPath": vol["path"], **({"readOnly": True} if vol.get("readOnly") else {})}
        for vol in values.get("hostVolumes") or []
    ]
    spec: dict[str, Any] = {
        "name": POD_NAME,
        "image": image_ref(values, default_tag),
        "imagePullPolicy": values["image"]["pullPolicy"],
        "command": ["kleidi", "serve", "--config", posixpath.join(CONFIG_MOUNT, CONFIG_FILE)],
        "env": [{"name": name, "value": str(value)} for name, value in sorted((values.get("env") or {}).items())],
        "volumeMounts": mounts,
        "resources": values["resources"],
        "securityContext": values["securityContext"],
    }
    if not spec["env"]:
        del spec["env"]
    endpoint = probe_endpoint(values)
    if endpoint is not None:
        host_network = bool(values["hostNetwork"])
        spec["livenessProbe"] = _probe("/livez", endpoint, values["probes"]["liveness"], host_network)
        spec["readinessProbe"] = _probe("/readyz", endpoint, values["probes"]["readiness"], host_network)
    return spec


def volumes(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Host paths behind the container's mounts: configDir holds both kleidi.yaml and the credentials here. The
    socket directory is never removed by anything kleidi ships: a running apiserver keeps its bind mount of the
    directory it saw first."""
    found = [
        {"name": "config", "hostPath": {"path": values["configDir"], "type": "Directory"}},
        {"name": "credentials", "hostPath": {"path": values["configDir"], "type": "Directory"}},
        {"name": "socket", "hostPath": {"path": socket_dir(values), "type": "DirectoryOrCreate"}},
    ]
    found += [
        {"name": vol["name"], "hostPath": {"path": vol["path"], "type": vol.get("type", "Directory")}}
        for vol in values.get("hostVolumes") or []
    ]
    return found


def static_pod(values: dict[str, Any], default_tag: str, config_checksum: str) -> dict[str, Any]:
    """The static pod manifest; the checksum annotation makes the kubelet restart it when kleidi.yaml changes."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": POD_NAME,
            "namespace": "kube-system",
            "labels": {"app.kubernetes.io/name": "kleidi", "component": "kms-plugin", "tier": "control-plane"},
            "annotations": {CHECKSUM_ANNOTATION: config_checksum},
        },
        "spec": {
            "hostNetwork": bool(values["hostNetwork"]),
            # The node's resolver, never cluster DNS, which cannot answer before the apiservers read Secrets.
            "dnsPolicy": "Default",
            "priorityClassName": values["priorityClassName"],
            **({"securityContext": values["podSecurityContext"]} if values.get("podSecurityContext") else {}),
            "containers": [container(values, default_tag)],
            "volumes": volumes(values),
        },
    }


class FilterModule:
    """The kleidi_plugin role's filters: kleidi.yaml, the static pod and the socket directory from the values."""

    def filters(self) -> dict[str, Any]:
        return {
            "kleidi_config_file": plugin_config,
            "kleidi_static_pod": static_pod,
            "kleidi_socket_dir": socket_dir,
        }
