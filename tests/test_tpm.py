"""End to end on a software TPM: `kleidi serve` with `pkcs11.mechanism: aes-cbc-hmac` through tpm2-pkcs11.

One TPM (swtpm + tpm2-abrmd + a tpm2-pkcs11 store) and one kleidi process serve the whole module; tests that
restart kleidi or take the TPM away leave both healthy again. The TPM does about 360 operations a second and
every Encrypt or Decrypt costs two (AES-CBC and HMAC-SHA256), so request counts stay small.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from kleidi.providers.pkcs11_blob import parse
from tests.backends.tpm import SoftwareTPM
from tests.plugin import KleidiProcess, wait_for

pytestmark = pytest.mark.integration

AES_1, MAC_1 = "kleidi-kek-1", "kleidi-mac-1"
MAC_BYTES = 32
IV_BYTES = 16


@pytest.fixture(scope="module")
def tpm() -> Iterator[SoftwareTPM]:
    with SoftwareTPM(token_label="kleidi-tpm", aes_key_label=AES_1, hmac_key_label=MAC_1) as software_tpm:
        yield software_tpm


@pytest.fixture(scope="module")
def kleidi(tmp_path_factory: pytest.TempPathFactory, tpm: SoftwareTPM) -> Iterator[KleidiProcess]:
    config = {"provider": "pkcs11", "health_interval": "1s", "pkcs11": tpm.pkcs11_config()}
    with KleidiProcess(tmp_path_factory.mktemp("kleidi-tpm"), config, env={**os.environ, **tpm.env}) as proc:
        proc.start()
        proc.wait_healthy(30)
        yield proc


@pytest.fixture
def healthy(kleidi: KleidiProcess, tpm: SoftwareTPM) -> KleidiProcess:
    """The module's kleidi, healthy (a previous test may have failed half way through an outage)."""
    if not tpm.tpm_running:
        tpm.start_tpm()
    if kleidi.proc is None or kleidi.proc.poll() is not None:
        kleidi.start()
    kleidi.wait_healthy(30)
    return kleidi


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        # Reaching here means the call returned something for tampered input: show it in the failure.
        pytest.fail(f"expected an error, got {result!r}")
    return info.value


def flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


def test_v2_round_trip_with_status_and_encrypt_agreeing(healthy: KleidiProcess) -> None:
    with healthy.client() as kms:
        status = kms.status()
        assert (status.version, status.healthz) == ("v2", "ok")
        assert status.key_id.startswith(f"pkcs11:aes-cbc-hmac:{AES_1}+{MAC_1}:")
        seed = os.urandom(32)
        answer = kms.encrypt(seed, uid="tpm-1")
        assert answer.key_id == status.key_id
        assert dict(answer.annotations) == {}
        assert seed not in answer.ciphertext
        blob = parse(answer.ciphertext)
        assert blob.ref.mechanism == "aes-cbc-hmac"
        assert blob.ref.labels == (AES_1, MAC_1)
        # a 32-byte seed is two AES blocks plus one block of PKCS#7 padding
        assert (len(blob.iv), len(blob.ciphertext), len(blob.mac)) == (IV_BYTES, 48, MAC_BYTES)
        assert len(answer.ciphertext) < 1024
        assert kms.decrypt(answer.ciphertext, answer.key_id, {}, "tpm-2") == seed
        again = kms.encrypt(seed)
        assert parse(again.ciphertext).iv != blob.iv
        assert again.ciphertext != answer.ciphertext
        assert kms.decrypt(again.ciphertext, again.key_id) == seed


