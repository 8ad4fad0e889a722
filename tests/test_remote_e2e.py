"""Proxy mode end to end: real `kleidi serve` processes on 127.0.0.1. Key servers (a SoftHSM token, serve_remote
with mutual TLS) and a control-plane plugin (provider: remote) on a unix socket, talked to as the apiserver does.

The processes are shared by the module: the tests that kill or change one put it back as they found it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kleidi import pki
from kleidi.observability import key_id_hash
from tests.backends.softhsm import SoftHsm
from tests.conftest import pkcs11_config
from tests.plugin import KleidiProcess, free_port, wait_for

pytestmark = pytest.mark.integration

# The plugin checks its key servers this often: a key server going away shows on /healthz within about this long.
HEALTH_INTERVAL = 1.0
REMOTE_TIMEOUT = 1.0
ALLOWED = ["cp-1", "cp-2"]


@dataclass
class Cluster:
    certs: Path
    hsm: SoftHsm
    ks1: KleidiProcess
    ks2: KleidiProcess
    odd: KleidiProcess  # a key server with another KEK: it must never be used
    client: KleidiProcess
    client_cert: Path
    client_key: Path

    def endpoint(self, ks: KleidiProcess) -> str:
        return str(ks.config["serve_remote"]["listen"])

    def use_client_cert(self, name: str) -> None:
        """A rotation on disk, as a cert-manager or an operator does it: written aside, then renamed into place."""
        cert, key = pki.leaf_files(self.certs, "client", name)
        for source, target in ((key, self.client_key), (cert, self.client_cert)):
            aside = target.with_name(target.name + ".new")
            aside.write_bytes(source.read_bytes())
            aside.chmod(0o600)
            os.replace(aside, target)


def key_server(root: Path, certs: Path, hsm: SoftHsm, key_label: str) -> KleidiProcess:
    cert, key = pki.leaf_files(certs, "server", "keyserver")
    config = {
        **pkcs11_config(hsm, key_label),
        "serve_remote": {
            "listen": f"127.0.0.1:{free_port()}",
            "ca_cert": str(certs / pki.CA_CERT),
            "cert": str(cert),
            "key": str(key),
            "allowed_client_names": ALLOWED,
        },
    }
    return KleidiProcess(root, config, env=hsm.env)


def metric(proc: KleidiProcess, name: str, **labels: str) -> float | None:
    """One sample from the process's /metrics, or None when it is not there."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    return proc.metrics().get(wanted)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("remote")
    certs = root / "pki"
    leaves = [pki.Request("server", "keyserver", ("127.0.0.1",))]
    leaves += [pki.Request("client", name) for name in ("cp-1", "cp-2", "cp-9")]
    pki.init(certs, leaves, days=1, ca_days=1)
    hsm = SoftHsm(root / "hsm")
    hsm.keygen("kek-1")
    hsm.keygen("kek-2")
    # Two key servers on the same token (as two hosts with the same HSM partition would be) and one on another KEK.
    ks1 = key_server(root / "ks1", certs, hsm, "kek-1")
    ks2 = key_server(root / "ks2", certs, hsm, "kek-1")
    odd = key_server(root / "odd", certs, hsm, "kek-2")
    client_dir = root / "client-certs"
    client_dir.mkdir(mode=0o700)
    client_cert, client_key = client_dir / "client.pem", client_dir / "client-key.pem"
    endpoints = [str(ks.config["serve_remote"]["listen"]) for ks in (ks1, ks2, odd)]
    client = KleidiProcess(
        root / "client",
        {
            "provider": "remote",
            "health_interval": f"{HEALTH_INTERVAL}s",
            "remote": {
                "endpoints": endpoints,
                "ca_cert": str(certs / pki.CA_CERT),
                "client_cert": str(client_cert),
                "client_key": str(client_key),
                "timeout": f"{REMOTE_TIMEOUT}s",
            },
        },
    )
    made = Cluster(certs, hsm, ks1, ks2, odd, client, client_cert, client_key)
    made.use_client_cert("cp-1")
    try:
        for proc in (ks1, ks2, odd):
            proc.start(wait=False)
        for proc in (ks1, ks2, odd):
            wait_for(proc._serving, 20, f"key server on {proc.socket}\n{proc.log()}")
        client.start()
        for proc in (ks1, ks2, odd, client):
            proc.wait_healthy()
        # The plugin's first check may have found a key server still starting (no key_id yet): wait for the next.
        wait_for(lambda: settled(made), 10, f"the plugin to know every key server\n{client.log()[-3000:]}")
        yield made
    finally:
        for proc in (client, ks1, ks2, odd):
            proc.stop()


def settled(cluster: Cluster) -> bool:
    up = [
        metric(cluster.client, "kleidi_remote_endpoint_up", endpoint=cluster.endpoint(ks))
        for ks in (cluster.ks1, cluster.ks2)
    ]
    mismatch = metric(cluster.client, "kleidi_remote_endpoint_key_mismatch", endpoint=cluster.endpoint(cluster.odd))
    return up == [1, 1] and mismatch == 1


# --- round trips -------------------------------------------------------------------------------------------------


