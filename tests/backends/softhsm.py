"""A SoftHSM2 token in a private directory, provisioned with the real Debian tools."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


class SoftHsm:
    """One SoftHSM2 token under ``root``; ``env`` points SOFTHSM2_CONF at it, keeping global state out."""

    def __init__(self, root: Path, label: str = "kleidi") -> None:
        self.root = root
        self.label = label
        self.tokens = root / "tokens"
        self.tokens.mkdir(parents=True, exist_ok=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
            "slots.removable = false\n"
        )
        self.pin = secrets.token_hex(8)
        self.so_pin = secrets.token_hex(8)
        self.pin_file = root / "pin"
        self.pin_file.write_text(self.pin + "\n")
        self.pin_file.chmod(0o600)
        self.env = {**os.environ, "SOFTHSM2_CONF": str(self.conf)}
        self.module = SOFTHSM_MODULE
        self._next_id = 1
        self._run(
            "softhsm2-util", "--init-token", "--free", "--label", label, "--pin", self.pin, "--so-pin", self.so_pin
        )

    def _run(self, *argv: str) -> str:
        done = subprocess.run(argv, check=False, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def keygen(self, label: str, key_type: str = "AES:32") -> None:
        """Generate a secret key on the token; ``key_type`` is pkcs11-tool's (AES:32, GENERIC:32)."""
        key_id = f"{self._next_id:02x}"
        self._next_id += 1
        # --private: SoftHSM2 encrypts a private object's value under the PIN; a public key is stored in clear.
        self._tool("--keygen", "--key-type", key_type, "--label", label, "--id", key_id, "--private", "--sensitive")

    def delete_key(self, label: str) -> None:
        self._tool("--delete-object", "--type", "secrkey", "--label", label)

    def _tool(self, *args: str) -> str:
        """pkcs11-tool, logged in to this token (test-only: the PIN is in its argv)."""
        login = ("--module", self.module, "--token-label", self.label, "--login", "--pin", self.pin)
        return self._run("pkcs11-tool", *login, *args)

    def config(self, key_label: str, **extra: object) -> dict[str, object]:
        """The pkcs11 section of a kleidi config for this token."""
        return {
            "module": self.module,
            "token_label": self.label,
            "pin_file": str(self.pin_file),
            "key_label": key_label,
            **extra,
        }

    def take_away(self) -> Path:
        """Make the token vanish as if it were unplugged; returns where it was put."""
        aside = self.root / "aside"
        shutil.move(str(self.tokens), aside)
        self.tokens.mkdir()
        return aside

    def bring_back(self, aside: Path) -> None:
        shutil.rmtree(self.tokens)
        shutil.move(str(aside), self.tokens)
