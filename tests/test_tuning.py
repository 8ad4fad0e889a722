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


def _thread_cpus(pid: int) -> list[set[int]]:
    """The CPUs each thread of ``pid`` may run on."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found.append(os.sched_getaffinity(int(task)))
        except ProcessLookupError:
            continue
    return found


@pytest.mark.parametrize("inline_calls", ["auto", "never"])  # never: every call through the worker pool
def test_auto_uses_one_cpu_for_sequential_calls_and_gives_the_loop_its_own_under_parallel_ones(
    plugin: KleidiProcess, inline_calls: str
) -> None:
    allowed = os.sched_getaffinity(0)
    plugin.config["pkcs11"]["inline_calls"] = inline_calls  # type: ignore[index]
    plugin.start()
    plugin.wait_healthy()
    assert plugin.proc is not None
    pid = plugin.proc.pid
    cpus = _thread_cpus(pid)
    assert len(cpus) > 3  # gRPC's poller, the event loop, health and probe threads, not only the main one
    if len(allowed) < 2:  # nothing to choose from: scheduling is left alone
        assert all(c == allowed for c in cpus)
        return
    one = {max(allowed)}
    assert all(c == one for c in cpus), cpus
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
        return cpus.count(one) == 1 and all(c == others for c in cpus if c != one)

    try:
        wait_for(loop_alone, 20, "the event loop alone on its CPU under parallel calls")
    finally:
        stop.set()
        for t in callers:
            t.join()
    with plugin.client() as kms:  # one caller again: back to one CPU after the hold time
        wait_for(lambda: kms.encrypt(b"k" * 32) and all(c == one for c in _thread_cpus(pid)), 20, "one CPU again")


def test_none_leaves_scheduling_alone(plugin: KleidiProcess) -> None:
    plugin.config["cpu_affinity"] = "none"
    plugin.start()
    plugin.wait_healthy()
    assert plugin.proc is not None
    assert all(c == os.sched_getaffinity(0) for c in _thread_cpus(plugin.proc.pid))


def test_a_cpu_outside_the_allowed_set_stops_startup(plugin: KleidiProcess) -> None:
    plugin.config["cpu_affinity"] = max(os.sched_getaffinity(0)) + 1
    plugin.start(wait=False)
    assert plugin.wait_exit() != 0
    assert "cpu_affinity: CPU" in plugin.log() and "not available to this process" in plugin.log()


def test_a_numbered_cpu_is_used(plugin: KleidiProcess) -> None:
    cpu = min(os.sched_getaffinity(0))
    plugin.config["cpu_affinity"] = cpu
    plugin.start()
    assert plugin.proc is not None
    pid = plugin.proc.pid
    wait_for(lambda: all(c == {cpu} for c in _thread_cpus(pid)), 5, f"every thread on CPU {cpu}")


def test_grpc_experiments_default_and_operator_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    tuning.grpc_environment()
    assert os.environ["GRPC_EXPERIMENTS"] == "-event_engine_listener,-event_engine_for_all_other_endpoints"
    monkeypatch.setenv("GRPC_EXPERIMENTS", "event_engine_listener")
    tuning.grpc_environment()
    assert os.environ["GRPC_EXPERIMENTS"] == "event_engine_listener"


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


def test_placement_stops_adapting_instead_of_failing_a_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cpuset changed under kleidi makes sched_setaffinity fail: the call goes on, placement stops."""
    calls: list[set[int]] = []

    def setaffinity(pid: int, cpus: set[int]) -> None:
        calls.append(set(cpus))
        if len(calls) > 1:
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(tuning.os, "sched_setaffinity", setaffinity)
    monkeypatch.setattr(tuning.os, "listdir", lambda path: ["1"])
    monkeypatch.setattr(tuning.CpuPlacement, "_HOLD", 0.0)
    placement = tuning.CpuPlacement(1, {0, 1})
    contexts = [_Context() for _ in range(200)]
    for context in contexts:  # calls that overlap: placement wants every CPU, and the kernel refuses
        placement.call_started(context)
    assert not placement.spread
    tries = len(calls)
    for _ in range(200):
        placement.call_started(_Context())
    assert len(calls) == tries  # stopped: no more attempts


def test_placement_follows_overlap_with_hysteresis(monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[tuple[set[int], set[int] | None]] = []

    def set_affinity(cpus: set[int], strict: bool = True, caller: set[int] | None = None) -> None:
        applied.append((set(cpus), caller))

    monkeypatch.setattr(tuning, "_set_affinity", set_affinity)
    monkeypatch.setattr(tuning.CpuPlacement, "_HOLD", 0.0)
    placement = tuning.CpuPlacement(3, {0, 1, 2, 3})
    assert applied == [({3}, None)]
    one = _Context()
    for _ in range(100):  # one call at a time: each ends before the next starts
        placement.call_started(one)
        one.callbacks.pop()(one)  # type: ignore[operator]
    assert applied == [({3}, None)] and not placement.spread
    busy = [_Context() for _ in range(30)]
    for context in busy:  # thirty calls in flight together
        placement.call_started(context)
    assert placement.spread and applied[-1] == ({0, 1, 2}, {3})  # the loop (the caller) keeps CPU 3
    for context in busy:
        context.callbacks.pop()(context)  # type: ignore[operator]
    for _ in range(300):
        placement.call_started(one)
        one.callbacks.pop()(one)  # type: ignore[operator]
    assert not placement.spread and applied[-1] == ({3}, None)


def test_placement_spreads_at_once_and_holds_before_going_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst right after a switch is not kept on one CPU; a lull right after spreading does not pin."""
    applied: list[set[int]] = []
    monkeypatch.setattr(tuning, "_set_affinity", lambda cpus, strict=True, caller=None: applied.append(set(cpus)))
    clock = [100.0]
    monkeypatch.setattr(tuning.time, "monotonic", lambda: clock[0])
    placement = tuning.CpuPlacement(1, {0, 1})  # just switched (to one CPU)
    busy = [_Context() for _ in range(30)]
    for context in busy:
        placement.call_started(context)
    assert placement.spread and applied[-1] == {0}  # at once, not after the hold time
    for context in busy:
        context.callbacks.pop()(context)  # type: ignore[operator]
    one = _Context()
    for _ in range(300):  # sequential again, but within the hold time: stays spread
        clock[0] += 0.001
        placement.call_started(one)
        one.callbacks.pop()(one)  # type: ignore[operator]
    assert placement.spread
    clock[0] += tuning.CpuPlacement._HOLD
    placement.call_started(one)
    one.callbacks.pop()(one)  # type: ignore[operator]
    assert not placement.spread and applied[-1] == {1}


def test_a_thread_started_while_spread_is_moved_off_the_loops_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pool workers start lazily, from the loop: they inherit its CPU and are moved at the next call."""
    applied: list[set[int]] = []
    monkeypatch.setattr(tuning, "_set_affinity", lambda cpus, strict=True, caller=None: applied.append(set(cpus)))
    placement = tuning.CpuPlacement(1, {0, 1})
    busy = [_Context() for _ in range(30)]
    for context in busy:
        placement.call_started(context)
    assert placement.spread and applied == [{1}, {0}]
    placement.call_started(_Context())
    assert len(applied) == 2  # nothing changed: nothing to do
    done = threading.Event()
    worker = threading.Thread(target=done.wait)
    worker.start()
    try:
        placement.call_started(_Context())
        assert applied == [{1}, {0}, {0}]
        placement.call_started(_Context())
        assert len(applied) == 3
    finally:
        done.set()
        worker.join()


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
