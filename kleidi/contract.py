"""The limits the kube-apiserver enforces on a KMS plugin's answers (docs/kms-contract.md).

One place for them: the server checks its own answers and its inputs here, and `kleidi check`
checks a running plugin's answers with the same functions."""

from __future__ import annotations

import re
from collections.abc import Mapping

KMS_V2 = "v2"
KMS_V1 = "v1beta1"
MAX_KEY_ID_BYTES = 1024
MAX_CIPHERTEXT_BYTES = 1024
MAX_ANNOTATIONS_BYTES = 32 * 1024
DEK_SEED_BYTES = 32

# k8s.io/apimachinery IsFullyQualifiedDomainName: a DNS-1123 subdomain with at least two labels.
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_FQDN = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})+$")


def key_id_problems(key_id: str) -> list[str]:
    if not key_id:
        return ["key_id is empty"]
    if len(key_id.encode()) > MAX_KEY_ID_BYTES:
        return [f"key_id is {len(key_id.encode())} bytes, over the {MAX_KEY_ID_BYTES}-byte limit"]
    return []


def ciphertext_problems(ciphertext: bytes) -> list[str]:
    if not ciphertext:
        return ["ciphertext is empty"]
    if len(ciphertext) > MAX_CIPHERTEXT_BYTES:
        return [f"ciphertext is {len(ciphertext)} bytes, over the {MAX_CIPHERTEXT_BYTES}-byte limit"]
    return []


def annotation_problems(annotations: Mapping[str, bytes]) -> list[str]:
    problems = []
    total = 0
    for key, value in annotations.items():
        total += len(key.encode()) + len(value)
        if len(key) > 253 or not _FQDN.match(key):
            problems.append(f"annotation key {key[:80]!r} is not a lowercase fully qualified domain name")
    if total > MAX_ANNOTATIONS_BYTES:
        problems.append(f"annotations are {total} bytes, over the {MAX_ANNOTATIONS_BYTES}-byte limit")
    return problems


def status_problems(version: str, healthz: str, key_id: str) -> list[str]:
    problems = []
    if version not in (KMS_V2, "v2beta1"):  # the apiserver still accepts the beta name
        problems.append(f"version is {version!r}, the apiserver wants {KMS_V2!r}")
    if healthz != "ok":
        problems.append(f"healthz is {healthz!r}, not 'ok'")
    return problems + key_id_problems(key_id)
