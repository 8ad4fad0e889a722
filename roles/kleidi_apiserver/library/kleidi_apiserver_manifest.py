#!/usr/bin/python
"""Ansible module: read or change a kube-apiserver static pod manifest as structured YAML (never line edits)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: kleidi_apiserver_manifest
short_description: Give a kube-apiserver static pod the flags and host path mounts that kleidi needs
description:
  - With O(state=inspect), reports the Kubernetes version from the container image, the current value of every
    flag in O(flags) and, for each of O(mounts), whether the apiserver sees that host path at the same path
    (C(mounts_seen), path -> true/false), and changes nothing.
  - With O(state=present), sets each flag (replacing an existing value, never duplicating it) and adds each mount
    whose path the pod does not already see from the same host path. A changed manifest is first copied to
    O(backup_dir)/<stamp>/<its path>, never next to it: the kubelet runs every file in its manifests directory.
  - With O(state=absent), removes each flag named in O(flags) (their values are ignored) and every volume and
    volume mount whose name is one of O(mounts)' names (kleidi's own: C(kleidi-socket), C(kleidi-encryption-config)),
    copying the manifest first. For kleidi_uninstall, once the apiserver no longer needs them. O(patch_path) is not
    used: write the patch again with O(state=present) and what stays, or remove it.
  - With O(patch_path), also writes a kubeadm JSON patch (kube-apiserver0+json.yaml) that appends the same flags and
    kleidi's own mounts, so that C(kubeadm upgrade ... --patches <dir>) keeps them.
options:
  path: {description: Host path of the kube-apiserver manifest., type: path, required: true}
  state: {description: inspect, present or absent., type: str, default: present, choices: [inspect, present, absent]}
  container: {description: Name of the apiserver container., type: str, default: kube-apiserver}
  flags: {description: "Flags without their leading dashes, name: value.", type: dict, default: {}}
  mounts:
    description: Host paths the apiserver must see, each a dict name, path, read_only, type; mounted at the same path.
    type: list
    elements: dict
    default: []
  patch_path: {description: Host path of the kubeadm JSON patch to write., type: path}
  backup_dir: {description: Host directory for backups., type: path}
  stamp: {description: Name of this run's backup directory., type: str}
  root: {description: The node root prefixed to every path (empty on a real node)., type: str, default: ""}
"""

import re

import yaml
from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.kleidi_files import backup_file, read_text, write_file

_VERSION = re.compile(r":v?(\d+)\.(\d+)(?:\.(\d+))?")


def _container(pod, name, path):
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == name:
            return container
    raise ValueError(f"{path} has no container named {name}")


def _flag_index(command, name):
    prefix = f"--{name}="
    for index, arg in enumerate(command):
        if arg == f"--{name}" or arg.startswith(prefix):
            return index
    return None


def flag_values(container, names):
    command = container.get("command") or []
    found = {}
    for name in names:
        index = _flag_index(command, name)
        found[name] = None if index is None else command[index].partition("=")[2]
    return found


def kubernetes_version(container):
    match = _VERSION.search(container.get("image") or "")
    return f"{match.group(1)}.{match.group(2)}" if match else ""


