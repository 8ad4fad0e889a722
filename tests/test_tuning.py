"""Process tuning of `kleidi serve`: one CPU for all its threads, gRPC's I/O on the poller thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kleidi import tuning
from tests.backends.softhsm import SoftHsm
from tests.conftest import pkcs11_config
from tests.plugin import REPO, KleidiProcess, wait_for


def _thread_cpus(pid: int) -> dict[int, set[int]]:
    """The CPUs each thread of ``pid`` may run on, by thread id."""
    found = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(task)] = os.sched_getaffinity(int(task))
        except ProcessLookupError:
            continue
    return found


def _busiest_thread(pid: int) -> int:
    """The thread of ``pid`` that has used the most CPU time: under a stream of calls, the event loop."""

    def used(task: str) -> int:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return -1
        return int(fields[11]) + int(fields[12])  # utime + stime

    return int(max(os.listdir(f"/proc/{pid}/task"), key=used))


@pytest.mark.integration
@pytest.mark.parametrize("inline_calls", ["auto", "never"])  # never: every call through the worker pool
def test_auto_uses_one_cpu_for_sequential_calls_and_gives_the_loop_its_own_under_parallel_ones(
    plugin: KleidiProcess, inline_calls: str
) -> None:
    allowed = os.sched_getaffinity(0)
    plugin.config["cpu_affinity"] = "auto"
    plugin.config["pkcs11"]["inline_calls"] = inline_calls  # type: ignore[index]
    plugin.start()
    plugin.wait_healthy()
    assert plugin.proc is not None
    pid = plugin.proc.pid
    cpus = _thread_cpus(pid)
    assert len(cpus) > 3  # gRPC's poller, the event loop, health and probe threads, not only the main one
    if len(allowed) < 2:  # nothing to choose from: scheduling is left alone
        assert all(c == allowed for c in cpus.values())
        return
    one = {max(allowed)}
    assert all(c == one for c in cpus.values()), cpus
    stop = threading.Event()

    def caller() -> None:
        with plugin.client() as kms:
            while not stop.is_set():
                kms.encrypt(b"k" * 32)

    callers = [threading.Thread(target=caller) for _ in range(8)]
    for t in callers:
        t.start()
    others = allowed - one

    def loop_alone() -> bool:  # the event loop keeps its CPU, every other thread moves to the others
        cpus = _thread_cpus(pid)
        alone = [tid for tid, c in cpus.items() if c == one]
        return alone == [_busiest_thread(pid)] and all(c == others for c in cpus.values() if c != one)

    try:
        wait_for(loop_alone, 20, "the event loop alone on its CPU under parallel calls")
    finally:
        stop.set()
        for t in callers:
            t.join()
    with plugin.client() as kms:  # one caller again: back to one CPU after the hold time
        wait_for(
            lambda: kms.encrypt(b"k" * 32) and all(c == one for c in _thread_cpus(pid).values()), 20, "one CPU again"
        )


@pytest.mark.integration
def test_none_leaves_scheduling_alone(plugin: KleidiProcess) -> None:  # the default: nothing in the config
    assert "cpu_affinity" not in plugin.config
    plugin.start()
    plugin.wait_healthy()
    assert plugin.proc is not None
    assert all(c == os.sched_getaffinity(0) for c in _thread_cpus(plugin.proc.pid).values())


@pytest.mark.integration
def test_a_cpu_outside_the_allowed_set_stops_startup(plugin: KleidiProcess) -> None:
    plugin.config["cpu_affinity"] = max(os.sched_getaffinity(0)) + 1
    plugin.start(wait=False)
    assert plugin.wait_exit() != 0
    assert "cpu_affinity: CPU" in plugin.log() and "not available to this process" in plugin.log()


@pytest.mark.integration
def test_a_numbered_cpu_is_used(plugin: KleidiProcess) -> None:
    cpu = min(os.sched_getaffinity(0))
    plugin.config["cpu_affinity"] = cpu
    plugin.start()
    assert plugin.proc is not None
    pid = plugin.proc.pid
    wait_for(lambda: all(c == {cpu} for c in _thread_cpus(pid).values()), 5, f"every thread on CPU {cpu}")


@pytest.mark.unit
def test_grpc_experiments_default_and_operator_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    tuning.grpc_environment()
    assert os.environ["GRPC_EXPERIMENTS"] == "-event_engine_listener,-event_engine_for_all_other_endpoints"
    monkeypatch.setenv("GRPC_EXPERIMENTS", "event_engine_listener")
    tuning.grpc_environment()
    assert os.environ["GRPC_EXPERIMENTS"] == "event_engine_listener"


@pytest.mark.integration
def test_serve_works_with_the_operators_own_grpc_experiments(tmp_path: Path, softhsm: SoftHsm) -> None:
    env = {**softhsm.env, "GRPC_EXPERIMENTS": "event_engine_listener"}
    with KleidiProcess(tmp_path / "own", pkcs11_config(softhsm), env=env) as proc:
        proc.start()
        with proc.client() as kms:
            wrapped = kms.encrypt(b"k" * 32)
            assert kms.decrypt(wrapped.ciphertext, wrapped.key_id) == b"k" * 32


class _Context:
    """Stands in for grpc.aio's ServicerContext: done callbacks run when the test says the call ended."""

    def __init__(self) -> None:
        self.callbacks: list[object] = []

    def add_done_callback(self, callback: object) -> None:
        self.callbacks.append(callback)

    def end(self) -> None:
        self.callbacks.pop()(self)  # type: ignore[operator]


