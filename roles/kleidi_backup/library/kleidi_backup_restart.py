#!/usr/bin/python
"""Ansible module: stop the kleidi plugin that serves a socket, so that its supervisor starts it afresh."""

from __future__ import annotations

DOCUMENTATION = r"""
module: kleidi_backup_restart
short_description: Stop the kleidi process serving a unix socket; the kubelet (or systemd) starts it again
description:
  - Connects to O(socket) and asks the kernel which process listens on it (SO_PEERCRED: the pid as this host sees
    it, also for a plugin in a container's PID namespace), checks that the process is C(kleidi serve), sends it
    SIGTERM (kleidi finishes its in-flight calls and exits) and waits until it is gone. The static pod's
    restartPolicy Always (or the unit's Restart=always) starts a new plugin, which opens the store as it is now,
    through fresh mounts.
  - When nothing serves the socket there is nothing to stop (the kubelet is already starting the plugin again):
    nothing changes.
options:
  socket: {description: Host path of the plugin's unix socket., type: path, required: true}
  timeout: {description: Seconds to wait for the process to exit., type: int, default: 30}
"""

RETURN = r"""
pid: {description: The process that served the socket (0 when none did)., type: int}
"""

import os
import signal
import socket
import struct
import time

from ansible.module_utils.basic import AnsibleModule


def listener(path):
    """The pid that listens on the unix socket at path, or 0 when nothing accepts connections there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        try:
            client.connect(path)
        except OSError:
            return 0
        raw = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", raw)
    return pid


def running(pid):
    """Whether pid is a live process (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def main():
    module = AnsibleModule(
        argument_spec={"socket": {"type": "path", "required": True}, "timeout": {"type": "int", "default": 30}},
        supports_check_mode=True,
    )
    path = module.params["socket"]
    pid = listener(path)
    if pid == 0:
        module.exit_json(changed=False, pid=0, msg=f"nothing serves {path}")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        argv = []
    if pid <= 1 or pid == os.getpid() or not any(b"kleidi" in arg for arg in argv) or b"serve" not in argv:
        shown = b" ".join(argv)[:200].decode(errors="replace")
        module.fail_json(msg=f"{path} is served by pid {pid} ({shown!r}), which is not `kleidi serve`; not stopping it")
    if module.check_mode:
        module.exit_json(changed=True, pid=pid)
    os.kill(pid, signal.SIGTERM)
    until = time.monotonic() + module.params["timeout"]
    while running(pid):
        if time.monotonic() > until:
            module.fail_json(msg=f"kleidi (pid {pid}) did not exit within {module.params['timeout']}s of SIGTERM")
        time.sleep(0.2)
    module.exit_json(changed=True, pid=pid)


if __name__ == "__main__":
    main()
