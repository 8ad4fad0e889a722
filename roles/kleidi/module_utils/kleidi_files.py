"""File writes for every kleidi role: a timestamped backup first, then an atomic replace."""

from __future__ import annotations

import os
import shutil
import tempfile


def backup_file(module, path, backup_dir, stamp, root=""):
    """Copy ``path`` (if it exists) to backup_dir/stamp/<its path on the node>; return the copy's path or None.

    Backups never go next to the original: the kubelet runs every file in its manifests directory."""
    if not os.path.exists(path):
        return None
    node_path = path[len(root) :] if root and path.startswith(root + "/") else path
    target = os.path.join(backup_dir, stamp, node_path.lstrip("/"))
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    if not os.path.exists(target):  # the first copy of a run is the state before the run
        shutil.copy2(path, target)
    return target


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


def read_text(path):
    """The file's text, or None when it does not exist yet."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
