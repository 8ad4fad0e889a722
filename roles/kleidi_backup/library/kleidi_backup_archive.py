#!/usr/bin/python
"""Ansible module: seal a KEK store into an encrypted backup file on its node, or restore one onto a node."""

from __future__ import annotations

DOCUMENTATION = r"""
module: kleidi_backup_archive
short_description: Encrypt a KEK store into a backup file on the node, or decrypt, verify and restore one there
description:
  - With O(state=sealed), reads the O(entries) (files or directories) of O(root), lock and SQLite journal files left
    out (a SQLite database is read through SQLite's backup API, so a consistent copy is taken while the plugin has it
    open), makes a tar of them in memory and encrypts it with AES-256-GCM under a key derived from O(passphrase)
    (scrypt). The file is written to a new private directory (0700) on the node, RV(path); nothing in clear is ever
    written.
  - With O(state=restored), decrypts O(src) with O(passphrase) and checks its integrity (the GCM tag) and that its
    header matches O(expect) before anything is written. When every file of the backup is already in O(root) with
    the same content, nothing changes. Otherwise each top-level entry is written to a staging directory beside
    O(root), owned by O(owner)/O(group) (directories 0700, files 0600), and renamed into place; an entry it replaces
    (a damaged store) is first moved to O(aside_dir)/<its path on the node>, never deleted.
  - The passphrase is a no_log argument; it is never in a process's arguments or environment.
options:
  state: {description: sealed or restored., type: str, required: true, choices: [sealed, restored]}
  root: {description: Host path of the directory that holds the store's entries., type: path, required: true}
  passphrase: {description: The operator's backup passphrase., type: str, required: true, no_log: true}
  entries: {description: "sealed: the names in O(root) to back up.", type: list, elements: str, default: []}
  meta:
    description: "sealed: what the backup holds (no secrets); kept in the file's authenticated header."
    type: dict
    default: {}
  src: {description: "restored: host path of the backup file on the node.", type: path}
  expect: {description: "restored: header fields the backup must have (backend, serial, ...).", type: dict, default: {}}
  owner: {description: "restored: numeric uid of the restored files.", type: int, default: 0}
  group: {description: "restored: numeric gid of the restored files.", type: int, default: 0}
  aside_dir: {description: "restored: host directory that receives entries the restore replaces.", type: path}
  node_root: {description: The node root prefixed to every path (empty on a real node)., type: str, default: ""}
"""

RETURN = r"""
path: {description: "sealed: the backup file on the node, in a private directory the caller removes.", type: str}
sha256: {description: "sealed: sha256 of the backup file.", type: str}
size: {description: "sealed: its size in bytes.", type: int}
files: {description: "sealed and restored: the store's files (relative paths), without their content.", type: list}
meta: {description: "restored: the backup's header meta.", type: dict}
moved_aside: {description: "restored: where the entries it replaced went.", type: list}
"""

import contextlib
import fnmatch
import hashlib
import os
import shutil
import sqlite3
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.kleidi_backup_format import (
    BackupError,
    make_tar,
    open_sealed,
    read_tar,
    safe_name,
    seal,
)

# Never part of a store: SoftHSM2's lock files and SQLite's journals (a journal beside a restored database would be
# rolled into it).
SKIP = ("*.lock", "*-journal", "*-wal", "*-shm")
_SQLITE = b"SQLite format 3\x00"


def _skipped(name):
    return any(fnmatch.fnmatch(os.path.basename(name), pattern) for pattern in SKIP)


def _read(path, scratch):
    """A file's bytes; a SQLite database through SQLite's backup API (a consistent copy of a database in use)."""
    with open(path, "rb") as handle:
        head = handle.read(len(_SQLITE))
    if head != _SQLITE:
        with open(path, "rb") as handle:
            return handle.read()
    copy = os.path.join(scratch, "snapshot.sqlite3")
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        target = sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
    try:
        with open(copy, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(copy)


def collect(root, entries, scratch):
    """{relative path: bytes} of every file under root/<entry>, lock and journal files left out."""
    files = {}
    for entry in entries:
        if safe_name(entry) is None or "/" in entry:
            raise BackupError(f"{entry!r} is not a name inside {root}")
        top = os.path.join(root, entry)
        if os.path.isfile(top):
            files[entry] = _read(top, scratch)
            continue
        if not os.path.isdir(top):
            raise BackupError(f"{top} does not exist")
        for current, dirs, names in os.walk(top):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(current, name)
                if _skipped(name) or not os.path.isfile(path) or os.path.islink(path):
                    continue
                files[os.path.relpath(path, root)] = _read(path, scratch)
    if not files:
        raise BackupError(f"nothing to back up in {root} ({', '.join(entries)})")
    return files


def _same(root, files):
    """Whether every file is already in root with the same bytes, and each top-level directory holds nothing else."""
    for name, data in files.items():
        path = os.path.join(root, name)
        try:
            with open(path, "rb") as handle:
                if handle.read() != data:
                    return False
        except OSError:
            return False
    for top in {name.split("/")[0] for name in files if "/" in name}:
        for current, _dirs, names in os.walk(os.path.join(root, top)):
            for name in names:
                relative = os.path.relpath(os.path.join(current, name), root)
                if not _skipped(name) and relative not in files:
                    return False
    return True


def _node_path(path, node_root):
    return path[len(node_root) :] if node_root and path.startswith(node_root + "/") else path


def _move_aside(path, aside_dir, node_root):
    target = os.path.join(aside_dir, _node_path(path, node_root).lstrip("/"))
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    if os.path.lexists(target):
        target = tempfile.mkdtemp(prefix=os.path.basename(target) + ".", dir=os.path.dirname(target))
    shutil.move(path, target)
    return target


def _make_root(root, owner, group):
    """The store's directory, made as the backend roles make it: parents root's 0755, itself the plugin's 0700."""
    parent = os.path.dirname(root)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o755)
    if not os.path.isdir(root):
        os.mkdir(root, 0o700)
        os.chown(root, owner, group)
        os.chmod(root, 0o700)


