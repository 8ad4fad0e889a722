"""Socket path safety rules, on real files and sockets."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from kleidi import unixsocket
from kleidi.errors import ConfigError

pytestmark = pytest.mark.unit


def test_refuses_a_world_writable_parent_without_sticky_bit(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by everyone"):
        unixsocket.prepare(str(parent / "k.sock"))
    parent.chmod(0o1777)  # like /tmp: fine
    unixsocket.prepare(str(parent / "k.sock"))


def test_refuses_a_symlinked_parent(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ConfigError, match="is a symlink"):
        unixsocket.prepare(str(tmp_path / "link" / "k.sock"))


def test_creates_a_missing_parent_private(tmp_path: Path) -> None:
    unixsocket.prepare(str(tmp_path / "new" / "k.sock"))
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o750


def test_live_socket_is_kept_and_stale_one_removed(tmp_path: Path) -> None:
    path = str(tmp_path / "k.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()
    with pytest.raises(ConfigError, match="another process is serving"):
        unixsocket.prepare(path)
    live.close()  # the file stays, nobody listens: stale
    assert os.path.exists(path)
    unixsocket.prepare(path)
    assert not os.path.exists(path)


def test_remove_only_removes_our_own_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "k.sock")
    ours = socket.socket(socket.AF_UNIX)
    ours.bind(path)
    inode = os.lstat(path).st_ino
    os.unlink(path)
    theirs = socket.socket(socket.AF_UNIX)
    theirs.bind(path)  # someone else's socket now sits at the path
    unixsocket.remove(path, inode)
    assert os.path.exists(path)
    ours.close()
    theirs.close()


def test_unknown_group_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="socket_group: no group named no-such-group-x"):
        unixsocket.group_id("no-such-group-x")
    assert unixsocket.group_id("") is None and unixsocket.group_id("0") == 0


def test_a_socket_directory_the_plugins_user_cannot_write_is_named_with_its_owner() -> None:
    # What the kubelet makes for a missing DirectoryOrCreate hostPath: root's, mode 0755. A forked child drops to
    # the plugin's uid with kleidi already imported (this Python's files are root's alone).
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        base.chmod(0o755)
        (base / "run").mkdir(mode=0o755)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            os.close(read_end)
            try:
                os.setgid(10001)
                os.setuid(10001)
                unixsocket.prepare(str(base / "run" / "kleidi.sock"))
                message = "accepted"
            except ConfigError as exc:
                message = str(exc)
            except BaseException as exc:
                message = repr(exc)
            os.write(write_end, message.encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            message = pipe.read()
        os.waitpid(pid, 0)
    finally:
        shutil.rmtree(base)
    assert message == (
        f"listen: socket directory {base}/run (owner uid 0, mode 0755) is not writable by uid 10001; "
        "give it to the plugin's user"
    )
