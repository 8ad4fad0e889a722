"""tests/parallel.py: how `make test` spreads modules over xdist workers names real modules, keeps the host-path
modules together and starts the longest units first."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import parallel

pytestmark = pytest.mark.unit

TESTS = Path(__file__).parent


def test_every_module_named_exists() -> None:
    """A renamed module would silently leave the host-path unit (and run beside it) or lose its early start."""
    named = parallel.HOST_PATH_MODULES | {unit for unit in parallel.LONGEST_FIRST if unit != parallel.HOST_PATHS}
    assert sorted(name for name in named if not (TESTS / name).is_file()) == []


def test_host_path_modules_are_one_unit_and_the_others_one_each() -> None:
    assert {parallel.unit_of(f"tests/{name}") for name in parallel.HOST_PATH_MODULES} == {parallel.HOST_PATHS}
    assert parallel.unit_of("tests/test_config.py") == "test_config.py"


def test_the_longest_units_come_first_and_file_order_after_them() -> None:
    modules = ["test_cli.py", "test_config.py", "test_playbook_rotate.py", "test_simnode.py"]
    ordered = sorted((f"tests/{name}" for name in modules), key=parallel.rank)
    assert ordered == [f"tests/{name}" for name in ("test_simnode.py", "test_playbook_rotate.py", *modules[:2])]


def test_a_workers_basetemp_is_as_short_as_a_serial_runs_but_for_two_characters() -> None:
    worker = SimpleNamespace(option=SimpleNamespace(basetemp="/tmp/pytest-of-root/pytest-7/popen-gw1"), workerinput={})
    parallel.short_basetemp(worker)
    assert worker.option.basetemp == "/tmp/pytest-of-root/pytest-7/1"
    serial = SimpleNamespace(option=SimpleNamespace(basetemp=None))
    parallel.short_basetemp(serial)
    assert serial.option.basetemp is None
