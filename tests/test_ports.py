"""tests/ports.py: the ports the tests' servers get are never another test process's, nor a listening one's, nor in
the kernel's ephemeral range. The pools here use a window far above the workers' stretches, picked at random so
that two test runs at once hardly meet there (the lock file is the real one, so they stay clear of every other
test process anyway)."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import textwrap

import pytest

from tests import ports
from tests.plugin import REPO

pytestmark = pytest.mark.unit

LOW = 30000 + 100 * random.randrange(25)
HIGH = LOW + 100


def test_ports_are_distinct_below_the_ephemeral_range_and_bindable() -> None:
    given = [ports.free_port() for _ in range(50)]
    assert len(set(given)) == 50
    with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
        ephemeral = int(handle.read().split()[0])
    assert all(ports.LOW <= port < min(ephemeral, 32768) for port in given)
    for port in given:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_another_process_never_gets_a_port_this_one_holds() -> None:
    """Both pools start at the same port: the second takes only what the first does not hold."""
    mine = ports.PortPool(LOW, HIGH, start=LOW)
    held = [mine.port() for _ in range(10)]
    assert held == list(range(LOW, LOW + 10))
    code = textwrap.dedent(
        f"""
        from tests.ports import PortPool
        pool = PortPool({LOW}, {HIGH}, start={LOW})
        print(*(pool.port() for _ in range(5)), pool.pair())
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert [int(port) for port in done.stdout.split()] == [*range(LOW + 10, LOW + 15), LOW + 15]


def test_a_port_something_listens_on_is_skipped() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", LOW + 50))
        taken.listen()
        pool = ports.PortPool(LOW, HIGH, start=LOW + 50)
        assert pool.port() == LOW + 51
        # A pair needs both: LOW + 52 and LOW + 53 follow.
        assert pool.pair() == LOW + 52


def test_a_pair_skips_a_taken_second_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", LOW + 71))
        taken.listen()
        pool = ports.PortPool(LOW, HIGH, start=LOW + 70)
        assert pool.pair() == LOW + 72
        assert pool.port() == LOW + 74


def test_each_xdist_worker_starts_in_its_own_stretch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    first = ports.PortPool().port()
    assert ports.LOW + ports.STRETCH <= first < ports.LOW + 2 * ports.STRETCH
