#!/usr/bin/python
"""Ansible module: write a file's content, copying the old one to the backup directory first."""

from __future__ import annotations

DOCUMENTATION = r"""
module: kleidi_file
short_description: Write a file, backing up the old one outside its directory first
description:
  - Writes O(content) to O(path) with O(mode), O(owner) and O(group). When the content changes, the old file is
    first copied to O(backup_dir)/<stamp>/<its path on the node>, never next to it (the kubelet runs every file in
    its manifests directory, and RKE2 reads every file in config.yaml.d), then replaced atomically.
  - A file that did not exist is recorded as created by this run (O(backup_dir)/<stamp>/.created, one node path a
    line), so that the run can be rolled back (role kleidi_rollback) by removing it again.
  - With O(state=absent), the file is copied to the backup directory (unless O(backup=false)) and removed.
  - Files holding secrets are written with O(backup=false): a secret is kept in as few places as possible.
options:
  path: {description: Host path of the file., type: path, required: true}
  state: {description: present or absent., type: str, default: present, choices: [present, absent]}
  content: {description: What the file must hold (required with O(state=present))., type: str}
  mode: {description: Octal mode., type: raw, default: "0600"}
  owner: {description: Owner (name or uid)., type: str, default: root}
  group: {description: Group (name or gid)., type: str, default: root}
  backup: {description: Copy the old file before replacing it., type: bool, default: true}
  backup_dir: {description: Host directory for backups., type: path, required: true}
  stamp: {description: Name of this run's backup directory., type: str, required: true}
  root: {description: The node root prefixed to every path (empty on a real node)., type: str, default: ""}
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.kleidi_files import (
    backup_file,
    node_path,
    read_text,
    record_created,
    remove_file,
    write_file,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "content": {"type": "str", "no_log": False},
            "mode": {"type": "raw", "default": "0600"},
            "owner": {"type": "str", "default": "root"},
            "group": {"type": "str", "default": "root"},
            "backup": {"type": "bool", "default": True},
            "backup_dir": {"type": "path", "required": True},
            "stamp": {"type": "str", "required": True},
            "root": {"type": "str", "default": ""},
        },
        required_if=[("state", "present", ("content",))],
        supports_check_mode=True,
    )
    params = module.params
    path, content = params["path"], params["content"]
    if params["state"] == "absent":
        remove(module, params)
    old = read_text(path)
    result = {"changed": False, "path": path, "written": []}
    if old != content:
        result["changed"] = True
        result["diff"] = {"before": old or "", "after": content, "before_header": path, "after_header": path}
        if not module.check_mode:
            if params["backup"]:
                saved = backup_file(module, path, params["backup_dir"], params["stamp"], params["root"])
            else:  # a secret is not copied, but a new file is still recorded as this run's
                saved = None
                if old is None:
                    record_created(os.path.join(params["backup_dir"], params["stamp"]), node_path(path, params["root"]))
            mode = int(params["mode"], 8) if isinstance(params["mode"], str) else params["mode"]
            write_file(module, path, content, mode=mode)
            result["written"] = [{"path": path, "backup": saved}]
    if os.path.exists(path) and not module.check_mode:
        file_args = module.load_file_common_arguments(
            {"path": path, "mode": params["mode"], "owner": params["owner"], "group": params["group"]}
        )
        result["changed"] = module.set_fs_attributes_if_different(file_args, result["changed"])
    module.exit_json(**result)


def remove(module, params):
    """state=absent: copy the file to the run's backup directory (unless it holds a secret), then remove it."""
    path = params["path"]
    result = {"changed": os.path.lexists(path), "path": path, "written": []}
    if result["changed"] and not module.check_mode:
        if params["backup"]:
            saved = remove_file(module, path, params["backup_dir"], params["stamp"], params["root"])
        else:
            saved = None
            os.unlink(path)
        result["written"] = [{"path": path, "backup": saved, "removed": True}]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
