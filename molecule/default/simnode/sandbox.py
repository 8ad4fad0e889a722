"""Run one container's process in its pod's filesystem view, as a container runtime would, without one.

The view is a private mount namespace (`unshare --mount --propagation private`) in which every hostPath volume
is bind-mounted from the node root onto its mountPath (remounted read-only where the mount says so), then the
process is exec'd through `setpriv` as the pod's user with the pod's capabilities. The rest of the filesystem is
the real host's (the "image" is this machine): that is the main difference from a container, see README.md.

Mount points that do not exist on the real host must be created there (a bind mount needs a target); they are
recorded in a MountPointRecord so that whoever created them removes them again once nothing uses them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shlex
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from podspec import Container, Mount

# What a container gets as PATH when its image sets none (the runtime's default).
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The capabilities containerd and CRI-O give a container that drops nothing (root inside the container is not
# root on the host): with them the simulation refuses what a real pod could not do.
DEFAULT_CAPS = (
    "chown",
    "dac_override",
    "fsetid",
    "fowner",
    "mknod",
    "net_raw",
    "setgid",
    "setuid",
    "setfcap",
    "setpcap",
    "net_bind_service",
    "sys_chroot",
    "kill",
    "audit_write",
)


class StartError(Exception):
    """The container cannot be started (the kubelet would report CreateContainerError or similar)."""


@dataclass(frozen=True)
class PreparedMount:
    mount: Mount
    source: Path  # host path of what gets mounted (node root + hostPath [+ subPath])
    is_file: bool  # mount point must be a file, not a directory
    nested: bool  # its mountPath lies inside another mount of the same container


def node_path(node_root: Path, path: str) -> Path:
    """The host path of a path as the node sees it."""
    return node_root / path.lstrip("/")


def prepare_volumes(container: Container, node_root: Path) -> list[PreparedMount]:
    """Check or create each hostPath under the node root as the kubelet does for its type, in mount order."""
    prepared: list[PreparedMount] = []
    # containerd sorts mounts by depth so that a parent never hides a child mounted before it.
    mounts = sorted(container.mounts, key=lambda m: m.mount_path.rstrip("/").count("/"))
    for mount in mounts:
        volume_root = node_path(node_root, mount.host_path)
        _check_host_path_type(volume_root, mount)
        source = volume_root
        if mount.sub_path:
            source = node_path(node_root, mount.source)
            if not source.exists():
                source.mkdir(parents=True, mode=0o755)  # the kubelet creates a missing subPath as a directory
        is_file = source.exists() and not source.is_dir()
        nested = any(other is not mount and _inside(mount.mount_path, other.mount_path) for other in container.mounts)
        prepared.append(PreparedMount(mount, source, is_file, nested))
    return prepared


def _check_host_path_type(path: Path, mount: Mount) -> None:
    htype = mount.type
    where = f"hostPath {mount.host_path} (volume {mount.volume})"
    exists = path.exists()
    if htype in ("", "DirectoryOrCreate") and not exists:
        # DirectoryOrCreate: the kubelet makes it 0755; "": the runtime creates a missing bind source the same way.
        path.mkdir(parents=True, mode=0o755)
        return
    if htype == "FileOrCreate" and not exists:
        if not path.parent.is_dir():
            raise StartError(f"{where}: FileOrCreate does not create the parent directory {path.parent}")
        path.touch(mode=0o644)
        return
    if htype == "":
        return
    if not exists:
        raise StartError(f"hostPath type check failed: {mount.host_path} does not exist ({where}, type {htype})")
    mode = path.stat().st_mode
    wanted = {
        "Directory": stat.S_ISDIR,
        "DirectoryOrCreate": stat.S_ISDIR,
        "File": stat.S_ISREG,
        "FileOrCreate": stat.S_ISREG,
        "Socket": stat.S_ISSOCK,
        "CharDevice": stat.S_ISCHR,
        "BlockDevice": stat.S_ISBLK,
    }[htype]
    if not wanted(mode):
        raise StartError(f"hostPath type check failed: {mount.host_path} is not a {htype} ({where})")


def _inside(path: str, parent: str) -> bool:
    parent = parent.rstrip("/")
    return parent == "" or path.startswith(parent + "/")


def ensure_host_mount_points(container: Container, mounts: list[PreparedMount], record: MountPointRecord) -> None:
    """Create on the real host the mount points (and a workingDir) that are missing there, recording each."""
    for prepared in mounts:
        if not prepared.nested:
            record.create(prepared.mount.mount_path, is_file=prepared.is_file)
    wd = container.working_dir
    if wd and not any(_inside(wd, m.mount.mount_path) or wd == m.mount.mount_path for m in mounts):
        record.create(wd, is_file=False)


def container_argv(container: Container, mounts: list[PreparedMount], program: list[str]) -> list[str]:
    """unshare + a small sh script that mounts the volumes and execs setpriv + the program ("$@")."""
    q = shlex.quote
    script = ["set -e"]
    for prepared in mounts:
        target = q(prepared.mount.mount_path)
        if prepared.is_file:
            parent = q(os.path.dirname(prepared.mount.mount_path) or "/")
            script.append(f"[ -e {target} ] || {{ mkdir -p {parent} && : > {target}; }}")
        else:
            script.append(f"[ -e {target} ] || mkdir -p {target}")
        script.append(f"mount --rbind {q(str(prepared.source))} {target}")
        if prepared.mount.read_only:
            # "bind" makes this a per-mount flag of this namespace; without it the host's filesystem would change.
            script.append(f"mount -o remount,bind,ro {target}")
    if container.working_dir:
        script.append(f"mkdir -p {q(container.working_dir)}")
    if container.read_only_root:
        script.append("mount -o remount,bind,ro /")
    if container.working_dir:
        script.append(f"cd {q(container.working_dir)}")
    script.append("exec " + " ".join(q(a) for a in setpriv_argv(container)) + ' "$@"')
    # The outer setpriv only sets the parent-death signal (inherited across exec): the process dies with its agent.
    # A preexec_fn would do the same but is not safe in a process that has threads (the probe workers).
    return [
        *("setpriv", "--pdeathsig", "KILL", "--"),
        *("unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", "\n".join(script), "sh"),
        *program,
    ]


def setpriv_argv(container: Container) -> list[str]:
    uid = container.run_as_user
    argv = ["setpriv"]
    if uid is not None or container.run_as_group is not None:
        gid = container.run_as_group if container.run_as_group is not None else _image_gid(uid)
        argv += ["--reuid", str(uid or 0), "--regid", str(gid), "--clear-groups"]
    if container.no_new_privs:
        argv.append("--no-new-privs")
    argv += ["--bounding-set", "".join(["-all", *(f",+{c}" for c in bounding_set(container))]), "--inh-caps", "-all"]
    # A change of user clears the parent-death signal; keep it, so the process dies with the agent.
    argv += ["--pdeathsig", "keep", "--"]
    return argv


def bounding_set(container: Container) -> list[str]:
    """The container's capabilities as containerd composes them: the runtime default, none after drop ALL, then
    each added one, less each dropped one. A root process gets exactly these; a non-root one gets none unless its
    program has file capabilities (no ambient capabilities, as with runtimes), which the kernel decides here too."""
    caps = [] if container.drop_all_caps else list(DEFAULT_CAPS)
    caps += [cap for cap in container.add_caps if cap not in caps]
    return [cap for cap in caps if cap not in container.drop_caps]


def _image_gid(uid: int | None) -> int:
    """The runtime takes the group of a runAsUser from the image's /etc/passwd, or 0 when it is not listed."""
    if not uid:
        return 0
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return 0


