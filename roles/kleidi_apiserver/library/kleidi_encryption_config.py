#!/usr/bin/python
"""Ansible module: put a kms v2 provider first in an EncryptionConfiguration, keeping every existing provider; or,
to remove kleidi safely, move it last (new writes without it, reads still through it), then take it out."""

from __future__ import annotations

DOCUMENTATION = r"""
module: kleidi_encryption_config
short_description: Put kleidi's kms v2 provider first in an apiserver EncryptionConfiguration
description:
  - Reads the configuration at O(path), or the one at O(existing) when O(path) does not exist yet (RKE2 keeps its
    own elsewhere), and writes one where the kms v2 provider comes first for each of O(resources). Every provider
    already there is kept after it, with its keys, so data it wrote stays readable; a resource covered only by a
    wildcard entry gets that entry's providers after kms. C(identity) goes last only where plaintext may exist
    (the resource had no configuration, or its configuration already listed identity).
  - A changed file is first copied to O(backup_dir)/<stamp>/<its path>.
  - With O(state=inspect), reads the configuration at O(path) and changes nothing; returns it with every key
    redacted, a SHA-256 of the whole file (to compare nodes without showing keys), each entry's resources and
    provider order, the kms provider named O(kms_name) (name, endpoint, timeout) and the resources it writes.
  - With O(state=demoted), every entry of the configuration at O(path) that lists the kms provider named O(kms_name)
    gets it last instead: new writes go to the provider after it (the one the resource had before kleidi, or
    C(identity), plaintext, when there was none), while everything stored under kms stays readable. The first step
    of removing kleidi (kleidi_uninstall).
  - With O(state=absent), that kms provider is taken out of every entry (an entry left without a provider gets
    C(identity)). Only once nothing stored needs it any more: what it wrote becomes unreadable.
  - O(state=demoted) and O(state=absent) return C(kms_resources), the resources kms still decrypts, and
    C(identity_only), whether the result encrypts nothing at all.
options:
  path: {description: Host path of the configuration to write (or read)., type: path, required: true}
  state:
    description: present (kms first), inspect, demoted (kms last) or absent.
    type: str
    default: present
    choices: [present, inspect, demoted, absent]
  existing: {description: Host path of a configuration to start from when O(path) does not exist., type: path}
  resources: {description: Resources the kms provider encrypts., type: list, elements: str, default: [secrets]}
  kms_name: {description: The kms provider's name; never rename it once data is written. Required to write., type: str}
  endpoint: {description: "unix:// endpoint of the plugin, as the apiserver sees it. Required to write.", type: str}
  timeout: {description: How long the apiserver waits for the plugin., type: str, default: 3s}
  backup_dir: {description: Host directory for backups. Required to write., type: path}
  stamp: {description: Name of this run's backup directory. Required to write., type: str}
  root: {description: The node root prefixed to every path (empty on a real node)., type: str, default: ""}
"""

import hashlib
import os

import yaml
from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.kleidi_files import backup_file, write_file

KIND = "EncryptionConfiguration"
API_VERSION = "apiserver.config.k8s.io/v1"


def _load(path):
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if data.get("kind") != KIND:
        raise ValueError(f"{path} is not an {KIND} (kind: {data.get('kind')!r})")
    return data


def _covers(pattern, resource):
    """Whether an EncryptionConfiguration resource name (secrets, *.apps, *.*) applies to ``resource``."""
    if pattern in (resource, "*.*"):
        return True
    group = resource.partition(".")[2]  # "" for core resources such as secrets
    return pattern == f"*.{group}"


