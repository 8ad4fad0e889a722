"""Process tuning of `kleidi serve`: gRPC's I/O on the poller thread; the CPU placement that went away."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kleidi import tuning
from kleidi.config import validate
from tests.backends.softhsm import SoftHsm
from tests.conftest import pkcs11_config
from tests.plugin import REPO, KleidiProcess


@pytest.mark.integration
@pytest.mark.parametrize("value", ["auto", 1, "anything at all"])
def test_a_retired_cpu_affinity_is_accepted_with_a_warning_that_names_it(plugin: KleidiProcess, value: object) -> None:
    """cpu_affinity went away (docs/performance.md): a config that still sets it, with any value it once took or
    not, serves as before and says what to remove, rather than turning an upgrade into a KMS outage."""
    plugin.config["cpu_affinity"] = value
    plugin.start()
    plugin.wait_healthy()
    with plugin.client() as kms:
        wrapped = kms.encrypt(b"k" * 32)
        assert kms.decrypt(wrapped.ciphertext, wrapped.key_id) == b"k" * 32
    warnings = [json.loads(line) for line in plugin.log().splitlines() if "retired setting" in line]
    assert [(w["level"], w["setting"]) for w in warnings] == [("warning", "cpu_affinity")], plugin.log()
    assert plugin.proc is not None  # and it leaves its threads where the scheduler put them
    for task in os.listdir(f"/proc/{plugin.proc.pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            assert os.sched_getaffinity(int(task)) == os.sched_getaffinity(0)


@pytest.mark.integration
def test_the_retired_setting_warning_shows_even_when_warnings_are_not_logged(plugin: KleidiProcess) -> None:
    plugin.config.update(cpu_affinity="auto", log_level="error")
    plugin.start()
    assert "kleidi: retired setting cpu_affinity ignored; remove it from the config" in plugin.log()


@pytest.mark.unit
def test_a_config_without_retired_settings_reports_none() -> None:
    config = validate({"provider": "pkcs11", "pkcs11": {"token_label": "t", "pin_env": "PIN", "key_label": "k"}})
    assert config.retired() == []
    retired = validate({**config.model_dump(exclude_unset=True), "cpu_affinity": "none"}).retired()
    assert [name for name, _ in retired] == ["cpu_affinity"] and "docs/performance.md" in retired[0][1]


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