def _sees(pod, container, path):
    """Whether the container already sees host ``path`` at the same path, and any mount that hides it otherwise."""
    volumes = {v.get("name"): v for v in (pod.get("spec") or {}).get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        mount_path = mount.get("mountPath", "").rstrip("/")
        if path != mount_path and not path.startswith(mount_path + "/"):
            continue
        host = ((volumes.get(mount.get("name")) or {}).get("hostPath") or {}).get("path", "").rstrip("/")
        if host + path[len(mount_path) :] == path:
            return True, None
        return False, mount
    return False, None


def apply(pod, container_name, flags, mounts, path):
    """Set flags and add mounts in place; return what was added, for the report."""
    container = _container(pod, container_name, path)
    command = container.setdefault("command", [])
    for name, value in flags.items():
        index = _flag_index(command, name)
        arg = f"--{name}={value}"
        if index is None:
            command.append(arg)
        else:
            command[index] = arg
    spec = pod.setdefault("spec", {})
    for mount in mounts:
        seen, hidden_by = _sees(pod, container, mount["path"])
        if seen:
            continue
        if hidden_by is not None and hidden_by.get("mountPath", "").rstrip("/") == mount["path"].rstrip("/"):
            raise ValueError(
                f"{path} already mounts something else at {mount['path']} (volume {hidden_by.get('name')})"
            )
        container.setdefault("volumeMounts", []).append(
            {
                "name": mount["name"],
                "mountPath": mount["path"],
                **({"readOnly": True} if mount.get("read_only") else {}),
            }
        )
        spec.setdefault("volumes", []).append(
            {"name": mount["name"], "hostPath": {"path": mount["path"], "type": mount.get("type", "DirectoryOrCreate")}}
        )
    return pod


def strip(pod, container_name, flags, names, path):
    """Remove flags (by name) and volumes with their mounts (by volume name) in place."""
    container = _container(pod, container_name, path)
    container["command"] = [
        arg for arg in container.get("command") or [] if arg.lstrip("-").partition("=")[0] not in flags
    ]
    for owner, key in ((container, "volumeMounts"), (pod.get("spec") or {}, "volumes")):
        if key in owner:
            owner[key] = [item for item in owner[key] or [] if item.get("name") not in names]
    return pod


def kubeadm_patch(pod, container_name, flags, mounts, path):
    """A JSON patch that appends kleidi's flags and its own volumes to the manifest kubeadm generates."""
    container = _container(pod, container_name, path)
    index = pod["spec"]["containers"].index(container)
    ours = {m["name"] for m in mounts}
    ops = [
        {"op": "add", "path": f"/spec/containers/{index}/command/-", "value": f"--{n}={v}"} for n, v in flags.items()
    ]
    for mount in container.get("volumeMounts") or []:
        if mount.get("name") in ours:
            ops.append({"op": "add", "path": f"/spec/containers/{index}/volumeMounts/-", "value": mount})
    for volume in pod["spec"].get("volumes") or []:
        if volume.get("name") in ours:
            ops.append({"op": "add", "path": "/spec/volumes/-", "value": volume})
    return ops


def _read_yaml(path):
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "state": {"type": "str", "default": "present", "choices": ["inspect", "present", "absent"]},
            "container": {"type": "str", "default": "kube-apiserver"},
            "flags": {"type": "dict", "default": {}},
            "mounts": {"type": "list", "elements": "dict", "default": []},
            "patch_path": {"type": "path"},
            "backup_dir": {"type": "path"},
            "stamp": {"type": "str"},
            "root": {"type": "str", "default": ""},
        },
        required_if=[("state", "present", ("backup_dir", "stamp")), ("state", "absent", ("backup_dir", "stamp"))],
        supports_check_mode=True,
    )
    params = module.params
    path = params["path"]
    try:
        pod = _read_yaml(path)
        container = _container(pod, params["container"], path)
    except (OSError, ValueError, yaml.YAMLError, AttributeError) as exc:
        module.fail_json(msg=f"cannot read the apiserver manifest: {exc}")
    result = {
        "changed": False,
        "kubernetes_version": kubernetes_version(container),
        "flags": flag_values(container, list(params["flags"])),
        "written": [],
        "manifest_changed": False,
    }
    if params["state"] == "inspect":
        result["mounts_seen"] = {m["path"]: _sees(pod, container, m["path"])[0] for m in params["mounts"]}
        module.exit_json(**result)
    before = yaml.safe_dump(pod, sort_keys=False)
    try:
        if params["state"] == "absent":
            names = {m.get("name") for m in params["mounts"]}
            wanted = strip(_read_yaml(path), params["container"], set(params["flags"]), names, path)
        else:
            wanted = apply(_read_yaml(path), params["container"], params["flags"], params["mounts"], path)
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    after = yaml.safe_dump(wanted, sort_keys=False)
    writes = []
    if wanted != pod:
        writes.append((path, after, before))
    if params["patch_path"] and params["state"] == "present":
        patch = yaml.safe_dump(kubeadm_patch(wanted, params["container"], params["flags"], params["mounts"], path))
        old = read_text(params["patch_path"])
        if old != patch:
            writes.append((params["patch_path"], patch, old or ""))
    result["changed"] = bool(writes)
    result["diff"] = [{"before_header": p, "after_header": p, "before": b, "after": a} for p, a, b in writes]
    result["written"] = []
    if not module.check_mode:
        for target, text, _old in writes:
            saved = backup_file(module, target, params["backup_dir"], params["stamp"], params["root"])
            write_file(module, target, text, mode=0o600)
            result["written"].append({"path": target, "backup": saved})
    result["manifest_changed"] = bool(writes) and writes[0][0] == path
    module.exit_json(**result)


if __name__ == "__main__":
    main()
