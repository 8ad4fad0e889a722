"""Vault provider pieces that need injected faults: the retry loop, redaction, local ciphertext checks."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kleidi.config import VaultConfig
from kleidi.errors import AuthFailed, BackendUnavailable, InvalidInput
from kleidi.observability import Metrics
from kleidi.providers.vault import VaultProvider
from kleidi.providers.vault_auth import VaultAuth, VaultToken
from kleidi.providers.vault_fast import post_request
from kleidi.providers.vault_http import Redactor, Reply, TlsFailure, VaultHttp

pytestmark = pytest.mark.unit

SEALED = Reply(503, {"errors": ["Vault is sealed"]})
OK = Reply(200, {"data": {}})


def http() -> VaultHttp:
    config = VaultConfig.model_validate(
        {"address": "http://127.0.0.1:1", "timeout": "1s", "auth": {"method": "token", "token_env": "NOPE"}}
    )
    return VaultHttp(config, Metrics())


class Script:
    """Stands in for VaultHttp.send: answers (or raises) from a list, recording the tokens it was given."""

    def __init__(self, *answers: Reply | Exception) -> None:
        self.answers = list(answers)
        self.tokens: list[str | None] = []

    def __call__(self, method: str, path: str, op: str, token: str | None, payload: Any, timeout: float) -> Reply:
        self.tokens.append(token)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Tokens:
    """A token source that hands out tok-1, then tok-2 after a refusal."""

    def __init__(self, relogin: bool = True) -> None:
        self.generation = 1
        self.relogin = relogin
        self.refusals = 0

    def current(self, deadline: float) -> VaultToken:
        return VaultToken(value=f"tok-{self.generation}", generation=self.generation)

    def refused(self, token: Any) -> bool:
        self.refusals += 1
        if self.relogin:
            self.generation += 1
        return self.relogin


@pytest.fixture
def vh() -> Iterator[VaultHttp]:
    client = http()
    yield client
    client.close()


def test_transient_answers_are_retried_until_one_succeeds(vh: VaultHttp, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(SEALED, BackendUnavailable("cannot connect"), Reply(502, {}), OK)
    monkeypatch.setattr(vh, "send", script)
    assert vh.call("POST", "transit/encrypt/k", "encrypt", {}, time.monotonic() + 5).status == 200
    assert len(script.tokens) == 4


def test_retries_stop_before_the_deadline_with_the_last_reason(vh: VaultHttp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vh, "send", Script(SEALED))
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="is sealed"):
        vh.call("POST", "transit/encrypt/k", "encrypt", {}, started + 0.5)
    assert time.monotonic() - started < 0.5


def test_client_errors_and_tls_failures_are_not_retried(vh: VaultHttp, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(Reply(400, {"errors": ["bad"]}))
    monkeypatch.setattr(vh, "send", script)
    assert vh.call("POST", "p", "encrypt", {}, time.monotonic() + 5).status == 400
    assert len(script.tokens) == 1
    tls = Script(TlsFailure("TLS to Vault failed"))
    monkeypatch.setattr(vh, "send", tls)
    with pytest.raises(TlsFailure):
        vh.call("POST", "p", "encrypt", {}, time.monotonic() + 5)
    assert len(tls.tokens) == 1


def test_a_refused_token_is_replaced_once(vh: VaultHttp, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(Reply(403, {"errors": ["permission denied"]}), OK)
    monkeypatch.setattr(vh, "send", script)
    tokens = Tokens()
    assert vh.call("POST", "p", "encrypt", {}, time.monotonic() + 5, auth=tokens).status == 200
    assert script.tokens == ["tok-1", "tok-2"]
    # Refused again after the new login: the answer goes back to the caller, no login loop.
    denied = Script(Reply(403, {"errors": ["permission denied"]}))
    monkeypatch.setattr(vh, "send", denied)
    assert vh.call("POST", "p", "encrypt", {}, time.monotonic() + 5, auth=tokens).status == 403
    assert tokens.refusals == 2 and len(denied.tokens) == 2
    # A token the source says is alive (a policy refusal) is not retried at all.
    alive = Tokens(relogin=False)
    policy = Script(Reply(403, {"errors": ["permission denied"]}))
    monkeypatch.setattr(vh, "send", policy)
    assert vh.call("POST", "p", "encrypt", {}, time.monotonic() + 5, auth=alive).status == 403
    assert policy.tokens == ["tok-1"]


def test_redactor_removes_known_secrets_and_token_shapes() -> None:
    redactor = Redactor()
    redactor.add("my-secret-id-1234")
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    text = f"bad secret my-secret-id-1234, token hvs.CAESIabcdefghijklmnop and s.abcdefghijklmnopqrstuvwx, jwt {jwt}"
    cleaned = redactor.clean(text)
    for secret in ("my-secret-id-1234", "hvs.CAESI", "s.abcdefgh", "eyJhbGci", "c2lnbmF0dXJl"):
        assert secret not in cleaned
    assert cleaned.count("[redacted]") == 4
    assert len(redactor.clean("x" * 1000)) == 200


def test_token_repr_hides_the_token() -> None:
    token = VaultToken(value="s.supersecretvalue", generation=3, ttl=60)
    assert "supersecret" not in repr(token) and "supersecret" not in str(token)


@pytest.mark.parametrize(
    "ciphertext",
    [b"\xff\xfe", b"", b"vault:v0:AAAA", b"vault:vx:AAAA", b"vault:v1:", b"vault:v1:AA AA", b"k8s:enc:kms:v2:x"],
)
def test_malformed_ciphertext_is_rejected_without_calling_vault(ciphertext: bytes) -> None:
    config = VaultConfig.model_validate(
        {"address": "http://127.0.0.1:1", "auth": {"method": "token", "token_env": "KLEIDI_TEST_UNSET"}}
    )
    provider = VaultProvider(config, Metrics())
    try:
        with pytest.raises(InvalidInput, match="not a Vault transit ciphertext"):
            provider.decrypt(ciphertext, "", {}, "uid")
    finally:
        provider.close()


def test_a_token_with_a_line_break_is_refused_before_it_reaches_a_header(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("hvs.abcdefghijkl\r\nX-Forged: yes\n")
    config = VaultConfig.model_validate(
        {"address": "http://127.0.0.1:1", "timeout": "1s", "auth": {"method": "token", "token_file": str(token_file)}}
    )
    client = VaultHttp(config, Metrics())
    sent: list[Any] = []
    client.send = lambda *args: sent.append(args) or OK  # type: ignore[method-assign]
    with pytest.raises(AuthFailed, match="holds spaces or control characters") as info:
        VaultAuth(config, client, Metrics()).current(time.monotonic() + 1)
    assert sent == [] and "Forged" not in str(info.value) and "hvs." not in str(info.value)


def test_fast_path_requests_bracket_ipv6_and_refuse_line_breaks() -> None:
    request = post_request("::1", 8200, "/v1/transit/encrypt/k", {"X-Vault-Token": "hvs.x"}, {"plaintext": "AA=="})
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[:3] == [
        b"POST /v1/transit/encrypt/k HTTP/1.1",
        b"Host: [::1]:8200",
        f"Content-Length: {len(body)}".encode(),
    ]
    assert json.loads(body) == {"plaintext": "AA=="}
    assert b"Host: vault.example:8200" in post_request("vault.example", 8200, "/v1/x", {}, {})
    for bad in ({"X-Vault-Token": "hvs.x\r\nX-Forged: 1"}, {"X-Vault-Token": "hvs.x\n"}, {"X\r\nY": "1"}):
        with pytest.raises(ValueError):
            post_request("127.0.0.1", 8200, "/v1/x", bad, {})


def test_an_oversized_vault_answer_is_refused_unread() -> None:
    class Huge(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(8 * 1024 * 1024))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client stops reading and closes
                for _ in range(8 * 1024):
                    self.wfile.write(b"x" * 1024)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Huge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = VaultConfig.model_validate(
            {"address": f"http://127.0.0.1:{server.server_address[1]}", "auth": {"token_env": "NOPE"}}
        )
        client = VaultHttp(config, Metrics())
        with pytest.raises(BackendUnavailable, match="with over 1048576 bytes; refused unread"):
            client.send("POST", "transit/encrypt/k", "encrypt", "hvs.x", {}, 5)
        client.close()
    finally:
        server.shutdown()
        server.server_close()
