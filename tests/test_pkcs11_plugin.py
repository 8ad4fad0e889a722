"""End to end: `kleidi serve` on a real SoftHSM2 token, called over its socket like the apiserver does."""

from __future__ import annotations

import os
import signal
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kleidi.client import KmsClient
from tests.backends.softhsm import SoftHsm
from tests.conftest import pkcs11_config
from tests.plugin import KleidiProcess, wait_for

pytestmark = pytest.mark.integration


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()


def test_v2_round_trip_and_status_agree(serving: KleidiProcess) -> None:
    with serving.client() as kms:
        status = kms.status()
        assert (status.version, status.healthz) == ("v2", "ok")
        assert status.key_id.startswith("pkcs11:aes-gcm:kek-1:")
        seed = os.urandom(32)
        answer = kms.encrypt(seed, uid="uid-1")
        assert answer.key_id == status.key_id
        assert seed not in answer.ciphertext
        assert len(answer.ciphertext) < 1024
        assert dict(answer.annotations) == {}
        assert kms.decrypt(answer.ciphertext, answer.key_id, {}, "uid-2") == seed
        # a fresh random IV every time: the same seed never gives the same blob
        assert kms.encrypt(seed).ciphertext != answer.ciphertext


def test_v1beta1_round_trip(serving: KleidiProcess) -> None:
    with serving.client() as kms:
        version = kms.v1_version()
        assert (version.version, version.runtime_name) == ("v1beta1", "kleidi")
        dek = os.urandom(32)
        cipher = kms.v1_encrypt(dek)
        assert kms.v1_decrypt(cipher) == dek
        # v1 and v2 share the KEK and the blob format
        assert kms.decrypt(cipher) == dek


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("garbage", lambda ct: os.urandom(len(ct))),
        ("truncated", lambda ct: ct[: len(ct) - 5]),
        ("header only", lambda ct: ct[:20]),
        ("bit flip in tag", lambda ct: ct[:-1] + bytes([ct[-1] ^ 1])),
        ("bit flip in iv", lambda ct: ct[:-40] + bytes([ct[-40] ^ 1]) + ct[-39:]),
        ("bit flip in header", lambda ct: ct[:5] + bytes([ct[5] ^ 1]) + ct[6:]),
        ("future version", lambda ct: ct[:2] + b"\x09" + ct[3:]),
    ],
)
def test_bad_ciphertext_is_rejected_and_server_keeps_serving(serving: KleidiProcess, name: str, mutate: object) -> None:
    with serving.client() as kms:
        seed = os.urandom(32)
        answer = kms.encrypt(seed)
        bad = mutate(answer.ciphertext)  # type: ignore[operator]
        code = _code(lambda: kms.decrypt(bad, "", {}))
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), name
        assert kms.decrypt(answer.ciphertext, answer.key_id) == seed


def test_bad_requests_get_clear_errors(serving: KleidiProcess) -> None:
    with serving.client() as kms:
        answer = kms.encrypt(os.urandom(32))
        with pytest.raises(grpc.RpcError) as info:
            kms.decrypt(answer.ciphertext, "pkcs11:aes-gcm:other:0011223344556677")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "key_id does not match" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            kms.decrypt(answer.ciphertext, answer.key_id, {"version.kleidi.dev": b"1"})
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "annotations" in info.value.details()
        assert _code(lambda: kms.decrypt(answer.ciphertext, answer.key_id, {"Not_A_Domain": b"x"})) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert _code(lambda: kms.encrypt(b"")) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: kms.encrypt(os.urandom(5000))) == grpc.StatusCode.INVALID_ARGUMENT
        # bigger than max_request_bytes: refused by gRPC before it reaches kleidi
        assert _code(lambda: kms.encrypt(os.urandom(70 * 1024))) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _code(lambda: kms.decrypt(b"")) == grpc.StatusCode.INVALID_ARGUMENT
        assert kms.status().healthz == "ok"


def test_parallel_clients(serving: KleidiProcess) -> None:
    def worker(n: int) -> int:
        with serving.client() as kms:
            ok = 0
            for _ in range(40):
                seed = os.urandom(32)
                answer = kms.encrypt(seed, uid=f"worker-{n}")
                ok += kms.decrypt(answer.ciphertext, answer.key_id) == seed
            return ok

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(worker, range(8))) == 8 * 40


def test_probes_and_metrics(serving: KleidiProcess) -> None:
    assert serving.http("/livez") == (200, "ok\n")
    assert serving.http("/healthz") == (200, "ok\n")
    assert serving.http("/readyz") == (200, "ok\n")
    with serving.client() as kms:
        kms.encrypt(os.urandom(32))
        key_id = kms.status().key_id
    code, text = serving.http("/metrics")
    assert code == 200
    assert 'kleidi_requests_total{api="v2",code="OK",method="Encrypt"}' in text
    assert "kleidi_request_duration_seconds_bucket" in text
    assert 'kleidi_backend_duration_seconds_count{operation="encrypt",provider="pkcs11"}' in text
    assert "kleidi_healthy 1.0" in text
    assert "kleidi_current_key_info{key_id_hash=" in text
    assert key_id not in text