def merge(existing, resources, kms):
    """The configuration with ``kms`` first for every resource in ``resources``; existing providers follow.

    An entry that lists some of those resources with others is split, so the others keep exactly their providers.
    A resource configured only through a wildcard (*.*, *.<group>) gets an entry of its own ahead of it, with the
    wildcard's providers after kms, since they are what wrote its stored data. A resource never configured gets
    kms and identity at the top."""
    config = {"apiVersion": API_VERSION, "kind": KIND, "resources": []}
    entries = (existing or {}).get("resources") or []
    wanted = list(resources)
    for entry in entries:
        names = list(entry.get("resources") or [])
        ours = [name for name in names if name in wanted]
        providers = [p for p in entry.get("providers") or [] if (p.get("kms") or {}).get("name") != kms["name"]]
        if ours:
            plaintext_possible = any("identity" in p for p in providers)
            config["resources"].append(
                {**entry, "resources": ours, "providers": _with_kms(providers, kms, plaintext_possible)}
            )
            wanted = [name for name in wanted if name not in ours]
        rest = [name for name in names if name not in ours]
        if rest:  # untouched, kleidi's own provider included: data it wrote for them must stay readable
            config["resources"].append({**entry, "resources": rest})
    top = []
    for name in wanted:
        wildcard = next((e for e in entries if any(_covers(p, name) for p in e.get("resources") or [])), None)
        if wildcard is None:  # never encrypted: what etcd holds for it is plaintext, readable through identity
            top.append({"resources": [name], "providers": _with_kms([], kms, plaintext_possible=True)})
            continue
        providers = [p for p in wildcard.get("providers") or [] if (p.get("kms") or {}).get("name") != kms["name"]]
        plaintext_possible = any("identity" in p for p in providers)
        top.append({"resources": [name], "providers": _with_kms(providers, kms, plaintext_possible)})
    config["resources"][:0] = _grouped(top)
    return config


def demote(existing, name):
    """Every entry listing kms provider ``name`` gets it last: new writes go to the provider after it (identity when
    none), and what kms wrote stays readable. Running it twice changes nothing."""
    config = {**existing, "resources": []}
    for entry in existing.get("resources") or []:
        providers = list(entry.get("providers") or [])
        ours = [p for p in providers if _is_kms(p, name)]
        if ours:
            others = [p for p in providers if not _is_kms(p, name)]
            providers = [*(others or [{"identity": {}}]), *ours]
        config["resources"].append({**entry, "providers": providers})
    return config


def remove(existing, name):
    """kms provider ``name`` taken out of every entry; an entry left without a provider reads and writes plaintext."""
    config = {**existing, "resources": []}
    for entry in existing.get("resources") or []:
        providers = list(entry.get("providers") or [])
        if any(_is_kms(p, name) for p in providers):
            providers = [p for p in providers if not _is_kms(p, name)] or [{"identity": {}}]
        config["resources"].append({**entry, "providers": providers})
    return config


def decrypting(config, name):
    """The resources whose entry lists kms provider ``name`` anywhere: it decrypts what it wrote from any place."""
    return [
        resource
        for entry in (config or {}).get("resources") or []
        if any(_is_kms(p, name) for p in entry.get("providers") or [])
        for resource in entry.get("resources") or []
    ]


def identity_only(config):
    """Whether the configuration encrypts nothing: every entry reads and writes plaintext only."""
    return all(e.get("providers") == [{"identity": {}}] for e in (config or {}).get("resources") or [])


def _is_kms(provider, name):
    return ((provider or {}).get("kms") or {}).get("name") == name


def _grouped(entries):
    """Resources that get the same providers share one entry, as an operator would write them."""
    grouped = []
    for entry in entries:
        same = next((g for g in grouped if g["providers"] == entry["providers"]), None)
        if same is None:
            grouped.append({"resources": list(entry["resources"]), "providers": entry["providers"]})
        else:
            same["resources"].extend(entry["resources"])
    return grouped


def _with_kms(providers, kms, plaintext_possible):
    others = [p for p in providers if "identity" not in p]
    return [{"kms": kms}, *others, *([{"identity": {}}] if plaintext_possible else [])]


def summary(config, kms_name):
    """What an operator reads in a configuration: each entry's resources and provider order (kms providers by
    name), the kms provider named ``kms_name`` and the resources whose first provider it is."""
    entries, kms, writes = [], None, []
    for entry in config.get("resources") or []:
        providers = []
        for provider in entry.get("providers") or []:
            kind = next(iter(provider), "")
            settings = provider.get(kind) or {}
            providers.append(f"kms:{settings.get('name', '')}" if kind == "kms" else kind)
            if kind == "kms" and settings.get("name") == kms_name and kms is None:
                kms = {k: settings.get(k, "") for k in ("name", "endpoint", "timeout", "apiVersion")}
        resources = list(entry.get("resources") or [])
        entries.append({"resources": resources, "providers": providers})
        if providers[:1] == [f"kms:{kms_name}"]:
            writes.extend(resources)
    return {"entries": entries, "kms": kms, "kms_resources": writes}


