"""Process-wide settings that make `kleidi serve` answer faster, applied before it starts serving: the gRPC
experiments always, the CPU placement when `cpu_affinity` asks for one (the default, none, leaves it to the
scheduler).

One request crosses several threads (gRPC's poller, the event loop, and unless told otherwise gRPC's
EventEngine threads). Measured with the apiserver's Go client on a 2-CPU VM, each cross-CPU wake-up
between them costs tens of microseconds, more than the SoftHSM call itself:
- gRPC's older, stable I/O path reads the sockets on the poller thread, one hop fewer per request (a
  response is still written by the thread that sends it, the event loop);
- keeping all of kleidi's threads on one CPU (`cpu_affinity: auto`, opt-in) turns the remaining hand-offs
  into same-CPU switches.
One CPU is also a ceiling, though: with callers in parallel, gRPC's C core reads and writes sockets
without the GIL, on another CPU if it may. So `cpu_affinity: auto` is adaptive: one CPU while calls
arrive one at a time (the apiserver's usual pattern); while they overlap, the event loop (the one thread
that is busy all the time then) keeps that CPU to itself and every other thread moves to the others."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

# Nothing here may import grpc (kleidi.errors does): grpc_environment() has to run before that import.

log = logging.getLogger("kleidi")

# Read by gRPC when it is first imported: set before that, and never over the operator's own choice.
_GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_for_all_other_endpoints"


def grpc_environment() -> None:
    """Socket I/O on gRPC's poller thread instead of separate EventEngine threads. Must run before
    `import grpc`; a GRPC_EXPERIMENTS already set by the operator wins."""
    os.environ.setdefault("GRPC_EXPERIMENTS", _GRPC_EXPERIMENTS)


class CpuPlacement:
    """`cpu_affinity: auto`: every thread on one CPU while KMS calls come one at a time; while they
    overlap, the event loop alone on that CPU and every other thread on the other allowed ones, so the
    loop's cache holds only its own work. Fed by the server on its event loop, so it needs no lock.

    The signal is how often a call starts while another is still in flight: never with one sequential
    caller, about a quarter of calls with eight parallel ones. A moving average with a gap between the
    two thresholds keeps a mixed load from flapping. Quick to spread, so a burst of parallel calls (the
    apiserver's decrypts after a restart) is not squeezed onto one CPU; slow to go back: only after
    ``_HOLD`` seconds without overlap, so a lull between bursts does not pin, and it pins at most once
    per ``_HOLD``."""

    _WEIGHT = 0.02  # of each new call in the average: it reflects roughly the last 50 calls
    _SPREAD_ABOVE = 0.08
    _PIN_BELOW = 0.02
    _HOLD = 1.0
    _clock = staticmethod(time.monotonic)

    def __init__(self, cpu: int, allowed: set[int]) -> None:
        self.cpu = cpu
        self._allowed = allowed
        self.spread = False
        self._overlap = 0.0
        self._in_flight = 0
        self._applied = self._overlapped = self._clock()
        self._stopped = False
        _set_affinity({cpu})

    def call_started(self, context: Any) -> None:
        """Count a call until gRPC reports it done; ``context`` is its grpc.aio ServicerContext."""
        self._in_flight += 1
        context.add_done_callback(self._call_done)
        self._overlap += self._WEIGHT * ((self._in_flight > 1) - self._overlap)
        if self._stopped:
            return
        if not self.spread:
            if self._overlap > self._SPREAD_ABOVE:
                self._apply(spread=True)
            return
        now = self._clock()
        if self._overlap >= self._PIN_BELOW:
            self._overlapped = now
        if now - self._overlapped >= self._HOLD:
            self._apply(spread=False)
        elif now - self._applied >= self._HOLD:
            # Threads started since the last pass took their creator's CPUs: pool workers start from the
            # loop and would share its CPU, and gRPC starts threads of its own. Once a second, move them too.
            self._apply(spread=True)

    def _apply(self, spread: bool) -> None:
        try:
            if spread:  # this runs on the event loop: it keeps its CPU, everything else moves off it
                _set_affinity(self._allowed - {self.cpu}, caller={self.cpu})
            else:
                _set_affinity({self.cpu})
        except OSError as exc:
            # The CPUs allowed to the process changed under us (a cpuset update): leave placement to the
            # scheduler from now on rather than fail a request.
            self._stopped = True
            _set_affinity(set(range(os.cpu_count() or 1)), strict=False)  # the kernel keeps the cpuset
            log.warning("CPU placement stopped", extra={"reason": exc.strerror})
            return
        if spread and not self.spread:
            self._overlapped = self._clock()
        self.spread = spread
        self._applied = self._clock()
        log.debug("CPU placement", extra={"cpus": "event loop alone" if spread else self.cpu})

    def _call_done(self, context: Any) -> None:
        self._in_flight -= 1


def place(setting: str | int) -> CpuPlacement | None:
    """Apply ``cpu_affinity``. "auto" takes the highest-numbered CPU this process may use as its one CPU
    (CPU 0 usually carries most interrupts) and adapts; a number pins to that CPU for good; "none"
    leaves scheduling alone. A thread started later runs where the thread that started it may run; while
    auto is spread, it is moved off the event loop's CPU within a second."""
    allowed = os.sched_getaffinity(0)
    if setting == "none":
        return None
    if setting == "auto":
        if len(allowed) < 2:
            return None
        placement = CpuPlacement(max(allowed), allowed)
        log.info("one CPU while calls come one at a time", extra={"cpu": placement.cpu})
        return placement
    cpu = int(setting)
    if cpu not in allowed:
        from kleidi.errors import ConfigError

        listed = ",".join(str(c) for c in sorted(allowed))
        raise ConfigError(f"cpu_affinity: CPU {cpu} is not available to this process (allowed: {listed})")
    _set_affinity({cpu})
    log.info("pinned to one CPU", extra={"cpu": cpu})
    return None


def _set_affinity(cpus: set[int], strict: bool = True, caller: set[int] | None = None) -> None:
    """Every thread of the process to ``cpus``; the calling thread to ``caller`` instead, when given."""
    me = threading.get_native_id()
    for task in os.listdir("/proc/self/task"):
        tid = int(task)
        try:
            os.sched_setaffinity(tid, caller if caller is not None and tid == me else cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except OSError:
            if strict:
                raise
