#!/usr/bin/env python3
"""One KMS v2 Encrypt or Decrypt on a plugin socket, the way the apiserver calls it; for molecule's verify.

    kms_call.py encrypt --socket S --out FILE     wraps 32 random bytes; FILE gets the plaintext and the answer
    kms_call.py decrypt --socket S --input FILE   unwraps FILE's answer; exit 0 only if the plaintext matches
    kms_call.py status --socket S                 prints the key_id of the plugin's Status answer

Run it inside the apiserver's filesystem view (node_agent.py exec), so the socket path is the one the apiserver's
EncryptionConfiguration names and only its own mounts can make it reachable."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

from kleidi.client import KmsClient


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["encrypt", "decrypt", "status"])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--out")
    parser.add_argument("--input")
    args = parser.parse_args()
    with KmsClient(args.socket, 3.0) as kms:
        if args.action == "status":
            print(kms.status().key_id)
            return 0
        if args.action == "encrypt":
            seed = os.urandom(32)
            answer = kms.encrypt(seed, uid="molecule-verify")
            record = {
                "plaintext": base64.b64encode(seed).decode(),
                "ciphertext": base64.b64encode(answer.ciphertext).decode(),
                "key_id": answer.key_id,
                "annotations": {k: base64.b64encode(v).decode() for k, v in answer.annotations.items()},
            }
            with open(args.out, "w", encoding="utf-8") as out:
                json.dump(record, out)
            print(f"wrapped 32 bytes under key_id {answer.key_id}")
            return 0
        with open(args.input, encoding="utf-8") as handle:
            record = json.load(handle)
        annotations = {k: base64.b64decode(v) for k, v in record["annotations"].items()}
        plain = kms.decrypt(base64.b64decode(record["ciphertext"]), record["key_id"], annotations, "molecule-verify")
    if plain != base64.b64decode(record["plaintext"]):
        print("decrypt returned a different plaintext", file=sys.stderr)
        return 1
    print(f"unwrapped under key_id {record['key_id']}: plaintext matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
