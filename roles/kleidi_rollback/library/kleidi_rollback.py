#!/usr/bin/python
"""Ansible module: put back, on one node, the files a kleidi run changed, from that run's backup directory."""

from __future__ import annotations

DOCUMENTATION = r"""
module: kleidi_rollback
short_description: Restore the files a kleidi run changed and remove the ones it created, on one node
description:
  - Every kleidi role writes files through kleidi_file and its helpers, which copy each file a run changes to
    O(backup_dir)/<stamp>/<its path on the node> (with its mode and owner) and list the files the run created in
    O(backup_dir)/<stamp>/.created. This module reads that directory back.
  - O(state=list) reports the runs found (stamps, oldest first) with their markers, and changes nothing.
  - O(state=plan) works out what rolling back run O(stamp) means on this node, and changes nothing. The files
    restored and removed, the files kept and why, what the apiserver reads before and after (which resources the
    kms provider O(kms_name) decrypts), and the refusals. A KEK change in kleidi.yaml (a rotation) keeps that
    run's kleidi.yaml and the plugin's static pod or unit: data has been written under the new KEK. A rollback
    that would leave the apiserver unable to read kms data is refused (hard after a completed re-encryption, else
    unless O(allow_drop_kms)); so is one that removes the plugin while the apiserver still uses it, and one of a
    run that removed kleidi.
  - O(state=apply) carries out one O(phase) of that plan. C(plugin) restores the plugin's files, C(apiserver)
    restores and removes the apiserver's, C(cleanup) removes the plugin files the run created. Every file it
    replaces or removes is first copied to O(backup_dir)/O(own_stamp), which is marked as the rollback of O(stamp),
    so that the rollback can itself be undone. Refuses to run while the plan has refusals.
  - O(state=mark) records, once the node is back and ready, that O(stamp) was rolled back by O(own_stamp).
  - Never returns a file's content: EncryptionConfigurations hold the keys of aescbc and secretbox providers.
options:
  state: {description: list, plan, apply or mark., type: str, required: true, choices: [list, plan, apply, mark]}
  backup_dir: {description: Host path of the backup directory., type: path, required: true}
  root: {description: The node root prefixed to every path (empty on a real node)., type: str, default: ""}
  stamp: {description: The run to roll back (plan, apply, mark)., type: str}
  own_stamp: {description: This rollback's own run (apply, mark)., type: str}
  phase: {description: What to apply., type: str, choices: [plugin, apiserver, cleanup]}
  kms_name: {description: kleidi's kms provider name in the EncryptionConfiguration., type: str, default: kleidi}
  distribution: {description: kubeadm or rke2., type: str, default: kubeadm, choices: [kubeadm, rke2]}
  apiserver_files:
    description: >-
      Node paths of the apiserver's files (manifest, kubeadm_patch, rke2_dropin, rke2_config, rke2_existing_config).
    type: dict
    default: {}
  plugin_files:
    description: Node paths of the plugin's files (config, manifest, unit).
    type: dict
    default: {}
  allow_drop_kms:
    description: Allow a rollback to a configuration without the kms provider (no re-encryption completed).
    type: bool
    default: false
  reencrypted:
    description: A re-encryption under the kms provider has completed (the controller's state directory says so).
    type: bool
    default: false
"""

import os
import re
import tempfile

import yaml
from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.kleidi_files import CREATED, backup_file, created_files, remove_file

ROLLED_BACK = ".rolled-back"  # in a run's directory: the stamp of the rollback that undid it
ROLLBACK_OF = ".rollback-of"  # in a rollback's own directory: the stamp it rolled back
UNINSTALL = ".uninstall"  # in the directory of the run that removed kleidi (kleidi_uninstall)
MARKERS = (CREATED, ROLLED_BACK, ROLLBACK_OF, UNINSTALL)
STAMP = re.compile(r"^\d{8}T\d{6}Z$")
# What names the KEK in kleidi.yaml: a change to any of these is a rotation.
KEK_FIELDS = {
    "pkcs11": ("module", "token_label", "key_label", "hmac_key_label", "mechanism"),
    "vault": ("address", "namespace", "transit_mount", "key_name"),
}


def _marker(run_dir, name):
    try:
        with open(os.path.join(run_dir, name), encoding="utf-8") as handle:
            return handle.read().strip() or None
    except FileNotFoundError:
        return None


