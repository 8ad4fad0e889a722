"""What bounds the key server's cost to peers it has not authenticated yet: how many connections it holds, and how
many lines their refusals write to the log."""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
from typing import Any

log = logging.getLogger("kleidi.remote")

# TLS handshakes in progress, from everyone and from one address. Each holds a file descriptor and some memory
# for up to the handshake timeout; past these, a new connection is closed at once. The per-address share keeps one
# host that opens connections and sends nothing from taking every slot from the control-plane nodes.
MAX_HANDSHAKES = 64
MAX_HANDSHAKES_PER_HOST = 16
# Connections past the handshake (proxy-mode plugins hold one or two each), lowered by connection_limit() when the
# open-file limit has no room for them.
MAX_CONNECTIONS = 1024
# Refusals from one address write one line per window; the count of the others follows at the window's end.
REFUSAL_LOG_WINDOW = 10.0
# Addresses held in that count at once; refusals from more addresses than this share one line (peer_host "other").
_MAX_HOSTS = 256
# File descriptors left for the rest: the KMS socket and its connections, the backend, the probes, the handshakes.
_FDS_KEPT = 256


def connection_limit(maximum: int) -> int:
    """``maximum``, or fewer when the open-file limit (RLIMIT_NOFILE) has no room for them: each connection holds
    three descriptors (the client's TCP socket, and both ends of the unix socket to the gRPC server). Running out
    would refuse the apiserver's own connections on the KMS socket, and the probes'."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return maximum
    return max(1, min(maximum, (soft - _FDS_KEPT) // 3))


class RefusalLog:
    """Refused connections in the log, at most one line per peer address per window: the first refusal in full
    (address, reason, and the certificate's names when there was one); then, while the address keeps being
    refused, one line at the end of each window saying how many more and by which result. The metric
    kleidi_remote_connections_total counts every one. Runs on the front's event loop only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, window: float) -> None:
        self._loop = loop
        self._window = window
        self._held: dict[str, collections.Counter[str]] = {}  # address -> results refused since its last line

    def refused(self, host: str, result: str, extra: dict[str, Any]) -> None:
        if host not in self._held and len(self._held) >= _MAX_HOSTS:
            host = "other"
        held = self._held.get(host)
        if held is not None:
            held[result] += 1
            return
        self._held[host] = collections.Counter()
        self._loop.call_later(self._window, self._end_window, host)
        log.warning("remote connection refused", extra=extra)

    def _end_window(self, host: str) -> None:
        held = self._held.pop(host, None)
        if not held:  # a quiet window: the next refusal is written in full
            return
        self._summarise(host, held)
        self._held[host] = collections.Counter()  # still refused: the next window is summarised as well
        self._loop.call_later(self._window, self._end_window, host)

    def _summarise(self, host: str, held: collections.Counter[str]) -> None:
        log.warning(
            "remote connections refused, not logged one by one",
            extra={
                "peer_host": host,
                "refused": sum(held.values()),
                "results": dict(sorted(held.items())),
                "window_s": self._window,
            },
        )

    def flush(self) -> None:
        """Write what is still counted (at stop): no refusal goes unmentioned."""
        for host, held in sorted(self._held.items()):
            if held:
                self._summarise(host, held)
        self._held.clear()