def test_logs_are_json_with_uid_and_no_secrets(serving: KleidiProcess, shared_hsm: SoftHsm) -> None:
    seed = os.urandom(32)
    with serving.client() as kms:
        answer = kms.encrypt(seed, uid="audit-uid-42")
        kms.decrypt(answer.ciphertext, answer.key_id, {}, "audit-uid-43")
        with pytest.raises(grpc.RpcError):
            kms.decrypt(os.urandom(60), "", {}, "audit-uid-44")
    records = serving.log_records()
    uids = {r.get("uid") for r in records}
    assert {"audit-uid-42", "audit-uid-43", "audit-uid-44"} <= uids
    failed = next(r for r in records if r.get("uid") == "audit-uid-44")
    assert failed["level"] == "warning" and failed["error"] == "invalid_input"
    raw = serving.log_file.read_bytes()
    for secret in (shared_hsm.pin, shared_hsm.so_pin, seed.hex()):
        assert secret.encode() not in raw
    assert seed not in raw


def test_rotation_keeps_old_data_readable(plugin: KleidiProcess, softhsm: SoftHsm) -> None:
    plugin.start()
    plugin.wait_healthy()
    with plugin.client() as kms:
        seed_1 = os.urandom(32)
        old = kms.encrypt(seed_1)
        key_1 = kms.status().key_id
    plugin.stop()
    softhsm.keygen("kek-2")
    plugin.write_config(pkcs11=softhsm.config("kek-2"))
    plugin.start()
    plugin.wait_healthy()
    with plugin.client() as kms:
        key_2 = kms.status().key_id
        assert key_2 != key_1 and key_2.startswith("pkcs11:aes-gcm:kek-2:")
        new = kms.encrypt(os.urandom(32))
        assert new.key_id == key_2
        assert kms.decrypt(old.ciphertext, old.key_id) == seed_1
        assert kms.v1_decrypt(old.ciphertext) == seed_1


def test_key_id_is_stable_across_restarts_and_never_reused(plugin: KleidiProcess, softhsm: SoftHsm) -> None:
    plugin.start()
    plugin.wait_healthy()
    seeds = [os.urandom(32) for _ in range(5)]
    with plugin.client() as kms:
        key_id = kms.status().key_id
        blobs = [kms.encrypt(s) for s in seeds]
    plugin.restart()
    plugin.wait_healthy()
    with plugin.client() as kms:
        assert kms.status().key_id == key_id
        assert [kms.decrypt(b.ciphertext, b.key_id) for b in blobs] == seeds
    # a different key under the same label gets a different key_id, and old blobs are not mistaken for it
    plugin.stop()
    softhsm.delete_key("kek-1")
    softhsm.keygen("kek-1")
    plugin.start()
    plugin.wait_healthy()
    with plugin.client() as kms:
        assert kms.status().key_id != key_id
        with pytest.raises(grpc.RpcError) as info:
            kms.decrypt(blobs[0].ciphertext, blobs[0].key_id)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_token_disappears_and_comes_back(plugin: KleidiProcess, softhsm: SoftHsm) -> None:
    plugin.start()
    plugin.wait_healthy()
    with plugin.client() as kms:
        seed = os.urandom(32)
        blob = kms.encrypt(seed)
        aside = softhsm.take_away()
        _, reason = wait_for(lambda: (h := plugin.healthz())[0] == 503 and h, 15, "healthz to turn 503")
        assert "kek-1" in reason or "token" in reason
        assert plugin.http("/livez")[0] == 200
        status = kms.status()
        assert status.healthz != "ok" and status.key_id == blob.key_id
        assert _code(lambda: kms.encrypt(os.urandom(32))) == grpc.StatusCode.UNAVAILABLE
        softhsm.bring_back(aside)
        plugin.wait_healthy(20)
        assert kms.status().healthz == "ok"
        assert kms.decrypt(blob.ciphertext, blob.key_id) == seed
    assert plugin.proc is not None and plugin.proc.poll() is None


def test_wrong_pin_fails_closed_without_retrying(plugin: KleidiProcess, softhsm: SoftHsm) -> None:
    softhsm.pin_file.write_text("999999\n")
    plugin.start()
    _, reason = wait_for(lambda: (h := plugin.healthz())[0] == 503 and "PIN" in h[1] and h, 15, "PIN failure")
    assert "CKR_PIN_INCORRECT" in reason and "not retrying" in reason
    wait_for(lambda: "refused this PIN before" in plugin.healthz()[1], 15, "the latch to hold")
    with plugin.client() as kms:
        assert _code(lambda: kms.encrypt(os.urandom(32))) == grpc.StatusCode.UNAVAILABLE
    # the token saw exactly one failed login: its counter flags say so
    assert sum("refused the PIN (" in line for line in plugin.log().splitlines()) == 1
    assert "999999" not in plugin.log()
    # fixing the PIN file recovers without a restart
    softhsm.pin_file.write_text(softhsm.pin + "\n")
    plugin.wait_healthy(20)


