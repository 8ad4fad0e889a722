"""`make demo`: a SoftHSM2 token in ./.demo, kleidi serving it, `kleidi check` and a real round trip, a clean stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from kleidi.client import KmsClient
from tests.backends.softhsm import SoftHsm
from tests.plugin import KleidiProcess

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    shutil.rmtree(DEMO, ignore_errors=True)
    say(f"creating a SoftHSM2 token 'kleidi' with an AES-256 KEK 'kleidi-kek-1' in {DEMO}")
    hsm = SoftHsm(DEMO / "softhsm")
    hsm.keygen("kleidi-kek-1")
    config = {"provider": "pkcs11", "health_interval": "5s", "pkcs11": hsm.config("kleidi-kek-1")}
    plugin = KleidiProcess(DEMO / "kleidi", config, env=hsm.env)
    plugin.write_config()
    say(f"config {plugin.config_file}:")
    print(plugin.config_file.read_text())
    say(f"kleidi serve --config {plugin.config_file}   (log: {plugin.log_file})")
    plugin.start()
    try:
        plugin.wait_healthy()
        say(f"kleidi check --socket {plugin.socket} --v1")
        check = subprocess.run(
            [sys.executable, "-m", "kleidi", "check", "--socket", plugin.socket, "--v1"], cwd=ROOT, check=False
        )
        say("a data key wrapped and unwrapped through the socket, as the apiserver does it")
        with KmsClient(plugin.socket) as kms:
            status = kms.status()
            seed = os.urandom(32)
            wrapped = kms.encrypt(seed, uid="demo")
            back = kms.decrypt(wrapped.ciphertext, wrapped.key_id, dict(wrapped.annotations), "demo")
        print(f"Status      version={status.version} healthz={status.healthz} key_id={status.key_id}")
        print(f"data key    {seed.hex()}")
        print(f"wrapped     {wrapped.ciphertext.hex()} ({len(wrapped.ciphertext)} bytes)")
        print(f"unwrapped   {back.hex()} -> {'match' if back == seed else 'MISMATCH'}")
        code, body = plugin.http("/healthz")
        print(f"/healthz    {code} {body.strip()}")
    finally:
        say("SIGTERM: draining and removing the socket")
        exit_code = plugin.stop(signal.SIGTERM)
    print(f"kleidi exited with {exit_code}; socket removed: {not os.path.exists(plugin.socket)}")
    ok = check.returncode == 0 and back == seed and exit_code == 0 and not os.path.exists(plugin.socket)
    say("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
