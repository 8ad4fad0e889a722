"""Process-wide gRPC settings for `kleidi serve`, applied before gRPC is imported.

One request crosses several threads (gRPC's poller, the event loop, and unless told otherwise gRPC's
EventEngine threads), and each wake-up that crosses CPUs is expensive under virtualisation. gRPC's older,
stable I/O path reads the sockets on the poller thread: one hop fewer per request (a response is still written
by the thread that sends it, the event loop). docs/architecture.md has the reasoning."""

from __future__ import annotations

import os

# Nothing here may import grpc (kleidi.errors does): grpc_environment() has to run before that import.

# Read by gRPC when it is first imported: set before that, and never over the operator's own choice.
_GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_for_all_other_endpoints"


def grpc_environment() -> None:
    """Socket I/O on gRPC's poller thread instead of separate EventEngine threads. Must run before
    `import grpc`; a GRPC_EXPERIMENTS already set by the operator wins."""
    os.environ.setdefault("GRPC_EXPERIMENTS", _GRPC_EXPERIMENTS)
