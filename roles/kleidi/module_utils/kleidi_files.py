"""File writes for every kleidi role: a timestamped backup first, then an atomic replace.

A run's backup directory (backup_dir/stamp) holds a copy of every file the run changed or removed, at its path on
the node, with the original's mode and owner, and a list of the files the run created (CREATED, one node path a
line). Together they are the state before the run, which the kleidi_rollback role restores."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

# In a run's backup directory: the node paths of the files the run created, one a line. Never a secret.
CREATED = ".created"


def node_path(path, root=""):
    """The path the node itself sees for a host path under the node root."""
    return path[len(root) :] if root and path.startswith(root + "/") else path


def backup_file(module, path, backup_dir, stamp, root=""):
    """Copy ``path`` (if it exists) to backup_dir/stamp/<its path on the node>; return the copy's path or None.

    A file that does not exist yet is recorded as created by this run instead. The first copy of a run is the
    state before the run: a file the run already copied, or created, is not copied again. Backups never go next
    to the original: the kubelet runs every file in its manifests directory."""
    on_node = node_path(path, root)
    run_dir = os.path.join(backup_dir, stamp)
    if not os.path.exists(path):
        record_created(run_dir, on_node)
        return None
    if on_node in created_files(run_dir):
        return None
    target = os.path.join(run_dir, on_node.lstrip("/"))
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        copy_with_owner(path, target)
    return target


def copy_with_owner(source, target):
    """Copy a file's bytes, mode and times, and (when allowed) its owner, so that restoring the copy is exact."""
    shutil.copy2(source, target)
    info = os.stat(source)
    with contextlib.suppress(PermissionError):  # not root: the copy keeps the runner's ownership
        os.chown(target, info.st_uid, info.st_gid)


def created_files(run_dir):
    """Node paths a run recorded as created, in the order it created them."""
    try:
        with open(os.path.join(run_dir, CREATED), encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle if line.strip()]
    except FileNotFoundError:
        return []


def record_created(run_dir, on_node):
    """Add a node path to the run's list of created files (atomically: a reader sees the old list or the new)."""
    listed = created_files(run_dir)
    if on_node in listed:
        return
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=run_dir, prefix=".kleidi-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write("".join(f"{line}\n" for line in [*listed, on_node]))
        os.chmod(temp, 0o600)
        os.replace(temp, os.path.join(run_dir, CREATED))
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def write_file(module, path, text, mode=0o600):
    """Replace ``path`` atomically. The temporary file's name starts with a dot, which the kubelet ignores."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=directory, prefix=".kleidi-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temp, mode)
        module.atomic_move(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def remove_file(module, path, backup_dir, stamp, root=""):
    """Copy ``path`` to the run's backup directory, then remove it; return the copy's path (None if it was absent)."""
    if not os.path.lexists(path):
        return None
    saved = backup_file(module, path, backup_dir, stamp, root)
    os.unlink(path)
    return saved


def read_text(path):
    """The file's text, or None when it does not exist yet."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
