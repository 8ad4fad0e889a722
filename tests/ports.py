"""TCP ports on 127.0.0.1 for the servers the tests start (OpenBao, etcd, swtpm, kleidi's probe and key server...).

Binding port 0 and closing the socket again races: before the server meant to listen there binds the port, the
kernel can hand it to another pytest-xdist worker asking the same way, or to any outgoing connection as its local
port, and a test then talks to another worker's OpenBao without noticing. So a port here:

- lies below the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range), which outgoing connections
  take their local ports from;
- is handed out once per process, in order, from a stretch of its own for each xdist worker (PYTEST_XDIST_WORKER);
- is claimed machine-wide with a byte-range lock (byte N of one lock file for port N), held until the process
  exits: any other process using this module (the other workers, another pytest session) skips it;
- is bindable right now, so nothing else listens there.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import threading
from pathlib import Path

LOW = 20000
# Each worker starts this far from the previous one; the locks, not the stretches, keep workers apart, so a worker
# that needs more ports runs into the next stretch harmlessly.
STRETCH = 2000
LOCK_FILE = Path(tempfile.gettempdir()) / "kleidi-test-ports.lock"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ... under pytest-xdist; unset otherwise
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


class PortPool:
    def __init__(self, low: int = LOW, high: int | None = None, start: int | None = None) -> None:
        self.low = low
        # A kernel whose ephemeral range starts lower leaves nothing safe from outgoing connections; the locks still
        # keep the tests' own servers apart.
        self.high = high if high is not None else max(min(_ephemeral_low(), 32768), low + 4 * STRETCH)
        self._next = start if start is not None else low + (_worker_index() * STRETCH) % (self.high - low)
        self._given: set[int] = set()
        self._mutex = threading.Lock()
        self._fd: int | None = None

    def port(self) -> int:
        with self._mutex:
            for _ in range(self.high - self.low):
                candidate = self._advance(1)
                if self._claim(candidate):
                    return candidate
        raise RuntimeError(f"no free port left in {self.low}-{self.high - 1} on 127.0.0.1")

    def pair(self) -> int:
        """A port P such that P and P + 1 are both this caller's (swtpm's control port is its server port + 1)."""
        with self._mutex:
            for _ in range(self.high - self.low):
                candidate = self._advance(2)
                if candidate + 1 >= self.high or not self._claim(candidate):
                    continue
                if self._claim(candidate + 1):
                    return candidate
                self._release(candidate)
        raise RuntimeError(f"no two consecutive free ports left in {self.low}-{self.high - 1} on 127.0.0.1")

    def _advance(self, count: int) -> int:
        port = self._next
        if port + count > self.high:
            port = self.low
        self._next = port + count
        return port

    def _claim(self, port: int) -> bool:
        if port in self._given or not self._lock(port):
            return False
        try:
            with socket.socket() as probe:  # no SO_REUSEADDR: a port with a connection lingering on it is skipped too
                probe.bind(("127.0.0.1", port))
        except OSError:
            self._unlock(port)
            return False
        self._given.add(port)
        return True

    def _release(self, port: int) -> None:
        self._given.discard(port)
        self._unlock(port)

    def _lock(self, port: int) -> bool:
        if self._fd is None:
            try:
                self._fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                self._fd = -1  # no shared lock file (another user's, say): the per-worker stretches still apply
        if self._fd < 0:
            return True
        try:
            # POSIX record locks belong to the process: held until it exits, never seen by its own later calls.
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port, os.SEEK_SET)
        except OSError:
            return False
        return True

    def _unlock(self, port: int) -> None:
        if self._fd is not None and self._fd >= 0:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, port, os.SEEK_SET)


_pool: PortPool | None = None
_pool_pid = 0
_pool_mutex = threading.Lock()


def _shared() -> PortPool:
    global _pool, _pool_pid
    with _pool_mutex:
        # A forked child needs a pool of its own: record locks are not inherited, so the parent's do not cover it.
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = PortPool(), os.getpid()
        return _pool


def free_port() -> int:
    """A port on 127.0.0.1 that no other test process will be given and nothing listens on now."""
    return _shared().port()


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free and this process's alone (as free_port)."""
    return _shared().pair()