def runs(backup_dir):
    """Every run's backup directory, oldest first, with what its markers say."""
    found = []
    names = sorted(os.listdir(backup_dir)) if os.path.isdir(backup_dir) else []
    for name in names:
        run_dir = os.path.join(backup_dir, name)
        if not STAMP.match(name) or not os.path.isdir(run_dir):
            continue
        found.append(
            {
                "stamp": name,
                "rollback_of": _marker(run_dir, ROLLBACK_OF),
                "rolled_back_by": _marker(run_dir, ROLLED_BACK),
                "uninstall": os.path.exists(os.path.join(run_dir, UNINSTALL)),
            }
        )
    return found


def backed_up(run_dir):
    """Node paths of the files a run copied before changing them (its markers left out)."""
    found = []
    for top, dirs, files in os.walk(run_dir):
        dirs.sort()
        for name in sorted(files):
            if top == run_dir and name in MARKERS:
                continue
            if name.startswith(".kleidi-"):  # a temporary file of an interrupted write
                continue
            found.append("/" + os.path.relpath(os.path.join(top, name), run_dir))
    return found


def _read_yaml(path):
    """A YAML (or JSON) file's data, None when the file is absent or is not YAML."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except (FileNotFoundError, yaml.YAMLError, UnicodeDecodeError):
        return None


def kek(config):
    """What names the KEK in a kleidi.yaml's data (provider and its key fields), None without one."""
    if not isinstance(config, dict) or config.get("provider") not in KEK_FIELDS:
        return None
    provider = config["provider"]
    section = config.get(provider) or {}
    return {"provider": provider, **{field: section.get(field) for field in KEK_FIELDS[provider] if field in section}}


def kms_resources(config, name):
    """Resources whose EncryptionConfiguration entry lists kms provider ``name``, wherever it stands (it decrypts
    what it wrote from any position); [] when there is no such configuration."""
    if not isinstance(config, dict) or config.get("kind") != "EncryptionConfiguration":
        return []
    found = []
    for entry in config.get("resources") or []:
        providers = entry.get("providers") or []
        if any(((p or {}).get("kms") or {}).get("name") == name for p in providers):
            found.extend(entry.get("resources") or [])
    return sorted(set(found))


def _flag(args):
    """The value of the last encryption-provider-config flag in an argument list (the last one counts)."""
    found = None
    for arg in args:
        name, sep, value = str(arg).lstrip("-").partition("=")
        if sep and name == "encryption-provider-config":
            found = value
    return found


def _is_encryption_config(path):
    data = _read_yaml(path)
    return isinstance(data, dict) and data.get("kind") == "EncryptionConfiguration"


def _same(source, target):
    """Whether ``target`` already is ``source``: bytes, mode and owner."""
    try:
        a, b = os.stat(source), os.stat(target)
    except FileNotFoundError:
        return False
    if (a.st_mode, a.st_uid, a.st_gid, a.st_size) != (b.st_mode, b.st_uid, b.st_gid, b.st_size):
        return False
    with open(source, "rb") as one, open(target, "rb") as two:
        return one.read() == two.read()