@pytest.mark.parametrize("size", [1, 15, 16, 17, 32, 33, 64, 500])
def test_round_trip_of_other_sizes(healthy: KleidiProcess, size: int) -> None:
    with healthy.client() as kms:
        data = os.urandom(size)
        answer = kms.encrypt(data)
        assert len(parse(answer.ciphertext).ciphertext) == (size // 16 + 1) * 16
        assert kms.decrypt(answer.ciphertext, answer.key_id) == data


def test_v1beta1_round_trip(healthy: KleidiProcess) -> None:
    with healthy.client() as kms:
        assert kms.v1_version().version == "v1beta1"
        dek = os.urandom(32)
        cipher = kms.v1_encrypt(dek)
        assert kms.v1_decrypt(cipher) == dek
        assert kms.decrypt(cipher) == dek


def test_flipping_any_bit_of_any_byte_is_an_error_never_a_plaintext(healthy: KleidiProcess) -> None:
    with healthy.client() as kms:
        seed = os.urandom(32)
        answer = kms.encrypt(seed)
        ciphertext = answer.ciphertext
        blob = parse(ciphertext)
        header = len(blob.header)
        regions = {
            "header": range(0, header),
            "iv": range(header, header + IV_BYTES),
            "ciphertext": range(header + IV_BYTES, len(ciphertext) - MAC_BYTES),
            "mac": range(len(ciphertext) - MAC_BYTES, len(ciphertext)),
        }
        assert sum(len(r) for r in regions.values()) == len(ciphertext)
        details: dict[str, set[str]] = {}
        for region, indexes in regions.items():
            for index in indexes:
                error = rpc_error(lambda i=index: kms.decrypt(flip(ciphertext, i)))
                assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (region, index)
                details.setdefault(region, set()).add(error.details())
        # IV, ciphertext and MAC are caught by the MAC check before anything is decrypted: one message for
        # all of them, whatever the padding of the garbled plaintext would have been (no padding oracle).
        after_header = details["iv"] | details["ciphertext"] | details["mac"]
        assert len(after_header) == 1, after_header
        assert "MAC" in next(iter(after_header))
        # The key reference in the header is authenticated too: a changed label or fingerprint finds no key
        # or fails the MAC, never decrypts.
        assert kms.decrypt(ciphertext, answer.key_id) == seed
        assert kms.status().healthz == "ok"


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("truncated by one byte", lambda ct: ct[:-1]),
        ("truncated by one block", lambda ct: ct[:-48] + ct[-32:]),
        ("one byte appended", lambda ct: ct + b"\x00"),
        ("one block appended", lambda ct: ct + bytes(16)),
        ("MAC removed", lambda ct: ct[:-32]),
        ("MAC zeroed", lambda ct: ct[:-32] + bytes(32)),
        ("ciphertext blocks swapped", lambda ct: ct[:-80] + ct[-64:-32] + ct[-80:-64] + ct[-32:]),
        ("random bytes", lambda ct: os.urandom(len(ct))),
    ],
)
def test_structural_tampering_is_rejected(healthy: KleidiProcess, name: str, mutate: Callable[[bytes], bytes]) -> None:
    with healthy.client() as kms:
        seed = os.urandom(32)
        answer = kms.encrypt(seed)
        bad = mutate(answer.ciphertext)
        assert bad != answer.ciphertext
        error = rpc_error(lambda: kms.decrypt(bad))
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), name
        assert kms.decrypt(answer.ciphertext, answer.key_id) == seed


def test_a_mac_from_another_blob_does_not_verify(healthy: KleidiProcess) -> None:
    with healthy.client() as kms:
        first, second = kms.encrypt(os.urandom(32)), kms.encrypt(os.urandom(32))
        spliced = first.ciphertext[:-MAC_BYTES] + second.ciphertext[-MAC_BYTES:]
        assert rpc_error(lambda: kms.decrypt(spliced)).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_parallel_clients(healthy: KleidiProcess) -> None:
    def worker(n: int) -> int:
        with healthy.client(timeout=10) as kms:
            ok = 0
            for _ in range(6):
                seed = os.urandom(32)
                answer = kms.encrypt(seed, uid=f"tpm-worker-{n}")
                ok += kms.decrypt(answer.ciphertext, answer.key_id) == seed
            return ok

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(worker, range(8))) == 8 * 6
    with healthy.client() as kms:
        assert kms.status().healthz == "ok"