def _stage(root, files, owner, group):
    """Write the files to a new staging directory on root's filesystem; return it."""
    parent = os.path.dirname(root)
    same_fs = os.stat(parent).st_dev == os.stat(root).st_dev
    staging = tempfile.mkdtemp(prefix=".kleidi-restore-", dir=parent if same_fs else root)
    for name, data in sorted(files.items()):
        path = os.path.join(staging, name)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    for current, dirs, names in os.walk(staging):
        for name in dirs:
            os.chown(os.path.join(current, name), owner, group)
            os.chmod(os.path.join(current, name), 0o700)
        for name in names:
            os.chown(os.path.join(current, name), owner, group)
            os.chmod(os.path.join(current, name), 0o600)
    return staging


def restore(module, params):
    with open(params["src"], "rb") as handle:
        blob = handle.read()
    header, plaintext = open_sealed(blob, params["passphrase"])
    meta = header.get("meta") or {}
    wrong = sorted(key for key, value in params["expect"].items() if meta.get(key) != value)
    if wrong:
        raise BackupError(
            "the backup does not hold what its manifest says ("
            + ", ".join(f"{key}: {meta.get(key)!r} in the backup, {params['expect'][key]!r} expected" for key in wrong)
            + "); nothing was restored"
        )
    files = read_tar(plaintext)
    tops = sorted({name.split("/")[0] for name in files})
    if not files or tops != sorted(meta.get("entries") or []):
        raise BackupError("the backup's archive does not hold the entries its header names; nothing was restored")
    root = params["root"]
    result = {"changed": False, "files": sorted(files), "meta": meta, "moved_aside": []}
    if os.path.isdir(root) and _same(root, files):
        return result
    result["changed"] = True
    if module.check_mode:
        return result
    _make_root(root, params["owner"], params["group"])
    staging = _stage(root, files, params["owner"], params["group"])
    try:
        for top in tops:
            target = os.path.join(root, top)
            siblings = [target] + ([target + suffix for suffix in ("-journal", "-wal", "-shm")] if top in files else [])
            for path in siblings:
                if os.path.lexists(path):
                    if not params["aside_dir"]:
                        raise BackupError(f"{path} exists and no aside_dir was given to keep it")
                    result["moved_aside"].append(_move_aside(path, params["aside_dir"], params["node_root"]))
            os.rename(os.path.join(staging, top), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return result


def sealed(module, params):
    private = tempfile.mkdtemp(prefix="kleidi-backup-")
    try:
        files = collect(params["root"], params["entries"], private)
        meta = {**params["meta"], "entries": sorted(params["entries"])}
        blob = seal(make_tar(files), params["passphrase"], meta)
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    result = {"changed": True, "files": sorted(files), "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    if module.check_mode:
        shutil.rmtree(private, ignore_errors=True)
        return result
    path = os.path.join(private, "backup.tar.enc")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(blob)
    result["path"] = path
    return result


def main():
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "required": True, "choices": ["sealed", "restored"]},
            "root": {"type": "path", "required": True},
            "passphrase": {"type": "str", "required": True, "no_log": True},
            "entries": {"type": "list", "elements": "str", "default": []},
            "meta": {"type": "dict", "default": {}},
            "src": {"type": "path"},
            "expect": {"type": "dict", "default": {}},
            "owner": {"type": "int", "default": 0},
            "group": {"type": "int", "default": 0},
            "aside_dir": {"type": "path"},
            "node_root": {"type": "str", "default": ""},
        },
        required_if=[("state", "restored", ("src",)), ("state", "sealed", ("entries",))],
        supports_check_mode=True,
    )
    params = module.params
    try:
        result = sealed(module, params) if params["state"] == "sealed" else restore(module, params)
    except (BackupError, OSError, sqlite3.Error) as exc:
        module.fail_json(msg=str(exc).replace(params["passphrase"], "<redacted>"))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