class Plan:
    """What rolling back one run means on one node, worked out from its backup directory and the files now."""

    def __init__(self, params):
        self.root = params["root"].rstrip("/")
        self.run_dir = os.path.join(params["backup_dir"], params["stamp"])
        self.kms_name = params["kms_name"]
        self.distribution = params["distribution"]
        self.api = {k: v for k, v in (params["apiserver_files"] or {}).items() if v}
        self.plugin = {k: v for k, v in (params["plugin_files"] or {}).items() if v}
        backups = backed_up(self.run_dir)
        created = [p for p in created_files(self.run_dir) if p not in backups]
        self.keep = {}
        self.rotation = self._rotation(backups)
        if self.rotation:
            why = (
                "this run changed the KEK (a rotation): data has been written under the new KEK since, "
                "so it stays in force; roll forward instead"
            )
            for path in (self.plugin.get("config"), self.plugin.get("manifest"), self.plugin.get("unit")):
                if path in backups:
                    self.keep[path] = why
        self.restore = [p for p in backups if p not in self.keep]
        self.remove = [p for p in created if p not in self.keep]
        self._apiserver_states()

    def host(self, path):
        return self.root + path

    def backup(self, path):
        return os.path.join(self.run_dir, path.lstrip("/"))

    def after(self, path):
        """Host path of what ``path`` holds after the rollback: its backup, None (removed), or itself."""
        if path in self.restore:
            return self.backup(path)
        if path in self.remove:
            return None
        return self.host(path)

    def _rotation(self, backups):
        config = self.plugin.get("config")
        if config not in backups:
            return None
        before, now = kek(_read_yaml(self.backup(config))), kek(_read_yaml(self.host(config)))
        if before is None or now is None or before == now:
            return None
        return {"before": before, "after": now}

    def _config_path(self, which):
        """The EncryptionConfiguration the apiserver reads now or after (node path), None without one."""
        pick = self.host if which == "now" else self.after
        if self.distribution == "kubeadm":
            manifest = self.api.get("manifest")
            pod = _read_yaml(pick(manifest)) if manifest and pick(manifest) else None
            args = [
                arg
                for container in ((pod or {}).get("spec") or {}).get("containers") or []
                for arg in (container.get("command") or []) + (container.get("args") or [])
            ]
            return _flag(args)
        dropin = self.api.get("rke2_dropin")
        data = _read_yaml(pick(dropin)) if dropin and pick(dropin) else None
        args = [
            arg for key, value in (data or {}).items() if key.startswith("kube-apiserver-arg") for arg in value or []
        ]
        return _flag(args) or self.api.get("rke2_existing_config")

    def _apiserver_states(self):
        self.config_now, self.config_after = self._config_path("now"), self._config_path("after")
        now_file = self.host(self.config_now) if self.config_now else None
        after_file = self.after(self.config_after) if self.config_after else None
        self.kms_now = kms_resources(_read_yaml(now_file), self.kms_name) if now_file else []
        self.kms_after = kms_resources(_read_yaml(after_file), self.kms_name) if after_file else []
        self.dropped = sorted(set(self.kms_now) - set(self.kms_after))
        named = set(self.api.values()) | {p for p in (self.config_now, self.config_after) if p}
        self.apiserver_paths = set()
        for path in self.restore + self.remove:
            candidates = [self.host(path)] + ([self.backup(path)] if path in self.restore else [])
            if path in named or any(_is_encryption_config(c) for c in candidates):
                self.apiserver_paths.add(path)

    def changes(self, group):
        """(restores, removals) of a group, leaving out restores that are already in place."""
        ours = (
            (lambda p: p in self.apiserver_paths) if group == "apiserver" else (lambda p: p not in self.apiserver_paths)
        )
        restores = [p for p in self.restore if ours(p) and not _same(self.backup(p), self.host(p))]
        removals = [p for p in self.remove if ours(p) and os.path.lexists(self.host(p))]
        return restores, removals

    def expect(self):
        """How the apiserver picks the change up: restart, reload or none."""
        restores, removals = self.changes("apiserver")
        touched = set(restores) | set(removals)
        if not touched:
            return "none"
        if self.distribution == "rke2" or self.api.get("manifest") in touched:
            return "restart"
        return "reload" if self.config_after in touched else "none"

    def refusals(self, allow_drop_kms, reencrypted, uninstall):
        found = []
        if uninstall:
            found.append(
                {
                    "hard": True,
                    "msg": "this run removed kleidi (uninstall.yml); it is not rolled back: run site.yml to install "
                    "kleidi again",
                }
            )
        if self.dropped and reencrypted:
            found.append(
                {
                    "hard": True,
                    "msg": "the apiserver would no longer read the kms provider "
                    f"{self.kms_name!r} for {', '.join(self.dropped)}, and a completed re-encryption has put every "
                    "stored object under it: data is stored under kms now. To stop using kleidi, run "
                    "uninstall.yml, which re-encrypts away from kms before it removes anything",
                }
            )
        elif self.dropped and not allow_drop_kms:
            found.append(
                {
                    "hard": False,
                    "msg": "the apiserver would no longer read the kms provider "
                    f"{self.kms_name!r} for {', '.join(self.dropped)}: whatever it wrote since this run is "
                    "stored under kms and would become unreadable. If no apiserver ever served writes with this "
                    "configuration (the install stopped at this node's wait), set kleidi_rollback_drop_kms=true; "
                    "otherwise run uninstall.yml",
                }
            )
        plugin_gone = [p for p in (self.plugin.get("manifest"), self.plugin.get("unit")) if p in self.remove]
        if plugin_gone and self.kms_after:
            found.append(
                {
                    "hard": True,
                    "msg": f"the plugin ({', '.join(plugin_gone)}) would be removed while the apiserver still reads "
                    f"the kms provider {self.kms_name!r} for {', '.join(self.kms_after)}",
                }
            )
        return found

    def report(self):
        restores_plugin, removals_plugin = self.changes("plugin")
        restores_api, removals_api = self.changes("apiserver")
        return {
            "restore": self.restore,
            "remove": self.remove,
            "keep": [{"path": p, "why": w} for p, w in self.keep.items()],
            "to_change": {
                "plugin": restores_plugin,
                "apiserver": restores_api + removals_api,
                "cleanup": removals_plugin,
            },
            "rotation": self.rotation,
            "config_now": self.config_now,
            "config_after": self.config_after,
            "kms_now": self.kms_now,
            "kms_after": self.kms_after,
            "dropped": self.dropped,
            "expect": self.expect(),
            "wait_for_kms": bool(self.kms_after),
            "plugin_changed": bool(restores_plugin),
            "plugin_manifest_changed": self.plugin.get("manifest") in restores_plugin,
        }


