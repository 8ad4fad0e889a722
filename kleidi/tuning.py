"""Process-wide settings that make `kleidi serve` answer faster; both are applied before it starts serving.

One request crosses several threads (gRPC's poller, the event loop, and unless told otherwise gRPC's
EventEngine threads). Measured with the apiserver's Go client on a 2-CPU VM, each cross-CPU wake-up
between them costs tens of microseconds, more than the SoftHSM call itself:
- gRPC's older, stable I/O path does the socket work on the poller thread, one hop fewer per request;
- keeping all of kleidi's threads on one CPU turns the remaining hand-offs into same-CPU switches.
Python runs one thread at a time anyway, so one CPU costs kleidi no throughput (bench/ shows both)."""

from __future__ import annotations

import logging
import os

# Nothing here may import grpc (kleidi.errors does): grpc_environment() has to run before that import.

log = logging.getLogger("kleidi")

# Read by gRPC when it is first imported: set before that, and never over the operator's own choice.
_GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_for_all_other_endpoints"


def grpc_environment() -> None:
    """Socket I/O on gRPC's poller thread instead of separate EventEngine threads. Must run before
    `import grpc`; a GRPC_EXPERIMENTS already set by the operator wins."""
    os.environ.setdefault("GRPC_EXPERIMENTS", _GRPC_EXPERIMENTS)


def pin_cpu(setting: str | int) -> int | None:
    """Keep every thread of this process on one CPU; returns it, or None when nothing was pinned.

    "auto" takes the highest-numbered CPU this process may use (CPU 0 usually carries most interrupts),
    "none" leaves scheduling alone, a number names the CPU. Threads started later inherit the setting."""
    allowed = os.sched_getaffinity(0)
    if setting == "none":
        return None
    if setting == "auto":
        if len(allowed) < 2:
            return None
        cpu = max(allowed)
    else:
        cpu = int(setting)
        if cpu not in allowed:
            from kleidi.errors import ConfigError

            listed = ",".join(str(c) for c in sorted(allowed))
            raise ConfigError(f"cpu_affinity: CPU {cpu} is not available to this process (allowed: {listed})")
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), {cpu})
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    log.info("pinned to one CPU", extra={"cpu": cpu})
    return cpu
