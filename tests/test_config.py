"""The configuration file is the user-facing contract: every error names the field in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kleidi.config import load, parse_duration, validate
from kleidi.errors import ConfigError

pytestmark = pytest.mark.unit

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _write(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "kleidi.yaml"
    path.write_text(json.dumps(data))
    return path


def _base() -> dict[str, object]:
    return {
        "provider": "pkcs11",
        "pkcs11": {"module": MODULE, "token_label": "kleidi", "pin_env": "KLEIDI_PIN", "key_label": "kek-1"},
    }


def test_the_documented_example_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "kleidi.yaml"
    path.write_text(
        "listen: unix:///run/kleidi/kleidi.sock\nprovider: pkcs11\nhealth_interval: 30s\n"
        "metrics_listen: 127.0.0.1:8095\nlog_level: info\npkcs11:\n"
        f"  module: {MODULE}\n  token_label: kleidi\n  pin_file: /etc/kleidi/pin\n"
        "  key_label: kleidi-kek-1\n  mechanism: aes-gcm\n"
    )
    cfg = load(path)
    assert cfg.socket_path == "/run/kleidi/kleidi.sock"
    assert cfg.health_interval == 30.0 and cfg.socket_mode == 0o600 and cfg.metrics_address == ("127.0.0.1", 8095)
    assert cfg.pkcs11 is not None and cfg.pkcs11.pool_size == 4


REMOTE: dict[str, Any] = {
    "provider": "remote",
    "remote": {"endpoints": ["ks:8443"], "ca_cert": "ca.pem", "client_cert": "c.pem", "client_key": "k.pem"},
}
SERVE = {"listen": "0.0.0.0:8443", "ca_cert": "ca.pem", "cert": "s.pem", "key": "s-key.pem"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"listn": "x"}, "config: listn: unknown key"),
        ({"provider": "remote"}, "provider is remote but the remote section is missing"),
        ({**REMOTE, "remote": {**REMOTE["remote"], "endpoints": []}}, "config: remote.endpoints:"),
        ({**REMOTE, "remote": {**REMOTE["remote"], "endpoints": ["https://ks:8443"]}}, "must be host:port"),
        ({**REMOTE, "remote": {**REMOTE["remote"], "endpoints": ["::1:8443"]}}, "must be in brackets"),
        ({**REMOTE, "remote": {**REMOTE["remote"], "endpoints": ["ks:8443", "ks:8443"]}}, "must not repeat"),
        ({**REMOTE, "serve_remote": SERVE}, "serve_remote needs a local provider"),
        ({"serve_remote": {**SERVE, "listen": "8443"}}, "config: serve_remote.listen: listen must be host:port"),
        ({"serve_remote": {**SERVE, "client_ca": "x"}}, "config: serve_remote.client_ca: unknown key"),
        ({"provider": "hsm"}, "config: provider:"),
        ({"listen": "tcp://1.2.3.4:5"}, "config: listen: listen must be unix:///absolute/path"),
        ({"listen": "unix:///@abstract"}, "abstract sockets"),
        ({"health_interval": "-3s"}, "config: health_interval:"),
        ({"socket_mode": "0666"}, "config: socket_mode:"),
        ({"metrics_listen": "nope"}, "config: metrics_listen: metrics_listen must be host:port"),
        ({"metrics_listen": "127.0.0.1:99999"}, "config: metrics_listen:"),
        ({"health_interval": "2h"}, "config: health_interval: must be at most 1h"),
        ({"pkcs11": {"token_label": "kleidi", "pin_env": "P", "key_label": "k", "module": "/nope.so"}}, "/nope.so"),
        ({"pkcs11": {"module": MODULE, "pin_env": "P", "key_label": "k"}}, "pkcs11.token_label: required but missing"),
        (
            {"pkcs11": {"module": MODULE, "token_label": "t", "pin_env": "P", "pin_file": "/f", "key_label": "k"}},
            "pin",
        ),
        (
            {
                "pkcs11": {
                    "module": MODULE,
                    "token_label": "t",
                    "pin_env": "P",
                    "key_label": "k",
                    "mechanism": "aes-cbc-hmac",
                }
            },
            "hmac_key_label is required",
        ),
        ({"provider": "vault"}, "the vault section is missing"),
        ({"health_timeout": "1s"}, "config: health_timeout must be longer than pkcs11.session_timeout (2s)"),
        (
            {**REMOTE, "health_timeout": "3s"},
            "config: health_timeout (3s) must be longer than 3 x remote.timeout (1s)",
        ),
        (
            {**REMOTE, "remote": {**REMOTE["remote"], "timeout": "4s"}},
            "config: health_timeout (10s) must be longer than 3 x remote.timeout (4s)",
        ),
    ],
)
def test_errors_name_the_field(tmp_path: Path, change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, {**_base(), **change}))
    text = str(info.value)
    assert message in text and "\n" not in text


def test_errors_never_echo_values(tmp_path: Path) -> None:
    data = _base()
    data["pkcs11"] = {**data["pkcs11"], "pin_file": "s3cr3t-pin-value"}  # type: ignore[dict-item]
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, data))
    assert "s3cr3t" not in str(info.value)


def test_overrides_beat_env_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {**_base(), "log_level": "warning"})
    monkeypatch.setenv("KLEIDI_LOG_LEVEL", "error")
    assert load(path).log_level == "error"
    assert load(path, {"log_level": "debug", "listen": "unix:///tmp/x.sock"}).log_level == "debug"


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("provider: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML or JSON at line"):
        load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("250ms", 0.25), ("2m", 120.0), (5, 5.0), ("1.5h", 5400.0)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_pin_comes_from_file_or_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin = tmp_path / "pin"
    pin.write_text("123456\n")
    data = _base()
    data["pkcs11"] = {**data["pkcs11"], "pin_env": None, "pin_file": str(pin)}  # type: ignore[dict-item]
    cfg = load(_write(tmp_path, data))
    assert cfg.pkcs11 is not None and cfg.pkcs11.pin() == "123456"
    monkeypatch.delenv("KLEIDI_PIN", raising=False)
    env_cfg = load(_write(tmp_path, _base()))
    assert env_cfg.pkcs11 is not None
    with pytest.raises(ConfigError, match="KLEIDI_PIN is not set"):
        env_cfg.pkcs11.pin()


@pytest.mark.parametrize(
    ("address", "allow_http", "accepted"),
    [
        ("https://vault.example:8200", False, True),
        ("http://vault.example:8200", False, False),
        ("http://10.0.0.7:8200", False, False),
        ("http://vault.example:8200", True, True),
        ("http://127.0.0.1:8200", False, True),
        ("http://127.8.9.10:8200", False, True),
        ("http://localhost:8200", False, True),
        ("http://[::1]:8200", False, True),
    ],
)
def test_plain_http_to_vault_only_to_loopback_or_when_allowed(address: str, allow_http: bool, accepted: bool) -> None:
    vault = {"address": address, "allow_http": allow_http, "auth": {"method": "token", "token_env": "T"}}
    data = {"provider": "vault", "vault": vault}
    if accepted:
        assert validate(data).vault is not None
        return
    with pytest.raises(ConfigError) as info:
        validate(data)
    assert str(info.value).startswith("config: vault: ") and "plain http" in str(info.value)
    assert "vault.allow_http: true" in str(info.value)


def test_remote_and_serve_remote_sections(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, {**_base(), **REMOTE, "remote": {**REMOTE["remote"], "endpoints": ["[::1]:8443"]}}))
    assert cfg.remote is not None and cfg.remote.timeout == 1.0 and cfg.remote.endpoints == ["[::1]:8443"]
    # the chart's defaults (health_timeout 10s, remote.timeout 1s) pass, and so does the bound just above 3 x
    assert cfg.health_timeout == 10.0 and cfg.remote.timeout == 1.0
    cfg = load(_write(tmp_path, {**_base(), **REMOTE, "health_timeout": "3100ms"}))
    assert cfg.health_timeout == 3.1
    cfg = load(_write(tmp_path, {**_base(), "serve_remote": {**SERVE, "listen": "[::]:8443"}}))
    assert cfg.serve_remote is not None and cfg.serve_remote.address == ("::", 8443)
    assert cfg.serve_remote.allowed_client_names == []
