"""The apiserver's health checks of its KMS providers (encryptionconfig/config.go), driven through kleidi's client.

KMS v2: Status must say healthz "ok", version "v2" and give a valid key_id; when that key_id is new to the probe,
the apiserver makes a DEK seed with Encrypt and requires the answer's key_id to equal Status' (DEK rotation):
a plugin whose Encrypt fails or disagrees with Status is unhealthy too. KMS v1: an Encrypt/Decrypt round trip.
Results are cached like the real probes: 20 s after a success, 3 s after a failure."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

import grpc
from encryption_config import EncryptionConfig, KmsProvider

from kleidi.client import KmsClient

POSITIVE_TTL = 20.0
NEGATIVE_TTL = 3.0
MAX_KEY_ID = 1024
MAX_CIPHERTEXT = 1024
MAX_ANNOTATIONS = 32 * 1024
_FQDN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$")


class ProbeError(Exception):
    pass


def _rpc_error(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return f"rpc error: code = {code.name.title().replace('_', '') if code else 'Unknown'} desc = {details}"


def validate_key_id(key_id: str) -> str | None:
    if not key_id:
        return "keyID is empty"
    if len(key_id.encode()) > MAX_KEY_ID:
        return f"keyID is {len(key_id.encode())} bytes, which exceeds the max size of {MAX_KEY_ID}"
    return None


class KmsProbe:
    """One kms provider's health, as kmsv2PluginProbe / kmsPluginProbe compute it."""

    def __init__(self, provider: KmsProvider) -> None:
        self.provider = provider
        self.key_id = ""  # key_id of the current DEK seed (empty: no seed yet)
        self._lock = threading.Lock()
        self._last_error: str | None = None
        self._valid_until = 0.0

    @property
    def name(self) -> str:
        return self.provider.name

    def check(self) -> str | None:
        """None when healthy, else the reason."""
        with self._lock:
            now = time.monotonic()
            if now < self._valid_until:
                return self._last_error
            try:
                if self.provider.api_version == "v2":
                    self._check_v2()
                else:
                    self._check_v1()
            except ProbeError as err:
                self._last_error, self._valid_until = str(err), now + NEGATIVE_TTL
            else:
                self._last_error, self._valid_until = None, now + POSITIVE_TTL
            return self._last_error

    def _client(self) -> KmsClient:
        path = self.provider.socket
        if not path.startswith("/") or path.startswith("/@"):
            raise ProbeError(f"this stand-in dials filesystem sockets only, not {self.provider.endpoint!r}")
        # A fresh channel per check: no reconnect back-off left over from an earlier failure (see README).
        return KmsClient(path, self.provider.timeout)

    def _check_v2(self) -> None:
        name = self.provider.name
        with self._client() as kms:
            try:
                status = kms.status()
            except grpc.RpcError as err:
                raise ProbeError(
                    f"failed to perform status section of the healthz check for KMS Provider {name}, "
                    f"error: {_rpc_error(err)}"
                ) from err
            problems: list[str] = []
            if status.healthz != "ok":
                problems.append(f"got unexpected healthz status: {status.healthz}")
            if status.version != "v2":
                problems.append(f"expected KMSv2 API version v2, got {status.version}")
            bad_key_id = validate_key_id(status.key_id)
            if bad_key_id:
                problems.append(f"got invalid KMSv2 KeyID {status.key_id!r}: {bad_key_id}")
            elif status.key_id != self.key_id:
                rotation = self._rotate(kms, status.key_id)
                if rotation:
                    problems.append(rotation)
            if problems:
                raise ProbeError(f"kmsv2 Provider {name} is not healthy, error: {'; '.join(problems)}")

    def _rotate(self, kms: KmsClient, status_key_id: str) -> str | None:
        """A new DEK seed, encrypted by the plugin; the rotation fails unless Encrypt agrees with Status."""
        uid = str(uuid.uuid4())
        try:
            response = kms.encrypt(os.urandom(32), uid=uid)
        except grpc.RpcError as err:
            return f"failed to rotate DEK uid={uid!r}, errGen=failed to encrypt DEK, error: {_rpc_error(err)}"
        problems = []
        if not response.ciphertext:
            problems.append("encrypted DEK source is empty")
        elif len(response.ciphertext) > MAX_CIPHERTEXT:
            problems.append(f"encrypted DEK source is {len(response.ciphertext)} bytes, max {MAX_CIPHERTEXT}")
        bad = validate_key_id(response.key_id)
        if bad:
            problems.append(f"Encrypt key_id: {bad}")
        size = 0
        for key, value in response.annotations.items():
            size += len(key) + len(value)
            if not _FQDN.match(key) or "/" in key or "_" in key:
                problems.append(f"annotation key {key!r} is not a fully qualified domain name")
        if size > MAX_ANNOTATIONS:
            problems.append(f"annotations are {size} bytes, max {MAX_ANNOTATIONS}")
        if not problems and response.key_id != status_key_id:
            problems.append(f"statusKeyID={status_key_id!r}, encryptKeyID={response.key_id!r}")
        if problems:
            return f"failed to rotate DEK uid={uid!r}: {'; '.join(problems)}"
        self.key_id = status_key_id
        return None

    def _check_v1(self) -> None:
        name = self.provider.name
        with self._client() as kms:
            try:
                ciphertext = kms.v1_encrypt(b"ping")
            except grpc.RpcError as err:
                raise ProbeError(
                    f"failed to perform encrypt section of the healthz check for KMS Provider {name}, "
                    f"error: {_rpc_error(err)}"
                ) from err
            try:
                kms.v1_decrypt(ciphertext)
            except grpc.RpcError as err:
                raise ProbeError(
                    f"failed to perform decrypt section of the healthz check for KMS Provider {name}, "
                    f"error: {_rpc_error(err)}"
                ) from err


class KmsChecks:
    """The health checks one loaded EncryptionConfiguration adds to /healthz and /readyz (not /livez)."""

    def __init__(self, config: EncryptionConfig | None, reload: bool) -> None:
        self.config = config
        self.probes = [KmsProbe(p) for p in config.kms] if config else []
        # One combined "kms-providers" check with automatic reload (present even with no kms provider) or when
        # only v2 providers are used; otherwise one "kms-provider-<i>" check per provider.
        self.combined = config is not None and (reload or (config.v2_used and not config.v1_used))

    def names(self) -> list[str]:
        if self.combined:
            return ["kms-providers"]
        return [f"kms-provider-{i}" for i in range(len(self.probes))]

    def run(self, name: str) -> str | None:
        if self.combined and name == "kms-providers":
            errors = [f"kms-provider-{i}: {err}" for i, p in enumerate(self.probes) if (err := p.check())]
            return errors[0] if len(errors) == 1 else ("[" + ", ".join(errors) + "]" if errors else None)
        index = int(name.rsplit("-", 1)[1])
        return self.probes[index].check()
