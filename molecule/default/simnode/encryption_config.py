"""Load and validate an EncryptionConfiguration the way kube-apiserver 1.31 does at start and on reload.

Mirrors k8s.io/apiserver pkg/server/options/encryptionconfig (loadConfig, the v1 defaults, validation.go and the
transformer construction): the same checks refuse the same files, with messages close to the real ones. Keys are
checked (base64, size) but never logged or kept."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

PROVIDER_KINDS = ("kms", "aescbc", "aesgcm", "secretbox", "identity")
AES_KEY_SIZES = (16, 24, 32)
SECRETBOX_KEY_SIZES = (32,)
DEFAULT_KMS_TIMEOUT = 3.0
KMSV1_DEPRECATED = (
    "KMSv1 is deprecated and will only receive security updates going forward. Use KMSv2 instead.  "
    "Set --feature-gates=KMSv1=true to use the deprecated KMSv1 feature."
)
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ConfigError(ValueError):
    """The apiserver would refuse this file (at start: it exits; on reload: it keeps the old one)."""


@dataclass(frozen=True)
class KmsProvider:
    name: str
    endpoint: str
    api_version: str  # v1 | v2
    timeout: float  # seconds

    @property
    def socket(self) -> str:
        """The path the apiserver's gRPC client dials (k8s.io/kms util.ParseEndpoint: the URL's path)."""
        return urlparse(self.endpoint).path


@dataclass(frozen=True)
class EncryptionConfig:
    path: str
    digest: str  # of the file's bytes: what automatic reload compares
    kms: tuple[KmsProvider, ...]
    summary: tuple[str, ...]  # "secrets: kms(kleidi), aescbc, identity" per resource entry (no key material)
    warnings: tuple[str, ...]

    @property
    def v1_used(self) -> bool:
        return any(p.api_version == "v1" for p in self.kms)

    @property
    def v2_used(self) -> bool:
        return any(p.api_version == "v2" for p in self.kms)


def parse_duration(value: Any) -> float:
    """A Go duration string (metav1.Duration in YAML) in seconds."""
    text = str(value).strip()
    if text in ("0", ""):
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    total, pos = 0.0, 0
    for match in _DURATION.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(body) or pos == 0:
        raise ConfigError(f"time: invalid duration {text!r}")
    return sign * total


def load(path: str, reload: bool, kms_v1_enabled: bool = False) -> EncryptionConfig:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(
            f"error while parsing file: error opening encryption provider configuration file {path!r}: {err.strerror}"
        ) from err
    if not data:
        raise ConfigError(f"error while parsing file: encryption provider configuration file {path!r} is empty")
    try:
        obj = yaml.safe_load(data)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"error while parsing file: error decoding encryption provider configuration file {path!r}: {err}"
        ) from err
    if not isinstance(obj, dict):
        raise ConfigError(
            f"error while parsing file: error decoding encryption provider configuration file {path!r}: not an object"
        )
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if api_version != "apiserver.config.k8s.io/v1" or kind != "EncryptionConfiguration":
        raise ConfigError(
            f"error while parsing file: error decoding encryption provider configuration file {path!r}: "
            f"no kind {kind!r} is registered for version {api_version!r}: want apiserver.config.k8s.io/v1 "
            "EncryptionConfiguration"
        )
    resources = _list(obj.get("resources"), "resources")
    errors = _validate(resources, reload)
    if errors:
        raise ConfigError("error while parsing file: " + _aggregate(errors))
    kms, summary, warnings = _build(resources, kms_v1_enabled)
    return EncryptionConfig(
        path=path,
        digest=hashlib.sha256(data).hexdigest(),
        kms=tuple(kms),
        summary=tuple(summary),
        warnings=tuple(warnings),
    )


def _aggregate(errors: list[str]) -> str:
    return errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"error while parsing file: {where}: expected a list")
    return value


def _present(provider: dict[str, Any], kind: str) -> bool:
    # The decoder leaves a pointer nil for a missing or null value: "identity:" alone is no provider at all.
    return isinstance(provider.get(kind), dict)


def _validate(resources: list[Any], reload: bool) -> list[str]:
    """validation.ValidateEncryptionConfiguration."""
    if not resources:
        return ["resources: Required value: at least one resources is required"]
    errors: list[str] = []
    kms_names: set[str] = set()
    for i, entry in enumerate(resources):
        if not isinstance(entry, dict):
            errors.append(f"resources[{i}]: Invalid value: expected an object")
            continue
        if not _list(entry.get("resources"), f"resources[{i}].resources"):
            errors.append(
                f"resources[{i}].resources: Required value: at least one resources[{i}].resources is required"
            )
        providers = _list(entry.get("providers"), f"resources[{i}].providers")
        if not providers:
            errors.append(
                f"resources[{i}].providers: Required value: at least one resources[{i}].providers is required"
            )
        for j, provider in enumerate(providers):
            where = f"resources[{i}].providers[{j}]"
            if not isinstance(provider, dict):
                errors.append(f"{where}: Invalid value: expected an object")
                continue
            found = [k for k in PROVIDER_KINDS if _present(provider, k)]
            if not found:
                errors.append(
                    f"{where}: Invalid value: provider does not contain any of the expected providers: "
                    "KMS, AESGCM, AESCBC, Secretbox, Identity"
                )
                continue
            if len(found) > 1:
                errors.append(
                    f"{where}: Invalid value: more than one provider specified in a single element, "
                    "should split into different list elements"
                )
                continue
            kind = found[0]
            if kind == "kms":
                errors += _validate_kms(provider["kms"], f"{where}.kms", kms_names, reload)
            elif kind in ("aescbc", "aesgcm"):
                errors += _validate_keys(provider[kind].get("keys"), f"{where}.{kind}.keys", AES_KEY_SIZES)
            elif kind == "secretbox":
                errors += _validate_keys(provider[kind].get("keys"), f"{where}.secretbox.keys", SECRETBOX_KEY_SIZES)
    return errors


def _validate_keys(keys: Any, where: str, sizes: tuple[int, ...]) -> list[str]:
    if not isinstance(keys, list) or not keys:
        return [f"{where}: Required value: at least one keys is required"]
    errors: list[str] = []
    for i, entry in enumerate(keys):
        key = entry if isinstance(entry, dict) else {}
        if not key.get("name"):
            errors.append(f"{where}[{i}].name: Required value: name is a mandatory field for a key")
        secret = key.get("secret")
        if not secret:
            errors.append(f"{where}[{i}].secret: Required value: secret is a mandatory field for a key")
            continue
        try:
            raw = base64.b64decode(str(secret), validate=True)
        except (binascii.Error, ValueError):
            errors.append(f'{where}[{i}].secret: Invalid value: "REDACTED": secrets must be base64 encoded')
            continue
        if len(raw) not in sizes:
            errors.append(
                f'{where}[{i}].secret: Invalid value: "REDACTED": secret is not of the expected length, '
                f"got {len(raw)}, expected one of {list(sizes)}"
            )
    return errors


def _kms_api_version(kms: dict[str, Any]) -> str:
    return str(kms.get("apiVersion") or "v1")  # the v1 API's default: an entry without apiVersion is KMS v1


def _validate_kms(kms: dict[str, Any], where: str, names: set[str], reload: bool) -> list[str]:
    errors: list[str] = []
    name = str(kms.get("name") or "")
    version = _kms_api_version(kms)
    if not name:
        errors.append(f"{where}.name: Required value: name is a mandatory field for a provider")
    if version != "v1" and ":" in name:
        errors.append(f"{where}.name: Invalid value: {name!r}: invalid KMS provider name {name}, must not contain ':'")
    # v2 names are unique across all kms providers; v1 names only when reload is on.
    if (reload or version != "v1") and name in names:
        errors.append(
            f"{where}.name: Invalid value: {name!r}: duplicate KMS provider name {name}, names must be unique"
        )
    names.add(name)
    try:
        timeout = parse_duration(kms["timeout"]) if kms.get("timeout") is not None else DEFAULT_KMS_TIMEOUT
    except ConfigError as err:
        errors.append(f"{where}.timeout: {err}")
    else:
        if timeout <= 0:
            errors.append(f"{where}.timeout: Invalid value: {kms.get('timeout')!r}: timeout should be a positive value")
    if kms.get("cachesize") == 0:
        errors.append(
            f"{where}.cachesize: Invalid value: 0: cachesize should be a positive value, or negative to disable"
        )
    endpoint = str(kms.get("endpoint") or "")
    if not endpoint:
        errors.append(f'{where}.endpoint: Invalid value: "": endpoint is a mandatory field for a kms')
    else:
        try:
            scheme = urlparse(endpoint).scheme
        except ValueError as err:
            errors.append(
                f"{where}.endpoint: Invalid value: {endpoint!r}: invalid endpoint for kms provider, error: {err}"
            )
        else:
            if scheme != "unix":
                errors.append(
                    f"{where}.endpoint: Invalid value: {endpoint!r}: unsupported scheme {scheme!r} for KMS provider, "
                    "only unix is supported"
                )
    if version not in ("v1", "v2"):
        errors.append(
            f"{where}.apiVersion: Invalid value: {version!r}: unsupported apiVersion apiVersion for KMS provider, "
            "only v1 and v2 are supported"
        )
    return errors


def _build(resources: list[dict[str, Any]], kms_v1_enabled: bool) -> tuple[list[KmsProvider], list[str], list[str]]:
    """getTransformerOverridesAndKMSPluginProbes: masking rules, the KMSv1 gate, one probe per kms entry."""
    kms: list[KmsProvider] = []
    summary: list[str] = []
    warnings: list[str] = []
    seen: set[tuple[str, str]] = set()
    for entry in resources:
        kinds: list[str] = []
        for provider in entry["providers"]:
            kind = next(k for k in PROVIDER_KINDS if _present(provider, k))
            if kind != "kms":
                kinds.append(kind)
                continue
            spec = provider["kms"]
            version = _kms_api_version(spec)
            if version == "v1":
                if not kms_v1_enabled:
                    raise ConfigError(f"error while building transformers: {KMSV1_DEPRECATED}")
                warnings.append(
                    "KMSv1 is deprecated and will only receive security updates going forward. Use KMSv2 instead."
                )
            timeout = parse_duration(spec["timeout"]) if spec.get("timeout") is not None else DEFAULT_KMS_TIMEOUT
            kms.append(KmsProvider(str(spec["name"]), str(spec["endpoint"]), version, timeout))
            kinds.append(f"kms {version} ({spec['name']})")
        for resource in entry["resources"]:
            name, _, group = str(resource).partition(".")
            for mask in ((group, "*"), ("*", "*")):
                if mask in seen:
                    raise ConfigError(
                        f"error while building transformers: resource {resource!r} is masked by earlier rule "
                        f"{_gr(mask)!r}"
                    )
            seen.add((group, name))
        summary.append(f"{', '.join(map(str, entry['resources']))}: {', '.join(kinds)}")
    return kms, summary, warnings


def _gr(group_resource: tuple[str, str]) -> str:
    group, resource = group_resource
    return f"{resource}.{group}" if group else resource
