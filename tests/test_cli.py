"""The `kleidi` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kleidi import __version__
from tests.backends.softhsm import SoftHsm
from tests.plugin import REPO, KleidiProcess, wait_for


def _kleidi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kleidi", *args], capture_output=True, text=True, cwd=REPO, timeout=60, check=False
    )


@pytest.mark.unit
def test_version() -> None:
    done = _kleidi("version")
    assert done.returncode == 0 and done.stdout.strip() == f"kleidi {__version__}"


@pytest.mark.integration
def test_check_passes_against_a_healthy_plugin(serving: KleidiProcess) -> None:
    done = _kleidi("check", "--socket", f"unix://{serving.socket}", "--v1")
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("Status", "Encrypt", "Decrypt round trip", "rejects bit-flipped ciphertext", "v1beta1 round trip"):
        assert f"ok    {step}" in done.stdout
    assert done.stdout.rstrip().endswith("PASS: 0 violation(s)")


@pytest.mark.integration
def test_check_fails_on_an_unhealthy_plugin(plugin: KleidiProcess, softhsm: SoftHsm) -> None:
    plugin.write_config(pkcs11=softhsm.config("absent-key"))
    plugin.start()
    wait_for(lambda: plugin.healthz()[0] == 503 and "absent-key" in plugin.healthz()[1], 15, "unhealthy")
    done = _kleidi("check", "--socket", plugin.socket)
    assert done.returncode == 1
    assert "FAIL  Status: healthz is \"no secret key labelled 'absent-key'" in done.stdout


@pytest.mark.unit
def test_check_fails_without_a_plugin(tmp_path: Path) -> None:
    done = _kleidi("check", "--socket", str(tmp_path / "none.sock"))
    assert done.returncode == 1 and "does not exist" in done.stdout


@pytest.mark.unit
def test_serve_requires_a_config() -> None:
    done = _kleidi("serve")
    assert done.returncode == 2 and "--config" in done.stderr