def container_env(container: Container, node_name: str) -> dict[str, str]:
    """What a runtime gives the process: PATH, HOSTNAME, HOME, the manifest's env. SIMNODE_IMAGE is this
    simulation's one addition: the image the manifest names, for a stand-in to know which version it plays."""
    home = "/root" if not container.run_as_user else "/"
    base = {"PATH": CONTAINER_PATH, "HOSTNAME": node_name, "HOME": home, "SIMNODE_IMAGE": container.image}
    return {**base, **dict(container.env)}


def resolve_program(command0: str, programs: dict[str, list[str]], required: bool = True) -> list[str]:
    """The argv that stands in for the image's binary named by the container's command[0]."""
    for name in (command0, os.path.basename(command0)):
        if name in programs:
            return list(programs[name])
    if required:
        raise StartError(
            f"command {command0!r} has no program on this node: the image's binary does not exist here "
            f"(map it with --program {os.path.basename(command0)}=PATH)"
        )
    return [command0]


class MountPointRecord:
    """Paths this process created on the real host as mount points, in creation order (a JSON list).

    Removal only takes away what is still an empty directory or an empty file and is not a mount point in
    any live mount namespace: another node's pod may be using the same path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[str]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries: list[str] = json.loads(self.path.read_text()) if self.path.exists() else []
            before = list(entries)
            yield entries
            if entries != before:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(entries, indent=1))
                tmp.replace(self.path)

    def paths(self) -> list[str]:
        return json.loads(self.path.read_text()) if self.path.exists() else []

    def create(self, path: str, is_file: bool) -> None:
        """mkdir -p (or touch) on the real host, recording every component that did not exist."""
        target = Path(path)
        missing = [p for p in [*reversed(target.parents), target] if not os.path.lexists(p)]
        if not missing:
            return
        with self._locked() as entries:
            for component in missing:
                if os.path.lexists(component):
                    continue
                if component == target and is_file:
                    component.touch(mode=0o644)
                else:
                    component.mkdir(mode=0o755)
                entries.append(str(component))

    def remove_unused(self) -> tuple[list[str], list[str]]:
        """Remove what can be removed, newest first; returns (removed, kept). Kept paths stay recorded."""
        removed: list[str] = []
        kept: list[str] = []
        with self._locked() as entries:
            in_use = mount_points_in_use()
            for entry in reversed(list(entries)):
                path = Path(entry)
                if not os.path.lexists(path):
                    entries.remove(entry)
                    continue
                if entry in in_use or not _empty(path):
                    kept.append(entry)
                    continue
                try:
                    if path.is_dir():
                        path.rmdir()
                    else:
                        path.unlink()
                except OSError:
                    kept.append(entry)
                    continue
                entries.remove(entry)
                removed.append(entry)
        return removed, kept


def _empty(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.is_dir():
        return not any(path.iterdir())
    return path.is_file() and path.stat().st_size == 0


def mount_points_in_use() -> set[str]:
    """Every mount point of every live mount namespace on this machine (one mountinfo read per namespace)."""
    seen: set[int] = set()
    points: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry.name}/ns/mnt").st_ino
            if ns in seen:
                continue
            text = Path(f"/proc/{entry.name}/mountinfo").read_text()
        except OSError:
            continue  # the process is gone, or not ours to look at
        seen.add(ns)
        for line in text.splitlines():
            fields = line.split(" ")
            if len(fields) > 4:
                points.add(_unescape(fields[4]))
    return points


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out = bytearray()
    i = 0
    raw = field.encode()
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="replace")