def test_missing_key_reports_unhealthy_with_reason(plugin: KleidiProcess, softhsm: SoftHsm) -> None:
    plugin.write_config(pkcs11=softhsm.config("no-such-key"))
    plugin.start()
    wait_for(lambda: "no secret key labelled 'no-such-key'" in plugin.healthz()[1], 15, "reason in healthz")
    with plugin.client() as kms:
        assert kms.status().healthz.startswith("no secret key labelled")


def test_sigterm_drains_and_removes_socket(plugin: KleidiProcess) -> None:
    plugin.start()
    plugin.wait_healthy()
    results: list[bool] = []
    refused: list[grpc.StatusCode] = []
    with plugin.client() as kms:
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                seed = os.urandom(32)
                try:
                    results.append(kms.decrypt(kms.encrypt(seed).ciphertext) == seed)
                except grpc.RpcError as exc:  # refused once shutdown began: fine, as long as no answer was wrong
                    refused.append(exc.code())
                    return

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) > 50, 10, "load to run")
        assert plugin.stop(signal.SIGTERM) == 0
        stop.set()
        for t in threads:
            t.join()
    assert all(results)
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert not os.path.exists(plugin.socket)


def test_socket_mode_and_group(plugin: KleidiProcess) -> None:
    plugin.start()
    assert stat.S_IMODE(os.lstat(plugin.socket).st_mode) == 0o600
    plugin.stop()
    plugin.write_config(socket_mode="0660", socket_group=str(os.getgid()))
    plugin.start()
    st = os.lstat(plugin.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()


def test_socket_safety(plugin: KleidiProcess, tmp_path: object) -> None:
    run = os.path.dirname(plugin.socket)
    os.makedirs(run, exist_ok=True)
    # a regular file is refused and left alone
    with open(plugin.socket, "w") as f:
        f.write("precious")
    plugin.start(wait=False)
    assert plugin.wait_exit() != 0
    assert "is not a socket" in plugin.log()
    with open(plugin.socket) as f:
        assert f.read() == "precious"
    os.unlink(plugin.socket)
    # a symlink is refused and left alone
    target = os.path.join(run, "elsewhere")
    os.symlink(target, plugin.socket)
    plugin.start(wait=False)
    assert plugin.wait_exit() != 0
    assert "is a symlink" in plugin.log()
    assert os.path.islink(plugin.socket)
    os.unlink(plugin.socket)
    # a live socket (another kleidi) is refused
    plugin.start()
    second = KleidiProcess(
        plugin.workdir / "second", {**plugin.config, "listen": f"unix://{plugin.socket}"}, env=plugin.env
    )
    second.start(wait=False)
    assert second.wait_exit() != 0
    assert "another process is serving" in second.log()
    with plugin.client() as kms:
        assert kms.status().healthz == "ok"
    # a stale socket left by a killed process is proven dead, then replaced
    plugin.stop(signal.SIGKILL)
    assert stat.S_ISSOCK(os.lstat(plugin.socket).st_mode)
    plugin.start()
    plugin.wait_healthy()
    assert "removed stale socket" in plugin.log()


def test_config_errors_name_the_field(plugin: KleidiProcess, softhsm: SoftHsm) -> None:
    cases = {
        "pkcs11.key_lable": ({"pkcs11": {**softhsm.config("kek-1"), "key_lable": "x"}}, "unknown key"),
        "pkcs11.token_label": (
            {"pkcs11": {k: v for k, v in softhsm.config("kek-1").items() if k != "token_label"}},
            "required but missing",
        ),
        "health_interval": ({"health_interval": "soon"}, "health_interval"),
        "pkcs11.pin": ({"pkcs11": {**softhsm.config("kek-1"), "pin_env": "X"}}, "pin"),
    }
    for field, (change, expected) in cases.items():
        plugin.write_config(**change)
        plugin.start(wait=False)
        assert plugin.wait_exit() == 2, field
        lines = [line for line in plugin.log().splitlines() if line.startswith("kleidi: config:")]
        assert lines and expected in lines[-1] and field.split(".")[0] in lines[-1], (field, lines[-1:])
        plugin.stop()
        plugin.config = {**plugin.config, **pkcs11_config(softhsm)}
        plugin.config.pop("health_interval", None)


def test_listen_and_log_level_overrides(plugin: KleidiProcess) -> None:
    other = str(plugin.workdir / "other" / "k.sock")
    plugin.start(wait=False, extra_args=("--listen", f"unix://{other}", "--log-level", "debug"))
    wait_for(lambda: os.path.exists(other), 20, "socket at the --listen path")
    with KmsClient(other) as kms:
        wait_for(lambda: kms.status().healthz == "ok", 10, "healthy")
    assert not os.path.exists(plugin.socket)
    wait_for(lambda: any(r["level"] == "debug" for r in plugin.log_records()), 10, "a debug line")
