"""Fixtures shared by every test module (a SoftHSM2 token and a kleidi process serving it), and the check that
every test is marked unit or integration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import parallel
from tests.backends.softhsm import SoftHsm
from tests.plugin import KleidiProcess

# Every test is one of these (pyproject.toml describes them; `make unit` runs the first kind).
KINDS = ("unit", "integration")


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything, so every test is checked on every run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = [item.nodeid for item in items if sum(item.get_closest_marker(kind) is not None for kind in KINDS) != 1]
    if wrong:
        raise pytest.UsageError(
            "every test needs exactly one of the markers unit and integration (a module's pytestmark or the "
            "test's own); these have none or both:\n  " + "\n  ".join(wrong)
        )
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (tests/parallel.py); a serial run keeps file order
        items.sort(key=lambda item: parallel.rank(item.nodeid.split("::", 1)[0]))  # stable: file order within


@pytest.hookimpl(tryfirst=True)  # before the tmp_path factory reads the basetemp
def pytest_configure(config: pytest.Config) -> None:
    parallel.short_basetemp(config)


@pytest.hookimpl(optionalhook=True)  # only with pytest-xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    return parallel.scheduler(config, log) if config.getvalue("dist") == "loadscope" else None


def pkcs11_config(hsm: SoftHsm, key_label: str = "kek-1", **pkcs11: object) -> dict[str, object]:
    return {"provider": "pkcs11", "health_interval": "1s", "pkcs11": hsm.config(key_label, **pkcs11)}


@pytest.fixture
def softhsm(tmp_path: Path) -> SoftHsm:
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    return hsm


@pytest.fixture
def plugin(tmp_path: Path, softhsm: SoftHsm) -> Iterator[KleidiProcess]:
    """A kleidi process on a fresh token, not yet started (tests adjust the config first)."""
    with KleidiProcess(tmp_path / "kleidi", pkcs11_config(softhsm), env=softhsm.env) as proc:
        yield proc


@pytest.fixture(scope="module")
def shared_hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    hsm = SoftHsm(tmp_path_factory.mktemp("hsm"))
    hsm.keygen("kek-1")
    return hsm


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, shared_hsm: SoftHsm) -> Iterator[KleidiProcess]:
    """One healthy kleidi process per module, for tests that do not change its state. It logs at debug,
    so the tests that look for secrets in the log see every line kleidi can write."""
    config = {**pkcs11_config(shared_hsm), "log_level": "debug"}
    with KleidiProcess(tmp_path_factory.mktemp("kleidi"), config, env=shared_hsm.env) as proc:
        proc.start()
        proc.wait_healthy()
        yield proc
