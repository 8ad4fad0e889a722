"""Startup, liveness and readiness probes as the kubelet runs them (httpGet and tcpSocket handlers).

A probe runs in a worker thread so that a slow endpoint (the apiserver's probes allow 15 s) does not stall the
agent's loop; the loop only reads the counted results."""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

from podspec import Probe

USER_AGENT = "kube-probe/1.31"


def check(probe: Probe) -> tuple[bool, str]:
    """One probe attempt: (success, what happened)."""
    if probe.kind == "tcpSocket":
        try:
            with socket.create_connection((probe.host, probe.port), timeout=probe.timeout):
                return True, "connected"
        except OSError as err:
            return False, f"dial tcp {probe.host}:{probe.port}: {err}"
    if probe.kind != "httpGet":
        return True, f"{probe.kind} probes are not run by this agent (counted as success)"
    url = f"{probe.scheme.lower()}://{probe.host}:{probe.port}{probe.path}"
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **dict(probe.headers)})  # noqa: S310
    # The kubelet does not verify the serving certificate of an HTTPS probe.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=probe.timeout, context=context) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (OSError, ssl.SSLError) as err:
        return False, f"Get {url}: {err}"
    return 200 <= status < 400, f"HTTP probe {url} answered {status}"


class ProbeWorker:
    """One probe of one running container, counting consecutive results against its thresholds."""

    def __init__(self, probe: Probe, started_at: float, executor: ThreadPoolExecutor) -> None:
        self.probe = probe
        self.executor = executor
        self.next_run = started_at + probe.initial_delay
        self.pending: Future[tuple[bool, str]] | None = None
        self.failures = 0
        self.successes = 0
        self.ever_succeeded = False
        self.last_message = ""

    def tick(self, now: float) -> None:
        if self.pending is not None:
            if not self.pending.done():
                return
            ok, self.last_message = self.pending.result()
            self.pending = None
            if ok:
                self.successes += 1
                self.failures = 0
                if self.successes >= self.probe.success_threshold:
                    self.ever_succeeded = True
            else:
                self.failures += 1
                self.successes = 0
        if now >= self.next_run:
            self.next_run = now + self.probe.period
            self.pending = self.executor.submit(check, self.probe)

    @property
    def failed(self) -> bool:
        return self.failures >= self.probe.failure_threshold

    @property
    def passing(self) -> bool:
        return self.successes >= self.probe.success_threshold
