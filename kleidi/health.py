"""Backend health: a periodic real round trip whose cached outcome feeds Status and the HTTP probes."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from kleidi.errors import KleidiError
from kleidi.observability import Metrics
from kleidi.providers.base import Provider

log = logging.getLogger("kleidi.health")

# While unhealthy, re-check at least this often: the apiserver polls Status every 10 s then.
_RETRY_WHILE_UNHEALTHY = 2.0


@dataclass(frozen=True, slots=True)
class HealthState:
    """The outcome of the last backend round trip."""

    ok: bool
    reason: str
    key_id: str


def describe_failure(exc: BaseException) -> str:
    """A short reason for healthz. kleidi's own errors are safe to show; anything else shows its type only."""
    if isinstance(exc, KleidiError):
        return str(exc)
    return f"internal error ({type(exc).__name__})"


class HealthMonitor:
    """Runs ``provider.check()`` on its own thread and publishes the outcome.

    Status and /healthz read ``state`` (one attribute read), so they never wait for the backend."""

    def __init__(self, provider: Provider, interval: float, metrics: Metrics, hung_after: float = 10.0) -> None:
        self._provider = provider
        self._interval = interval
        self._hung_after = hung_after
        self._running_since: float | None = None
        self._metrics = metrics
        self._state = HealthState(False, "starting: first backend check pending", "")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kleidi-health", daemon=True)

    @property
    def state(self) -> HealthState:
        """The last outcome; or unhealthy if the check now running has been stuck for too long, since a hung
        backend call would otherwise leave the last "ok" standing forever."""
        since = self._running_since
        if since is not None and time.monotonic() - since > self._hung_after:
            state = self._state
            self._metrics.healthy.set(0)  # the next finished check sets it again
            return HealthState(
                False, f"backend check has not returned for {time.monotonic() - since:.0f}s", state.key_id
            )
        return self._state

    def start(self) -> None:
        self._thread.start()

    def wait_first(self, timeout: float) -> bool:
        """Block until the first check has finished (or ``timeout``); True if it has."""
        return self._first.wait(timeout)

    def poke(self) -> None:
        """Ask for a check now, e.g. after a request saw the backend fail."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def check_once(self) -> HealthState:
        started = self._running_since = time.monotonic()
        try:
            self._provider.check()
            state = HealthState(True, "ok", self._provider.key_id())
        except Exception as exc:  # every failure, even a bug, must show as unhealthy, not kill the loop
            reason = describe_failure(exc)
            state = HealthState(False, reason, self._safe_key_id())
            if not isinstance(exc, KleidiError):
                log.error("health check crashed", exc_info=True)
        previous = self._state
        self._state = state
        self._running_since = None
        self._metrics.set_health(state.ok, state.key_id)
        check_ms = round((time.monotonic() - started) * 1000, 2)
        log.debug("backend check", extra={"ok": state.ok, "check_ms": check_ms})
        if state.ok != previous.ok or state.key_id != previous.key_id or state.reason != previous.reason:
            log.log(
                logging.INFO if state.ok else logging.WARNING,
                "backend healthy" if state.ok else "backend unhealthy",
                extra={
                    "reason": state.reason,
                    "key_id": state.key_id,
                    "check_ms": check_ms,
                },
            )
        return state

    def _safe_key_id(self) -> str:
        try:
            return self._provider.key_id()
        except Exception:
            return self._state.key_id

    def _run(self) -> None:
        while not self._stop.is_set():
            state = self.check_once()
            self._first.set()
            delay = self._interval if state.ok else min(self._interval, _RETRY_WHILE_UNHEALTHY)
            self._wake.wait(delay)
            self._wake.clear()
