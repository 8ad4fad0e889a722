"""The configuration model: one typed tree loaded from YAML or JSON, with env and CLI overrides."""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from kleidi.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """'30s', '500ms', '1m', '2h' or a bare number of seconds, to seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 500ms or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration such as 30s, 500ms or 1m, got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _file_mode(value: Any) -> int:
    """A socket mode written as '0600', 0o600 (YAML reads 0600 as octal) or 384."""
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f"expected an octal mode such as 0600, got {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
        raise ValueError("expected an octal mode such as 0600")
    if value & 0o007:
        raise ValueError("must not grant access to other users (the last digit must be 0)")
    return value


FileMode = Annotated[int, BeforeValidator(_file_mode)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _exactly_one_secret(section: str, file_value: str | None, env_value: str | None, what: str) -> None:
    if bool(file_value) == bool(env_value):
        raise ValueError(f"set exactly one of {what}_file or {what}_env in {section} (never a literal secret)")


def read_secret(file_path: str | None, env_name: str | None, what: str) -> str:
    """Read a secret from a file (trailing newline stripped) or an environment variable.

    Errors name the file or variable, never the content."""
    if file_path:
        try:
            value = Path(file_path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {file_path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{what}: {file_path} is not UTF-8 text") from None
        if not value:
            raise ConfigError(f"{what}: {file_path} is empty")
        return value
    if env_name:
        env = os.environ.get(env_name)
        if not env:
            raise ConfigError(f"{what}: environment variable {env_name} is not set or empty")
        return env
    raise ConfigError(f"{what}: no source configured")


class Pkcs11Config(_Section):
    """A KEK on a PKCS#11 token: SoftHSM2, a hardware HSM, or a TPM2 through tpm2-pkcs11."""

    module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = Field(min_length=1, max_length=32)
    pin_file: str | None = None
    pin_env: str | None = None
    key_label: str = Field(min_length=1, max_length=64)
    hmac_key_label: str | None = Field(default=None, min_length=1, max_length=64)
    mechanism: Literal["aes-gcm", "aes-cbc-hmac"] = "aes-gcm"
    # Logged-in sessions kept open; parallel requests each take one.
    pool_size: int = Field(default=4, ge=1, le=64)
    # How long a request waits for a free session before failing UNAVAILABLE.
    session_timeout: Duration = 2.0
    # Run token calls on the gRPC event loop instead of the worker pool. Saves a thread hop per call
    # (docs/performance.md), but a call that blocks stalls every RPC, Status included, so only for tokens that
    # answer in microseconds and cannot hang: "auto" means SoftHSM2 only; hardware HSMs and TPMs use the pool.
    inline_calls: Literal["auto", "always", "never"] = "auto"
    # Encrypt and decrypt (AES-GCM) with a session copy of each KEK (C_CopyObject, CKA_TOKEN false) rather than
    # the token object: SoftHSM2 re-reads a token object's file on every use. A key deleted from the token
    # then stops encrypting within a second and decrypting at the next health check, not at once.
    # "auto" means SoftHSM2 only.
    session_keys: Literal["auto", "always", "never"] = "auto"

    def tuned(self, setting: str) -> bool:
        """Whether an auto|always|never tuning setting is on for this module: auto means SoftHSM2 only, a token
        in kleidi's own process that answers in microseconds and never hangs."""
        return setting == "always" or (setting == "auto" and os.path.basename(self.module).startswith("libsofthsm2"))

    @model_validator(mode="after")
    def _check(self) -> Pkcs11Config:
        _exactly_one_secret("pkcs11", self.pin_file, self.pin_env, "pin")
        if self.mechanism == "aes-cbc-hmac" and not self.hmac_key_label:
            raise ValueError("hmac_key_label is required when mechanism is aes-cbc-hmac")
        if self.mechanism == "aes-gcm" and self.hmac_key_label:
            raise ValueError("hmac_key_label is only used with mechanism aes-cbc-hmac")
        if not Path(self.module).is_file():
            raise ValueError(f"module {self.module} does not exist")
        return self

    def pin(self) -> str:
        return read_secret(self.pin_file, self.pin_env, "pkcs11 pin")

    @property
    def check_timeout(self) -> float:
        """How long one health round trip may take: a session wait, with a floor for slow tokens."""
        return max(self.session_timeout, 1.0)


class VaultAuthConfig(_Section):
    """How kleidi logs in to Vault/OpenBao. Credentials come from files or env, re-read at each login."""

    method: Literal["token", "approle", "kubernetes", "jwt", "cert"] = "token"
    # Auth mount path; empty means the method's default (approle, kubernetes, jwt, cert).
    mount: str = ""
    token_file: str | None = None
    token_env: str | None = None
    role: str = ""
    role_id_file: str | None = None
    secret_id_file: str | None = None
    jwt_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    @model_validator(mode="after")
    def _check(self) -> VaultAuthConfig:
        required: dict[str, tuple[str, ...]] = {
            "approle": ("role_id_file", "secret_id_file"),
            "kubernetes": ("role", "jwt_file"),
            "jwt": ("role", "jwt_file"),
            "cert": ("client_cert", "client_key"),
        }
        if self.method == "token":
            _exactly_one_secret("vault.auth", self.token_file, self.token_env, "token")
        for name in required.get(self.method, ()):
            if not getattr(self, name):
                raise ValueError(f"{name} is required when method is {self.method}")
        return self