def inspect(module, params):
    path = params["path"]
    if not os.path.exists(path):
        module.exit_json(
            changed=False, path=path, exists=False, sha256="", config={}, entries=[], kms=None, kms_resources=[]
        )
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        config = _load(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        module.fail_json(msg=f"cannot read the encryption configuration: {exc}")
    module.exit_json(
        changed=False,
        path=path,
        exists=True,
        sha256=hashlib.sha256(raw).hexdigest(),
        config=_redacted(config),
        **summary(config, params["kms_name"]),
    )


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "state": {"type": "str", "default": "present", "choices": ["present", "inspect", "demoted", "absent"]},
            "existing": {"type": "path"},
            "resources": {"type": "list", "elements": "str", "default": ["secrets"]},
            "kms_name": {"type": "str"},
            "endpoint": {"type": "str"},
            "timeout": {"type": "str", "default": "3s"},
            "backup_dir": {"type": "path"},
            "stamp": {"type": "str"},
            "root": {"type": "str", "default": ""},
        },
        required_if=[
            ("state", "present", ("kms_name", "endpoint", "backup_dir", "stamp")),
            ("state", "demoted", ("kms_name", "backup_dir", "stamp")),
            ("state", "absent", ("kms_name", "backup_dir", "stamp")),
        ],
        supports_check_mode=True,
    )
    params = module.params
    if params["state"] == "inspect":
        inspect(module, params)
    if params["state"] in ("demoted", "absent"):
        step_back(module, params)
    if not params["endpoint"].startswith("unix:///"):
        module.fail_json(msg="endpoint must be unix:///absolute/path.sock")
    source = params["path"] if os.path.exists(params["path"]) else params["existing"]
    try:
        current = _load(source) if source and os.path.exists(source) else None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        module.fail_json(msg=f"cannot read the existing encryption configuration: {exc}")
    kms = {"apiVersion": "v2", "name": params["kms_name"], "endpoint": params["endpoint"], "timeout": params["timeout"]}
    wanted = merge(current, params["resources"], kms)
    on_disk = _load(params["path"]) if os.path.exists(params["path"]) else None
    result = {"changed": on_disk != wanted, "path": params["path"], "started_from": source, "config": wanted}
    result["written"] = []
    if result["changed"]:
        text = yaml.safe_dump(wanted, sort_keys=False)
        result["diff"] = {
            "before": yaml.safe_dump(on_disk, sort_keys=False) if on_disk else "",
            "after": text,
            "before_header": params["path"],
            "after_header": params["path"],
        }
        if not module.check_mode:
            result["backup"] = backup_file(
                module, params["path"], params["backup_dir"], params["stamp"], params["root"]
            )
            write_file(module, params["path"], text, mode=0o600)
            result["written"] = [{"path": params["path"], "backup": result["backup"]}]
    # The configuration holds the keys of the providers kept (aescbc, secretbox): never return it in clear.
    result["config"] = _redacted(wanted)
    if "diff" in result:
        result["diff"] = {
            **result["diff"],
            "before": _redact_text(result["diff"]["before"]),
            "after": _redact_text(result["diff"]["after"]),
        }
    module.exit_json(**result)


def step_back(module, params):
    """state demoted or absent: kleidi's provider moved last, or taken out, in the configuration at ``path``."""
    path = params["path"]
    try:
        current = _load(path) if os.path.exists(path) else None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        module.fail_json(msg=f"cannot read the encryption configuration: {exc}")
    if current is None:  # no configuration: nothing of kleidi's to move or take out
        module.exit_json(changed=False, path=path, written=[], kms_resources=[], identity_only=True)
    wanted = (demote if params["state"] == "demoted" else remove)(current, params["kms_name"])
    result = {
        "changed": wanted != current,
        "path": path,
        "written": [],
        "kms_resources": decrypting(wanted, params["kms_name"]),
        "identity_only": identity_only(wanted),
    }
    if result["changed"]:
        text = yaml.safe_dump(wanted, sort_keys=False)
        before = yaml.safe_dump(current, sort_keys=False)
        result["diff"] = {
            "before": _redact_text(before),
            "after": _redact_text(text),
            "before_header": path,
            "after_header": path,
        }
        if not module.check_mode:
            saved = backup_file(module, path, params["backup_dir"], params["stamp"], params["root"])
            write_file(module, path, text, mode=0o600)
            result["written"] = [{"path": path, "backup": saved}]
    module.exit_json(**result)


def _redacted(config):
    text = yaml.safe_dump(config, sort_keys=False)
    return yaml.safe_load(_redact_text(text))


def _redact_text(text):
    lines = []
    for line in text.splitlines():
        key, sep, _value = line.partition("secret:")
        lines.append(f"{key}secret: <redacted>" if sep else line)
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


if __name__ == "__main__":
    main()