class _Placement:
    """A CpuPlacement on CPU 3 of {0, 1, 2, 3} with a clock the test moves and affinity passes recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 100.0
        self.applied: list[tuple[set[int], set[int] | None]] = []

        def set_affinity(cpus: set[int], strict: bool = True, caller: set[int] | None = None) -> None:
            self.applied.append((set(cpus), caller))

        monkeypatch.setattr(tuning, "_set_affinity", set_affinity)
        monkeypatch.setattr(tuning.CpuPlacement, "_clock", staticmethod(lambda: self.now))
        self.placement = tuning.CpuPlacement(3, {0, 1, 2, 3})

    def sequential(self, calls: int, seconds: float) -> None:
        one = _Context()
        for _ in range(calls):
            self.now += seconds / calls
            self.placement.call_started(one)
            one.end()

    def parallel(self, calls: int, seconds: float) -> None:
        """``calls`` calls with eight in flight at any time."""
        flight: list[_Context] = []
        for _ in range(calls):
            self.now += seconds / calls
            if len(flight) == 8:
                flight.pop(0).end()
            flight.append(_Context())
            self.placement.call_started(flight[-1])
        for context in flight:
            context.end()


SPREAD = ({0, 1, 2}, {3})  # the event loop (the caller) keeps CPU 3, every other thread moves off it
PINNED = ({3}, None)


@pytest.mark.unit
def test_placement_follows_overlap_with_hysteresis(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _Placement(monkeypatch)
    assert p.applied == [PINNED]
    p.sequential(100, 1.0)
    assert p.applied == [PINNED] and not p.placement.spread
    p.parallel(30, 0.01)  # spreads at once, not after a hold time
    assert p.placement.spread and p.applied == [PINNED, SPREAD]
    p.sequential(300, 0.3)  # calm again, but for less than a second
    assert p.placement.spread and p.applied == [PINNED, SPREAD]
    p.sequential(100, 1.0)
    assert not p.placement.spread and p.applied[-1] == PINNED and PINNED not in p.applied[1:-1]


@pytest.mark.unit
def test_a_lull_after_a_long_burst_does_not_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hold counts from the last overlap, not from the switch: bursts of several seconds with short
    lulls between them stay spread."""
    p = _Placement(monkeypatch)
    for _ in range(5):
        p.parallel(6000, 1.5)
        p.sequential(300, 0.1)
    assert p.placement.spread
    assert [a for a in p.applied if a == PINNED] == [PINNED]  # only the initial one: it never pinned again


@pytest.mark.unit
def test_threads_started_while_spread_are_moved_within_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pool workers start lazily, from the loop, and inherit its CPU: the move is repeated once a second."""
    p = _Placement(monkeypatch)
    p.parallel(30, 0.01)
    assert p.applied == [PINNED, SPREAD]
    p.parallel(100, 0.5)
    assert p.applied == [PINNED, SPREAD]
    p.parallel(100, 0.6)
    assert p.applied == [PINNED, SPREAD, SPREAD]


@pytest.mark.unit
def test_placement_stops_adapting_instead_of_failing_a_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cpuset changed under kleidi makes sched_setaffinity fail: the call goes on, placement stops."""
    calls: list[set[int]] = []

    def setaffinity(pid: int, cpus: set[int]) -> None:
        calls.append(set(cpus))
        if len(calls) > 1:
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(tuning.os, "sched_setaffinity", setaffinity)
    monkeypatch.setattr(tuning.os, "listdir", lambda path: ["1"])
    placement = tuning.CpuPlacement(1, {0, 1})
    contexts = [_Context() for _ in range(200)]
    for context in contexts:  # calls that overlap: placement wants every CPU, and the kernel refuses
        placement.call_started(context)
    assert not placement.spread
    tries = len(calls)
    for _ in range(200):
        placement.call_started(_Context())
    assert len(calls) == tries  # stopped: no more attempts


@pytest.mark.unit
def test_set_affinity_gives_the_calling_thread_its_own_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    me = threading.get_native_id()
    seen: dict[int, set[int]] = {}
    monkeypatch.setattr(tuning.os, "listdir", lambda path: [str(me), "1", "2"])
    monkeypatch.setattr(tuning.os, "sched_setaffinity", lambda tid, cpus: seen.__setitem__(tid, set(cpus)))
    tuning._set_affinity({0, 1}, caller={3})
    assert seen == {me: {3}, 1: {0, 1}, 2: {0, 1}}


@pytest.mark.unit
def test_the_grpc_experiments_exist_in_the_installed_grpcio() -> None:
    """gRPC ignores unknown experiments with one log line; this fails when an upgrade drops the ones set."""
    code = (
        "import asyncio, os\n"
        "from kleidi import tuning\n"
        "os.environ.pop('GRPC_EXPERIMENTS', None)\n"
        "tuning.grpc_environment()\n"
        "import grpc\n"
        "async def main():\n"
        "    server = grpc.aio.server()\n"
        "    await server.start()\n"
        "    await server.stop(0)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO, check=True
    )
    assert "Unknown experiment" not in done.stderr
    bogus = code.replace("tuning.grpc_environment()", "os.environ['GRPC_EXPERIMENTS'] = 'no_such_experiment'")
    done = subprocess.run(
        [sys.executable, "-c", bogus], capture_output=True, text=True, timeout=60, cwd=REPO, check=True
    )
    assert "Unknown experiment: no_such_experiment" in done.stderr  # the check above can see the warning