class VaultConfig(_Section):
    """A transit key in HashiCorp Vault or OpenBao."""

    address: str = Field(pattern=r"^https?://[^\s/]+")
    ca_cert: str | None = None
    namespace: str = ""
    transit_mount: str = Field(default="transit", min_length=1)
    key_name: str = Field(default="kleidi", min_length=1)
    timeout: Duration = 5.0
    auth: VaultAuthConfig = Field(default_factory=lambda: VaultAuthConfig(method="token", token_env="VAULT_TOKEN"))  # noqa: S106 - a variable name
    # A plain http:// address that is not loopback is refused unless this is true: the token and every data key
    # would cross the network in clear.
    allow_http: bool = False

    @model_validator(mode="after")
    def _check(self) -> VaultConfig:
        url = urllib.parse.urlsplit(self.address)
        if url.scheme == "http" and not self.allow_http and not _loopback(url.hostname or ""):
            raise ValueError(
                f"{self.address} is plain http: the Vault token and every data key would cross the network in clear. "
                "Use https:// (with ca_cert), or set vault.allow_http: true if the path is private by other means"
            )
        return self


def _endpoint(value: str, what: str) -> str:
    """A host:port (IPv6 in brackets), with no scheme: the form gRPC and the TLS name check both take."""
    host, sep, port = value.rpartition(":")
    if "://" in value or not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{what} must be host:port (an IPv6 address in brackets), got {value!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{what}: an IPv6 address must be in brackets, as [::1]:8443, got {value!r}")
    return value


class RemoteConfig(_Section):
    """Proxy mode, on a control-plane node: the KMS calls go to kleidi key servers (serve_remote) over mutual TLS.
    docs/remote.md."""

    # Key servers as host:port, tried in this order; the next one is tried when one does not answer. Every one
    # must serve the same KEK: one whose key_id differs from the others' is refused until it agrees again.
    endpoints: list[str] = Field(min_length=1, max_length=8)
    # The CA that signed the key servers' certificates; use one dedicated to this mode, never the cluster's.
    ca_cert: str = Field(min_length=1)
    # This node's client certificate and its key (PEM). All three files are re-read when they change.
    client_cert: str = Field(min_length=1)
    client_key: str = Field(min_length=1)
    # How long one key server may take to answer. The apiserver gives a KMS call 3 s in all: keep
    # timeout x endpoints under that, so a call can still fail over to the last endpoint.
    timeout: Duration = 1.0

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for endpoint in value:
            _endpoint(endpoint, "each endpoint")
        if len(set(value)) != len(value):
            raise ValueError("endpoints must not repeat")
        return value


class ServeRemoteConfig(_Section):
    """Key server mode: besides its own unix socket, kleidi serves its provider to proxy-mode plugins (provider:
    remote) over mutual TLS on a TCP port. There is no plaintext listener. docs/remote.md."""

    listen: str = Field(min_length=1)
    # Client certificates must chain to this CA: one dedicated to this mode, never the cluster's.
    ca_cert: str = Field(min_length=1)
    # The key server's certificate and key (PEM). All three files are re-read when they change.
    cert: str = Field(min_length=1)
    key: str = Field(min_length=1)
    # When not empty, a client certificate must also carry one of these names among its subject alternative names
    # (DNS, URI or IP); the others are refused at connection, and the refusal is logged.
    allowed_client_names: list[str] = Field(default_factory=list, max_length=1024)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _endpoint(value, "listen")

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Config(_Section):
    """The whole kleidi configuration file."""

    listen: str = "unix:///run/kleidi/kleidi.sock"
    socket_mode: FileMode = 0o600
    # Group that owns the socket (name or gid); empty keeps the process's group.
    socket_group: str = ""
    provider: Literal["pkcs11", "vault", "remote"]
    health_interval: Duration = 30.0
    # A backend check still running after this long turns Status and /healthz unhealthy ("hung").
    health_timeout: Duration = 10.0
    metrics_listen: str = "127.0.0.1:8095"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    # Requests larger than this are refused before they reach the backend.
    max_request_bytes: int = Field(default=64 * 1024, ge=1024, le=4 * 1024 * 1024)
    # gRPC worker threads.
    workers: int = Field(default=8, ge=1, le=256)
    # How long SIGTERM waits for in-flight calls before closing.
    shutdown_grace: Duration = 5.0
    # Retired settings (see retired()): accepted whatever their value, so a deployed config keeps working.
    cpu_affinity: Any = Field(
        default=None,
        deprecated="kleidi no longer places its threads on CPUs (it did not pay: docs/performance.md); "
        "pin the pod or the systemd unit instead if you want that",
    )
    pkcs11: Pkcs11Config | None = None
    vault: VaultConfig | None = None
    remote: RemoteConfig | None = None
    # Also serve the provider to proxy-mode plugins on other hosts (this host is then a key server).
    serve_remote: ServeRemoteConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> Config:
        if getattr(self, self.provider) is None:
            raise ValueError(f"provider is {self.provider} but the {self.provider} section is missing")
        if self.provider == "remote" and self.serve_remote is not None:
            raise ValueError("serve_remote needs a local provider (pkcs11 or vault): a key server does not forward")
        # A check may legitimately take as long as the backend's own timeout; only beyond that is it hung.
        if self.remote is not None and self.provider == "remote":
            # One remote.timeout for the key servers' Status (asked side by side), two for the Encrypt+Decrypt
            # round trip after it.
            if self.health_timeout <= 3 * self.remote.timeout:
                raise ValueError(
                    f"health_timeout ({self.health_timeout:g}s) must be longer than 3 x remote.timeout"
                    f" ({self.remote.timeout:g}s): a check asks the key servers' Status (up to remote.timeout), then"
                    " makes one Encrypt+Decrypt round trip (up to 2 x remote.timeout), or healthy checks look hung"
                )
            return self
        if self.vault is not None and self.provider == "vault":
            longest, name = self.vault.timeout, "vault.timeout"
        else:
            assert self.pkcs11 is not None
            longest, name = self.pkcs11.check_timeout, "pkcs11.session_timeout"
        if self.health_timeout <= longest:
            raise ValueError(f"health_timeout must be longer than {name} ({longest:g}s), or healthy checks look hung")
        return self

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        socket_path(value)  # raises ValueError with the reason
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str) -> str:
        if value:
            _host_port(value)
        return value

    @field_validator("health_interval")
    @classmethod
    def _health_interval(cls, value: float) -> float:
        # Also how long a key rotation takes to reach Status: beyond an hour the apiserver would lag too far.
        if value > 3600:
            raise ValueError("must be at most 1h")
        return value

    def retired(self) -> list[tuple[str, str]]:
        """(setting, what to do) for each retired setting this config still sets. A release that stops using a
        setting keeps accepting it for one more release, so an upgrade never turns a deployed config into a
        KMS outage; `kleidi serve` logs a warning naming each one."""
        return _retired(self, "")

    @property
    def socket_path(self) -> str:
        return socket_path(self.listen)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return _host_port(self.metrics_listen) if self.metrics_listen else None