def test_status_stays_fast_and_healthy_while_the_tpm_is_saturated(healthy: KleidiProcess) -> None:
    """Twelve callers keep the TPM busy (it runs one command at a time): Status is answered from cached
    health in milliseconds, the health check still gets its turn, and every call ends within its deadline."""
    stop = threading.Event()
    outcomes: list[tuple[str, float]] = []

    def load(n: int) -> None:
        with healthy.client(timeout=3) as kms:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    kms.encrypt(os.urandom(32), uid=f"load-{n}")
                    outcomes.append(("ok", time.monotonic() - began))
                except grpc.RpcError as exc:
                    outcomes.append((exc.code().name, time.monotonic() - began))

    threads = [threading.Thread(target=load, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    status_latency = []
    try:
        with healthy.client() as kms:
            until = time.monotonic() + 4  # several 1 s health intervals
            while time.monotonic() < until:
                began = time.monotonic()
                status = kms.status()
                status_latency.append(time.monotonic() - began)
                assert status.healthz == "ok", status.healthz
                time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert max(status_latency) < 0.25, max(status_latency)
    assert len(outcomes) > 100  # the TPM did real work meanwhile
    assert {code for code, _ in outcomes} == {"ok"}, {code for code, _ in outcomes}
    assert max(seconds for _, seconds in outcomes) < 3.5
    assert healthy.healthz() == (200, "ok\n")


def test_restart_of_kleidi_and_of_the_tpm_keeps_key_id_and_data(healthy: KleidiProcess, tpm: SoftwareTPM) -> None:
    seeds = [os.urandom(32) for _ in range(3)]
    with healthy.client() as kms:
        key_id = kms.status().key_id
        blobs = [kms.encrypt(seed) for seed in seeds]
    healthy.restart()
    healthy.wait_healthy(30)
    with healthy.client() as kms:
        assert kms.status().key_id == key_id
        assert [kms.decrypt(b.ciphertext, b.key_id) for b in blobs] == seeds
    # Everything down (kleidi, abrmd, swtpm), then up again from the TPM state and the store on disk.
    healthy.stop()
    tpm.stop_tpm()
    tpm.start_tpm()
    healthy.start()
    healthy.wait_healthy(30)
    with healthy.client() as kms:
        assert kms.status().key_id == key_id
        assert [kms.decrypt(b.ciphertext, b.key_id) for b in blobs] == seeds


def test_tpm_goes_away_and_comes_back_without_restarting_kleidi(healthy: KleidiProcess, tpm: SoftwareTPM) -> None:
    assert healthy.proc is not None
    pid = healthy.proc.pid
    with healthy.client() as kms:
        seed = os.urandom(32)
        blob = kms.encrypt(seed)
        tpm.stop_tpm()
        try:
            code, reason = wait_for(lambda: (h := healthy.healthz())[0] != 200 and h, 15, "healthz to fail")
            assert code == 503
            assert reason.strip() and reason.strip() != "ok"
            assert healthy.http("/livez")[0] == 200  # liveness never depends on the backend
            status = kms.status()
            assert status.healthz not in ("", "ok")
            assert status.key_id == blob.key_id
            assert rpc_error(lambda: kms.encrypt(os.urandom(32))).code() == grpc.StatusCode.UNAVAILABLE
            assert rpc_error(lambda: kms.decrypt(blob.ciphertext, blob.key_id)).code() == grpc.StatusCode.UNAVAILABLE
        finally:
            tpm.start_tpm()
        healthy.wait_healthy(30)
        assert kms.status().healthz == "ok"
        assert kms.status().key_id == blob.key_id
        assert kms.decrypt(blob.ciphertext, blob.key_id) == seed
        fresh = os.urandom(32)
        assert kms.decrypt(kms.encrypt(fresh).ciphertext) == fresh
    assert healthy.proc is not None and healthy.proc.pid == pid and healthy.proc.poll() is None


def _switch_keys(kleidi: KleidiProcess, tpm: SoftwareTPM, **labels: str) -> None:
    kleidi.stop()
    kleidi.write_config(pkcs11=tpm.pkcs11_config(**labels))
    kleidi.start()
    kleidi.wait_healthy(30)


def test_rotation_of_the_aes_key_then_of_the_hmac_key(healthy: KleidiProcess, tpm: SoftwareTPM) -> None:
    with healthy.client() as kms:
        key_1 = kms.status().key_id
        seed_1 = os.urandom(32)
        blob_1 = kms.encrypt(seed_1)

    tpm.add_aes_key("kleidi-kek-2")
    _switch_keys(healthy, tpm, key_label="kleidi-kek-2", hmac_key_label=MAC_1)
    with healthy.client() as kms:
        key_2 = kms.status().key_id
        assert key_2 != key_1
        assert key_2.startswith(f"pkcs11:aes-cbc-hmac:kleidi-kek-2+{MAC_1}:")
        seed_2 = os.urandom(32)
        blob_2 = kms.encrypt(seed_2)
        assert blob_2.key_id == key_2
        assert kms.decrypt(blob_1.ciphertext, blob_1.key_id) == seed_1
        assert kms.decrypt(blob_2.ciphertext, blob_2.key_id) == seed_2

    tpm.add_hmac_key("kleidi-mac-2")
    _switch_keys(healthy, tpm, key_label="kleidi-kek-2", hmac_key_label="kleidi-mac-2")
    with healthy.client() as kms:
        key_3 = kms.status().key_id
        assert key_3 not in (key_1, key_2)
        assert key_3.startswith("pkcs11:aes-cbc-hmac:kleidi-kek-2+kleidi-mac-2:")
        seed_3 = os.urandom(32)
        blob_3 = kms.encrypt(seed_3)
        assert blob_3.key_id == key_3
        # A blob names both of its keys: data from every generation still decrypts.
        assert kms.decrypt(blob_1.ciphertext, blob_1.key_id) == seed_1
        assert kms.decrypt(blob_2.ciphertext, blob_2.key_id) == seed_2
        assert kms.decrypt(blob_3.ciphertext, blob_3.key_id) == seed_3
        # The MAC of one generation does not vouch for another's.
        spliced = parse(blob_3.ciphertext).header + blob_2.ciphertext[len(parse(blob_2.ciphertext).header) :]
        assert rpc_error(lambda: kms.decrypt(spliced)).code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
        )


def test_an_ambiguous_label_is_refused_with_a_reason(healthy: KleidiProcess, tpm: SoftwareTPM) -> None:
    """tpm2_ptool happily creates two keys with one label; kleidi must not pick one of them."""
    previous = dict(healthy.config["pkcs11"])
    tpm.add_aes_key("kleidi-kek-twin")
    tpm.add_aes_key("kleidi-kek-twin")
    try:
        healthy.stop()
        healthy.write_config(pkcs11={**previous, "key_label": "kleidi-kek-twin"})
        healthy.start()
        wait_for(lambda: "kleidi-kek-twin" in healthy.healthz()[1], 20, "the ambiguous label in healthz")
        assert healthy.healthz()[0] == 503
        with healthy.client() as kms:
            assert rpc_error(lambda: kms.encrypt(os.urandom(32))).code() != grpc.StatusCode.OK
    finally:
        healthy.stop()
        healthy.write_config(pkcs11=previous)
        healthy.start()
        healthy.wait_healthy(30)


def test_no_secret_in_logs_or_command_lines(healthy: KleidiProcess, tpm: SoftwareTPM) -> None:
    seed = os.urandom(32)
    with healthy.client() as kms:
        kms.decrypt(kms.encrypt(seed, uid="tpm-audit").ciphertext)
    assert healthy.proc is not None
    pids = [healthy.proc.pid, *tpm.pids]
    for pid in pids:
        assert tpm.pin.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    raw = healthy.log_file.read_bytes()
    assert tpm.pin.encode() not in raw
    assert seed not in raw and seed.hex().encode() not in raw
    for log in tpm.log_dir.iterdir():
        assert tpm.pin.encode() not in log.read_bytes()


def test_two_nodes_with_the_same_imported_keys_share_key_id_and_data(
    healthy: KleidiProcess, tpm: SoftwareTPM, tmp_path: Path
) -> None:
    """The multi-node pattern of docs/tpm.md: the same key material imported into every node's TPM."""
    aes_material, mac_material = os.urandom(32), os.urandom(32)
    tpm.import_aes_key("kleidi-shared-kek-1", aes_material)
    tpm.import_hmac_key("kleidi-shared-mac-1", mac_material)
    shared = {"key_label": "kleidi-shared-kek-1", "hmac_key_label": "kleidi-shared-mac-1"}
    previous = dict(healthy.config["pkcs11"])
    try:
        _switch_keys(healthy, tpm, **shared)
        with SoftwareTPM(token_label="kleidi-tpm", aes_key_label="node-b-kek", hmac_key_label="node-b-mac") as node_b:
            node_b.import_aes_key("kleidi-shared-kek-1", aes_material)
            node_b.import_hmac_key("kleidi-shared-mac-1", mac_material)
            config = {"provider": "pkcs11", "health_interval": "1s", "pkcs11": node_b.pkcs11_config(**shared)}
            with KleidiProcess(tmp_path / "node-b", config, env={**os.environ, **node_b.env}) as other:
                other.start()
                other.wait_healthy(30)
                with healthy.client() as kms_a, other.client() as kms_b:
                    assert kms_a.status().key_id == kms_b.status().key_id
                    seed_a, seed_b = os.urandom(32), os.urandom(32)
                    from_a, from_b = kms_a.encrypt(seed_a), kms_b.encrypt(seed_b)
                    assert kms_b.decrypt(from_a.ciphertext, from_a.key_id) == seed_a
                    assert kms_a.decrypt(from_b.ciphertext, from_b.key_id) == seed_b
                # A key generated inside one TPM exists nowhere else: node B cannot read node A's old data.
                other.stop()
                other.write_config(pkcs11=node_b.pkcs11_config())
                other.start()
                other.wait_healthy(30)
                with healthy.client() as kms_a, other.client() as kms_b:
                    assert kms_a.status().key_id != kms_b.status().key_id
                    local = kms_b.encrypt(os.urandom(32))
                    assert rpc_error(lambda: kms_a.decrypt(local.ciphertext, local.key_id)).code() == (
                        grpc.StatusCode.NOT_FOUND
                    )
    finally:
        healthy.stop()
        healthy.write_config(pkcs11=previous)
        healthy.start()
        healthy.wait_healthy(30)


def test_a_wrong_pin_is_offered_to_the_tpm_once_not_until_lockout(healthy: KleidiProcess, tpm: SoftwareTPM) -> None:
    """A wrong PIN counts against the TPM's dictionary-attack protection, which guards every key on the TPM
    (swtpm: 3 failures, then 1000 s of lockout). The TPM's own counter proves kleidi tried it once."""
    tpm.clear_lockout()
    assert tpm.lockout_counter() == 0
    try:
        healthy.stop()
        tpm.pin_file.write_text("not-the-pin")
        healthy.start()
        wait_for(lambda: "PIN" in healthy.healthz()[1], 20, "the refused PIN in healthz")
        # several health intervals (1 s) later, still one failure on the TPM
        wait_for(lambda: "refused this PIN before" in healthy.healthz()[1], 20, "the latch to hold")
        assert healthy.healthz()[0] == 503
        assert tpm.lockout_counter() == 1
        assert b"not-the-pin" not in healthy.log_file.read_bytes()
        # the right PIN again: kleidi picks it up without a restart
        tpm.pin_file.write_text(tpm.pin)
        healthy.wait_healthy(30)
        assert tpm.lockout_counter() == 1
    finally:
        tpm.pin_file.write_text(tpm.pin)
        tpm.clear_lockout()
