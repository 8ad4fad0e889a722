"""Reading an apiserver's /metrics: which KMS key_id each kms provider's Status last reported.

kube-apiserver records, for every key_id a kms v2 provider's Status call returns, the time it last saw it:
`apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{apiserver_id_hash, key_id_hash,
provider_name}`, where key_id_hash is "sha256:" and the hex SHA-256 of the key_id. The series with the newest
timestamp for a provider names the key_id its apiserver is using now: on a new key_id from Status it makes a new
data-key seed with Encrypt, and writes under that key_id from then on."""

from __future__ import annotations

import hashlib
import re
from typing import Any

METRIC = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds"
_SERIES = re.compile(r"^" + METRIC + r"\{(?P<labels>.*)\}\s+(?P<value>\S+)(?:\s+\d+)?\s*$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def key_id_hash(key_id: str) -> str:
    """The key_id_hash label kube-apiserver gives a key_id."""
    return "sha256:" + hashlib.sha256(key_id.encode()).hexdigest()


def key_id_status(metrics: str, provider: str) -> dict[str, Any]:
    """What one kms provider's Status reported, from /metrics text: found (whether the apiserver has any such
    series for the provider), newest (the key_id_hash seen last, "" when none) and series (key_id_hash -> the
    timestamp it was last seen)."""
    series: dict[str, float] = {}
    for match in _SERIES.finditer(metrics or ""):
        found = _LABEL.findall(match["labels"])
        labels = {name: value.replace('\\"', '"').replace("\\\\", "\\") for name, value in found}
        if labels.get("provider_name") != provider or "key_id_hash" not in labels:
            continue
        try:
            seen = float(match["value"])
        except ValueError:
            continue
        series[labels["key_id_hash"]] = max(seen, series.get(labels["key_id_hash"], seen))
    newest = max(series, key=lambda name: series[name], default="")
    return {"found": bool(series), "newest": newest, "series": series}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"kleidi_key_id_status": key_id_status, "kleidi_key_id_hash": key_id_hash}