def test_v2_round_trips_through_the_client_carry_the_key_servers_blobs(cluster: Cluster) -> None:
    """Blobs and key_id are the key server's own: data written in local mode reads in remote mode and back, so a
    cluster moves between the two without re-encrypting."""
    with cluster.client.client() as remote, cluster.ks1.client() as local:
        key_id = local.status().key_id
        assert remote.status().key_id == key_id
        assert remote.status().healthz == "ok"
        seed = os.urandom(32)
        made_remote = remote.encrypt(seed, uid="e2e-1")
        assert made_remote.key_id == key_id
        assert local.decrypt(made_remote.ciphertext, made_remote.key_id, made_remote.annotations) == seed
        assert remote.decrypt(made_remote.ciphertext, made_remote.key_id, made_remote.annotations) == seed
        made_local = local.encrypt(seed)
        assert remote.decrypt(made_local.ciphertext, made_local.key_id, made_local.annotations) == seed
        # the same blob format either way: same length, same key_id, same annotations
        assert len(made_local.ciphertext) == len(made_remote.ciphertext)
        assert dict(made_local.annotations) == dict(made_remote.annotations)
        # bad input is the caller's error, answered at once, not an outage
        with pytest.raises(grpc.RpcError) as raised:
            remote.decrypt(made_remote.ciphertext[:-1] + bytes([made_remote.ciphertext[-1] ^ 1]), key_id)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_v1_round_trips_through_the_client(cluster: Cluster) -> None:
    with cluster.client.client() as remote, cluster.ks2.client() as local:
        seed = os.urandom(32)
        assert local.v1_decrypt(remote.v1_encrypt(seed)) == seed
        assert remote.v1_decrypt(local.v1_encrypt(seed)) == seed


def test_a_key_server_with_another_kek_is_refused_and_reported(cluster: Cluster) -> None:
    odd = cluster.endpoint(cluster.odd)
    with cluster.odd.client() as own:
        odd_key_id = own.status().key_id
    with cluster.client.client() as remote:
        agreed = remote.status().key_id
        assert agreed != odd_key_id
        assert {remote.encrypt(os.urandom(32)).key_id for _ in range(10)} == {agreed}
    assert metric(cluster.client, "kleidi_remote_endpoint_key_mismatch", endpoint=odd) == 1
    assert metric(cluster.client, "kleidi_remote_endpoint_up", endpoint=odd) == 0
    assert metric(cluster.client, "kleidi_remote_calls_total", endpoint=odd, method="Encrypt", code="OK") is None
    for ks in (cluster.ks1, cluster.ks2):
        assert metric(cluster.client, "kleidi_remote_endpoint_key_mismatch", endpoint=cluster.endpoint(ks)) == 0
    refusals = [r for r in cluster.client.log_records() if r.get("endpoint") == odd and "another KEK" in r["msg"]]
    assert refusals, cluster.client.log()[-3000:]
    assert refusals[-1]["key_id_hash"] == key_id_hash(odd_key_id)
    assert refusals[-1]["agreed_key_id_hash"] == key_id_hash(agreed)
    assert odd_key_id not in cluster.client.log()  # hashes only


# --- key servers going away ----------------------------------------------------------------------------------------


def test_failover_when_the_first_key_server_is_killed(cluster: Cluster) -> None:
    first, second = cluster.endpoint(cluster.ks1), cluster.endpoint(cluster.ks2)

    def served_by_second() -> float:
        return metric(cluster.client, "kleidi_remote_calls_total", endpoint=second, method="Encrypt", code="OK") or 0

    before = served_by_second()
    cluster.ks1.stop(signal.SIGKILL)
    try:
        with cluster.client.client() as remote:
            for _ in range(5):
                seed = os.urandom(32)
                wrapped = remote.encrypt(seed)
                assert remote.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == seed
        assert served_by_second() >= before + 5
        wait_for(lambda: metric(cluster.client, "kleidi_remote_endpoint_up", endpoint=first) == 0, 5, "ks1 down")
        assert cluster.client.healthz()[0] == 200  # one key server is enough
    finally:
        cluster.ks1.start()
    wait_for(lambda: metric(cluster.client, "kleidi_remote_endpoint_up", endpoint=first) == 1, 10, "ks1 back")


