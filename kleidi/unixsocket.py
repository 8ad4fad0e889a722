"""Safe creation and removal of the plugin's unix socket path."""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat

from kleidi.errors import ConfigError

log = logging.getLogger("kleidi.socket")


def prepare(path: str, gid: int | None = None) -> None:
    """Make ``path`` ready to bind: parent directory present and safe, nothing live in the way.

    A stale socket is removed only after a connect() proves nobody listens on it. A symlink,
    a regular file or any other kind of file at the path is refused, never deleted."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o750, exist_ok=True)
            if gid is not None:  # the socket's group must be able to reach the socket
                os.chown(parent, -1, gid)
        except OSError as exc:
            raise ConfigError(f"listen: cannot create the socket directory {parent}: {exc.strerror}") from None
    pst = os.lstat(parent)
    if stat.S_ISLNK(pst.st_mode):
        raise ConfigError(f"listen: socket directory {parent} is a symlink; refusing")
    if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
        raise ConfigError(f"listen: socket directory {parent} is writable by everyone; refusing")
    if not os.access(parent, os.W_OK | os.X_OK):
        # gRPC reports this only as a failed bind; name the directory, its owner and who we are.
        raise ConfigError(
            f"listen: socket directory {parent} (owner uid {pst.st_uid}, mode {stat.S_IMODE(pst.st_mode):04o}) "
            f"is not writable by uid {os.geteuid()}; give it to the plugin's user"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"listen: {path} is a symlink; refusing to use or remove it")
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"listen: {path} exists and is not a socket; refusing to remove it")
    if _is_listening(path):
        raise ConfigError(f"listen: another process is serving on {path}")
    os.unlink(path)
    log.info("removed stale socket", extra={"socket": path})


def _is_listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise ConfigError(f"listen: cannot tell whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    return True


def group_id(group: str) -> int | None:
    """The gid for ``socket_group`` (a name or a number); None keeps the process's group."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group: no group named {group}") from None


def secure(path: str, mode: int, gid: int | None) -> None:
    """Apply the configured mode and group to the bound socket."""
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        raise ConfigError(f"socket_group/socket_mode: cannot apply them to {path}: {exc.strerror}") from None


def is_ours(path: str, inode: int) -> bool:
    """Whether ``path`` is still the socket this process bound (same inode)."""
    try:
        st = os.lstat(path)
    except OSError:  # gone, or its directory replaced by something else
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_ino == inode


def remove(path: str, inode: int) -> None:
    """Remove the socket only if it is still the one this process created."""
    if is_ours(path, inode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