def restore_file(module, source, path, backup_dir, stamp, root):
    """Put the backup ``source`` at ``path`` (bytes, mode, owner), copying what is there first; atomic."""
    saved = backup_file(module, path, backup_dir, stamp, root)
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    info = os.stat(source)
    handle, temp = tempfile.mkstemp(dir=directory, prefix=".kleidi-")
    try:
        with os.fdopen(handle, "wb") as out, open(source, "rb") as src:
            out.write(src.read())
        os.chown(temp, info.st_uid, info.st_gid)
        os.chmod(temp, info.st_mode & 0o7777)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return saved


def _write_marker(run_dir, name, text):
    """Write a marker atomically (its temporary name starts with .kleidi-, which backed_up leaves out)."""
    if _marker(run_dir, name) == text:
        return False
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=run_dir, prefix=".kleidi-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text + "\n")
        os.replace(temp, os.path.join(run_dir, name))
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return True


def main():
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "required": True, "choices": ["list", "plan", "apply", "mark"]},
            "backup_dir": {"type": "path", "required": True},
            "root": {"type": "str", "default": ""},
            "stamp": {"type": "str"},
            "own_stamp": {"type": "str"},
            "phase": {"type": "str", "choices": ["plugin", "apiserver", "cleanup"]},
            "kms_name": {"type": "str", "default": "kleidi"},
            "distribution": {"type": "str", "default": "kubeadm", "choices": ["kubeadm", "rke2"]},
            "apiserver_files": {"type": "dict", "default": {}},
            "plugin_files": {"type": "dict", "default": {}},
            "allow_drop_kms": {"type": "bool", "default": False},
            "reencrypted": {"type": "bool", "default": False},
        },
        required_if=[
            ("state", "plan", ("stamp",)),
            ("state", "apply", ("stamp", "own_stamp", "phase")),
            ("state", "mark", ("stamp", "own_stamp")),
        ],
        supports_check_mode=True,
    )
    params = module.params
    backup_dir = params["backup_dir"]
    found = runs(backup_dir)
    if params["state"] == "list":
        module.exit_json(changed=False, runs=found)
    stamp = params["stamp"]
    run = next((r for r in found if r["stamp"] == stamp), None)
    if run is None:  # this run changed nothing on this node
        module.exit_json(changed=False, stamp=stamp, present=False, refusals=[], written=[])
    own_dir = os.path.join(backup_dir, params["own_stamp"] or "")
    if params["state"] == "mark":
        changed = False
        if not module.check_mode:
            changed = _write_marker(own_dir, ROLLBACK_OF, stamp)
            changed = _write_marker(os.path.join(backup_dir, stamp), ROLLED_BACK, params["own_stamp"]) or changed
        else:
            changed = run["rolled_back_by"] != params["own_stamp"]
        module.exit_json(changed=changed)
    plan = Plan(params)
    refusals = plan.refusals(params["allow_drop_kms"], params["reencrypted"], run["uninstall"])
    if params["state"] == "plan":
        module.exit_json(changed=False, stamp=stamp, present=True, run=run, refusals=refusals, **plan.report())
    if refusals:
        module.fail_json(msg="; ".join(r["msg"] for r in refusals), refusals=refusals)
    group = "plugin" if params["phase"] == "cleanup" else params["phase"]
    expect = plan.expect()  # before anything changes: how the apiserver will pick the change up
    restores, removals = plan.changes(group)
    if params["phase"] == "plugin":
        removals = []
    elif params["phase"] == "cleanup":
        restores = []
    written = []
    if not module.check_mode and (restores or removals):
        _write_marker(own_dir, ROLLBACK_OF, stamp)  # first: a stopped rollback is never taken for a changing run
        root = plan.root
        for path in restores:
            saved = restore_file(module, plan.backup(path), plan.host(path), backup_dir, params["own_stamp"], root)
            written.append({"path": plan.host(path), "backup": saved, "restored_from": plan.backup(path)})
        for path in removals:
            saved = remove_file(module, plan.host(path), backup_dir, params["own_stamp"], root)
            written.append({"path": plan.host(path), "backup": saved, "removed": True})
    module.exit_json(
        changed=bool(restores or removals),
        stamp=stamp,
        written=written,
        restored=restores,
        removed=removals,
        expect=expect if params["phase"] == "apiserver" else "none",
        wait_for_kms=bool(plan.kms_after),
    )


if __name__ == "__main__":
    main()