def test_key_servers_killed_and_restarted_under_load(cluster: Cluster) -> None:
    """Every answer is right or UNAVAILABLE/DEADLINE_EXCEEDED, never a wrong plaintext; /healthz goes non-ok
    within one health interval when no key server answers (the one with another KEK does not count: it is the
    sole survivor, and it takes over neither the calls nor the key_id), and the plugin recovers by itself when one
    comes back. Every Encrypt answer and every Status carries the one agreed key_id throughout."""
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    encrypted_under: Counter[str] = Counter()
    status_key_ids: Counter[str] = Counter()
    stop = threading.Event()
    with cluster.client.client() as remote:
        agreed = remote.status().key_id
    assert agreed

    def load() -> None:
        with cluster.client.client(timeout=3.0) as remote:
            while not stop.is_set():
                seed = os.urandom(32)
                try:
                    status_key_ids[remote.status().key_id] += 1
                    wrapped = remote.encrypt(seed)
                    encrypted_under[wrapped.key_id] += 1
                    if remote.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) != seed:
                        wrong.append("different plaintext")
                    outcomes["OK"] += 1
                except grpc.RpcError as exc:
                    outcomes[exc.code().name] += 1
                    time.sleep(0.02)  # pacing only: a failing plugin answers at once

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        wait_for(lambda: outcomes["OK"] >= 5, 10, "load running")
        for ks in (cluster.ks1, cluster.ks2):
            ks.stop(signal.SIGKILL)
        gone = time.monotonic()
        wait_for(lambda: cluster.client.healthz()[0] != 200, HEALTH_INTERVAL + REMOTE_TIMEOUT + 1, "healthz non-ok")
        assert time.monotonic() - gone <= HEALTH_INTERVAL + REMOTE_TIMEOUT + 0.5
        _, body = cluster.client.healthz()
        assert cluster.endpoint(cluster.ks1) in body and cluster.endpoint(cluster.odd) in body
        failed_before = sum(n for code, n in outcomes.items() if code != "OK")
        wait_for(lambda: sum(n for code, n in outcomes.items() if code != "OK") > failed_before, 5, "failures")
        cluster.ks2.start()
        cluster.client.wait_healthy(10)
        ok_after = outcomes["OK"]
        wait_for(lambda: outcomes["OK"] >= ok_after + 5, 10, "calls succeeding again")
    finally:
        stop.set()
        worker.join(10)
        if cluster.ks1.proc is None:
            cluster.ks1.start()
        if cluster.ks2.proc is None:
            cluster.ks2.start()
    assert not wrong
    assert set(encrypted_under) == {agreed}, encrypted_under
    assert set(status_key_ids) == {agreed}, status_key_ids
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, outcomes
    assert outcomes["UNAVAILABLE"] + outcomes["DEADLINE_EXCEEDED"] > 0
    wait_for(
        lambda: metric(cluster.client, "kleidi_remote_endpoint_up", endpoint=cluster.endpoint(cluster.ks1)) == 1,
        10,
        "ks1 back",
    )


# --- certificates ------------------------------------------------------------------------------------------------


def test_client_certificate_rotation_on_disk_without_restart(cluster: Cluster) -> None:
    pid = cluster.client.proc.pid if cluster.client.proc is not None else None
    reloads = metric(cluster.client, "kleidi_tls_reloads_total", side="client", result="ok") or 0
    try:
        # a new certificate from the same CA, with a name the key servers allow
        cluster.use_client_cert("cp-2")
        wait_for(
            lambda: metric(cluster.client, "kleidi_tls_reloads_total", side="client", result="ok") == reloads + 1,
            5,
            "the client to re-read its certificate",
        )
        with cluster.client.client() as remote:
            seed = os.urandom(32)
            wrapped = remote.encrypt(seed)
            assert remote.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == seed
        accepted = [r for r in cluster.ks1.log_records() if "accepted" in r["msg"]]
        assert accepted and accepted[-1].get("subject_cn") == "cp-2", cluster.ks1.log()[-2000:]

        # proof it is really re-read: a name the key servers do not allow, and calls are refused
        cluster.use_client_cert("cp-9")
        wait_for(
            lambda: metric(cluster.client, "kleidi_tls_reloads_total", side="client", result="ok") == reloads + 2,
            5,
            "the client to re-read its certificate again",
        )
        with cluster.client.client() as remote, pytest.raises(grpc.RpcError) as raised:
            remote.encrypt(os.urandom(32))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        refused = [r for r in cluster.ks1.log_records() if "refused" in r["msg"] and r.get("subject_cn") == "cp-9"]
        assert refused, cluster.ks1.log()[-2000:]
        wait_for(lambda: cluster.client.healthz()[0] != 200, 5, "healthz non-ok while every key server refuses")
    finally:
        cluster.use_client_cert("cp-1")
    cluster.client.wait_healthy(10)
    assert cluster.client.proc is not None and cluster.client.proc.pid == pid  # never restarted


def test_the_refused_key_server_is_admitted_once_it_agrees(cluster: Cluster) -> None:
    """Last in the module: the odd key server is given the agreed KEK, and is used again without a restart of the
    plugin."""
    odd = cluster.endpoint(cluster.odd)
    cluster.odd.stop()
    cluster.odd.config["pkcs11"]["key_label"] = "kek-1"
    cluster.odd.start()
    wait_for(lambda: metric(cluster.client, "kleidi_remote_endpoint_key_mismatch", endpoint=odd) == 0, 10, "agreed")
    wait_for(lambda: metric(cluster.client, "kleidi_remote_endpoint_up", endpoint=odd) == 1, 5, "odd up")
    # with the other two gone, it serves the calls
    for ks in (cluster.ks1, cluster.ks2):
        ks.stop()
    with cluster.client.client() as remote:
        seed = os.urandom(32)
        wrapped = remote.encrypt(seed)
        assert remote.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == seed
    assert (metric(cluster.client, "kleidi_remote_calls_total", endpoint=odd, method="Encrypt", code="OK") or 0) >= 1
