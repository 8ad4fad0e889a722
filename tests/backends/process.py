"""Starting and stopping the fixtures' daemons so that none outlives the test run."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when the process that started it dies, even by SIGKILL.

    Linux ties that signal to the *thread* that forked: start fixtures from a thread that outlives them."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10, group: bool = False) -> None:
    """SIGTERM, wait, SIGKILL, wait; ``group`` signals the child's whole process group."""
    if proc is None or proc.poll() is not None:
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout)
