#!/usr/bin/env python3
"""Count how etcd stores the values under some key prefixes: under which kms provider (and key_id), another
encrypting provider, or in plaintext.

    kleidi_etcd_count.py --provider NAME [--etcdctl etcdctl] --endpoints URLS [--cacert F --cert F --key F]
                         [--page 500] PREFIX...

Runs where etcd's client certificate is (a control-plane node; the kleidi_reencrypt role copies it there), with
that node's python3 and etcdctl (v3 API). Reads the values page by page with `etcdctl get --limit`, and prints one
JSON document: the counts per prefix and in total, and the names of a few keys that are not under the kms
provider NAME. Values are only classified by their prefix (and, for kms v2, the key_id stored in clear in the
EncryptedObject); they are never printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys

KMS = b"k8s:enc:kms:"
LOCAL_KEY = {b"k8s:enc:aescbc:v1:": "aescbc", b"k8s:enc:aesgcm:v1:": "aesgcm", b"k8s:enc:secretbox:v1:": "secretbox"}
EXAMPLES = 5


class EtcdError(Exception):
    pass


def varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def key_id(encrypted_object: bytes) -> str:
    """Field 2 (keyID) of a KMS v2 EncryptedObject; '' when it cannot be read."""
    pos = 0
    try:
        while pos < len(encrypted_object):
            tag, pos = varint(encrypted_object, pos)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = varint(encrypted_object, pos)
            elif wire == 2:
                size, pos = varint(encrypted_object, pos)
                if field == 2:
                    return encrypted_object[pos : pos + size].decode("utf-8", "replace")
                pos += size
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                return ""
    except ValueError:
        return ""
    return ""


def classify(value: bytes) -> tuple[str, str]:
    """(kind, detail): kms v2 (detail: provider name), kms v1 (provider name), aescbc, aesgcm, secretbox,
    other-encrypted (an unknown k8s:enc: prefix) or identity (plaintext)."""
    if value.startswith(KMS):
        version, _, rest = value[len(KMS) :].partition(b":")
        name, _, _ = rest.partition(b":")
        return f"kms {version.decode('ascii', 'replace')}", name.decode("utf-8", "replace")
    for prefix, kind in LOCAL_KEY.items():
        if value.startswith(prefix):
            return kind, ""
    if value.startswith(b"k8s:enc:"):
        return "other-encrypted", value[len(b"k8s:enc:") :].partition(b":")[0].decode("ascii", "replace")
    return "identity", ""


def empty() -> dict:
    return {
        "total": 0,
        "target": 0,
        "target_key_ids": {},
        "other_kms": {},
        "aescbc": 0,
        "aesgcm": 0,
        "secretbox": 0,
        "other_encrypted": 0,
        "identity": 0,
    }


def count(counts: dict, provider: str, value: bytes) -> bool:
    """Add one value to ``counts``; True when it is under the kms v2 provider ``provider``."""
    kind, detail = classify(value)
    counts["total"] += 1
    if kind == "kms v2" and detail == provider:
        counts["target"] += 1
        kid = key_id(value[len(f"k8s:enc:kms:v2:{provider}:") :])
        counts["target_key_ids"][kid] = counts["target_key_ids"].get(kid, 0) + 1
        return True
    if kind.startswith("kms "):
        label = f"{kind.split()[1]}:{detail}"
        counts["other_kms"][label] = counts["other_kms"].get(label, 0) + 1
    elif kind == "other-encrypted":
        counts["other_encrypted"] += 1
    else:
        counts[kind] += 1
    return False


def range_end(prefix: str) -> str:
    """etcd's end of the range of keys that start with ``prefix``."""
    data = bytearray(prefix.encode())
    data[-1] += 1
    return data.decode()


def pages(args: argparse.Namespace, prefix: str):
    """The key-value pairs under ``prefix``, ``args.page`` at a time (each page starts at the last key seen)."""
    end, start, first = range_end(prefix), prefix, True
    base = [args.etcdctl, f"--endpoints={args.endpoints}", "--command-timeout=60s"]
    for flag in ("cacert", "cert", "key"):
        if getattr(args, flag):
            base.append(f"--{flag}={getattr(args, flag)}")
    while True:
        argv = [*base, "get", start, end, f"--limit={args.page + (0 if first else 1)}", "--write-out=json"]
        try:
            done = subprocess.run(
                argv, capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, check=False, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EtcdError(f"{args.etcdctl} could not run: {exc}") from None
        if done.returncode != 0:
            message = next((line for line in done.stderr.decode("utf-8", "replace").splitlines() if line.strip()), "")
            raise EtcdError(f"etcdctl get {prefix} failed: {message[:300]}")
        answer = json.loads(done.stdout or b"{}")
        kvs = answer.get("kvs") or []
        for index, kv in enumerate(kvs):
            key = base64.b64decode(kv["key"]).decode("utf-8", "replace")
            if not first and index == 0 and key == start:
                continue
            yield key, base64.b64decode(kv.get("value") or "")
        if not answer.get("more") or not kvs:
            return
        start, first = base64.b64decode(kvs[-1]["key"]).decode("utf-8", "replace"), False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", required=True, help="the kms provider's name in the EncryptionConfiguration")
    parser.add_argument("--etcdctl", default="etcdctl")
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--cacert", default="")
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    parser.add_argument("--page", type=int, default=500)
    parser.add_argument("prefixes", nargs="+", metavar="PREFIX")
    args = parser.parse_args(argv)
    result: dict = {"provider": args.provider, "prefixes": {}, "total": empty(), "not_target": []}
    try:
        for prefix in args.prefixes:
            counts = result["prefixes"].setdefault(prefix, empty())
            for key, value in pages(args, prefix):
                for into in (counts, result["total"]):
                    target = count(into, args.provider, value)
                if not target and len(result["not_target"]) < EXAMPLES:
                    result["not_target"].append(key)
    except EtcdError as exc:
        result["error"] = str(exc)
        json.dump(result, sys.stdout, indent=1, sort_keys=True)
        return 1
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