def _retired(section: BaseModel, prefix: str) -> list[tuple[str, str]]:
    found = []
    for name in sorted(section.model_fields_set):
        reason = type(section).model_fields[name].deprecated
        if reason:
            found.append((prefix + name, str(reason)))
        elif isinstance(value := getattr(section, name), BaseModel):
            found += _retired(value, f"{prefix}{name}.")
    return found


def socket_path(listen: str) -> str:
    """The filesystem path of a 'unix:///abs/path' (or '/abs/path') listen address."""
    path = listen[len("unix://") :] if listen.startswith("unix://") else listen
    if "://" in path:
        raise ValueError(f"listen must be unix:///absolute/path, got {listen!r}")
    if path.startswith("/@"):
        raise ValueError("abstract sockets (unix:///@name) have no permissions; use a filesystem path")
    if not path.startswith("/"):
        raise ValueError(f"listen must be an absolute path (unix:///run/kleidi/kleidi.sock), got {listen!r}")
    if len(path.encode()) > 107:
        raise ValueError("listen path is longer than a unix socket allows (107 bytes)")
    return path


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics_listen must be host:port, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


ENV_OVERRIDES = {"KLEIDI_LISTEN": "listen", "KLEIDI_LOG_LEVEL": "log_level", "KLEIDI_METRICS_LISTEN": "metrics_listen"}


def load(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a config file. Precedence: CLI overrides, then KLEIDI_* env, then the file.

    Raises ConfigError with one line naming the field and the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config: {path} is not valid YAML or JSON{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must be a mapping of keys to values")
    for env, key in ENV_OVERRIDES.items():
        if env in os.environ:
            data[key] = os.environ[env]
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return validate(data)


def validate(data: dict[str, Any]) -> Config:
    """Build a Config from plain data, turning the first validation error into a ConfigError."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """One line naming the field and what is wrong with it (never the field's value)."""
    err = exc.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"config: {field}: unknown key"
    if err["type"] == "missing":
        return f"config: {field}: required but missing"
    message = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"config: {field}: {message}" if field else f"config: {message}"
