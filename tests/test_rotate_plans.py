"""The decisions behind a rotation, as the roles' filter plugins make them: where rotate.yml goes
(kleidi_rotate), which SoftHSM2 token store may be copied over which (kleidi_softhsm), and which key_id an
apiserver's /metrics say it uses (kleidi_apiserver)."""

from __future__ import annotations

import hashlib
import re
from types import ModuleType
from typing import Any

import pytest

from tests.role_modules import ROLES, load

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def rotate() -> ModuleType:
    return load(ROLES / "kleidi_rotate" / "filter_plugins" / "kleidi_rotate.py", "kleidi_role_rotate")


@pytest.fixture(scope="module")
def softhsm() -> ModuleType:
    return load(ROLES / "kleidi_softhsm" / "filter_plugins" / "kleidi_softhsm.py", "kleidi_role_softhsm")


@pytest.fixture(scope="module")
def metrics() -> ModuleType:
    return load(ROLES / "kleidi_apiserver" / "filter_plugins" / "kleidi_metrics.py", "kleidi_role_metrics")


def pkcs11(label: str, hmac: str = "") -> dict[str, Any]:
    section = {"key_label": label, **({"hmac_key_label": hmac} if hmac else {})}
    return {"provider": "pkcs11", "listen": "unix:///run/kleidi/kleidi.sock", "pkcs11": section}


def kid(label: str, fingerprint: str = "ab") -> str:
    return f"pkcs11:aes-gcm:{label}:{fingerprint}"


HOSTS = ("cp-1", "cp-2", "cp-3")


# -- kleidi_rotate ------------------------------------------------------------------------------------------------
def test_without_a_target_the_next_label_follows_the_one_in_force(rotate: ModuleType) -> None:
    plan = rotate.rotate_plan(
        {h: pkcs11("kleidi-kek-1") for h in HOSTS}, {h: kid("kleidi-kek-1") for h in HOSTS}, {}, "kleidi_softhsm"
    )
    assert plan["problems"] == []
    assert (plan["target"], plan["old_key_id"], plan["done"], plan["resumed"]) == (
        "kleidi-kek-2",
        kid("kleidi-kek-1"),
        False,
        False,
    )
    assert rotate.next_label("kek-09") == "kek-10"
    assert rotate.next_label("kleidi") == ""


def test_a_label_without_a_number_needs_a_target(rotate: ModuleType) -> None:
    plan = rotate.rotate_plan({"cp-1": pkcs11("main")}, {"cp-1": kid("main")}, {}, "kleidi_softhsm")
    assert "does not end in a number" in " ".join(plan["problems"])
    plan = rotate.rotate_plan({"cp-1": pkcs11("main")}, {"cp-1": kid("main")}, {}, "kleidi_softhsm", "other")
    assert (plan["problems"], plan["target"]) == ([], "other")


def test_the_marker_tells_a_key_id_of_the_target_from_one_of_a_longer_label(rotate: ModuleType) -> None:
    marker = rotate.pkcs11_marker("kleidi-kek-2")
    assert re.match(marker, kid("kleidi-kek-2"))
    assert not re.match(marker, kid("kleidi-kek-20"))
    assert not re.match(marker, kid("kleidi-kek-1"))
    assert re.match(rotate.pkcs11_marker("kek-2", "mac-2"), "pkcs11:aes-cbc-hmac:kek-2+mac-2:ff")


def test_tpm2_moves_the_hmac_key_along(rotate: ModuleType) -> None:
    plan = rotate.rotate_plan(
        {"cp-1": pkcs11("kleidi-kek-1", "kleidi-mac-1")},
        {"cp-1": "pkcs11:aes-cbc-hmac:kleidi-kek-1+kleidi-mac-1:00"},
        {},
        "kleidi_tpm2",
    )
    assert (plan["target"], plan["hmac_target"]) == ("kleidi-kek-2", "kleidi-mac-2")
    odd = rotate.rotate_plan(
        {"cp-1": pkcs11("kek-1", "mac")}, {"cp-1": "pkcs11:aes-cbc-hmac:kek-1+mac:00"}, {}, "kleidi_tpm2"
    )
    assert "kleidi_rotate_hmac_target" in " ".join(odd["problems"])


def test_a_stopped_rotation_is_resumed_not_rotated_past(rotate: ModuleType) -> None:
    in_force = {"cp-1": pkcs11("kleidi-kek-2"), "cp-2": pkcs11("kleidi-kek-1"), "cp-3": pkcs11("kleidi-kek-1")}
    key_ids = {"cp-1": kid("kleidi-kek-2", "cd"), "cp-2": kid("kleidi-kek-1"), "cp-3": kid("kleidi-kek-1")}
    state = {
        "phase": "switching",
        "backend": "kleidi_softhsm",
        "target": "kleidi-kek-2",
        "old_key_id": kid("kleidi-kek-1"),
    }
    plan = rotate.rotate_plan(in_force, key_ids, state, "kleidi_softhsm")
    assert (plan["target"], plan["resumed"], plan["old_key_id"], plan["done"]) == (
        "kleidi-kek-2",
        True,
        kid("kleidi-kek-1"),
        False,
    )
    lost = rotate.rotate_plan(in_force, key_ids, {}, "kleidi_softhsm")
    assert "records no rotation under way" in " ".join(lost["problems"])
    assert "cp-1: kleidi-kek-2" in " ".join(lost["problems"])


def test_a_finished_rotation_with_the_same_target_is_done(rotate: ModuleType) -> None:
    state = {"phase": "done", "backend": "kleidi_softhsm", "target": "kleidi-kek-2", "old_key_id": kid("kleidi-kek-1")}
    plan = rotate.rotate_plan(
        {h: pkcs11("kleidi-kek-2") for h in HOSTS},
        {h: kid("kleidi-kek-2", "cd") for h in HOSTS},
        state,
        "kleidi_softhsm",
        "kleidi-kek-2",
    )
    assert (plan["done"], plan["old_key_id"], plan["problems"]) == (True, kid("kleidi-kek-1"), [])
    # Without a target, a finished rotation is followed by the next one.
    again = rotate.rotate_plan(
        {h: pkcs11("kleidi-kek-2") for h in HOSTS},
        {h: kid("kleidi-kek-2", "cd") for h in HOSTS},
        state,
        "kleidi_softhsm",
    )
    assert (again["target"], again["done"]) == ("kleidi-kek-3", False)


def test_nothing_starts_without_kleidi_or_a_healthy_plugin_on_every_node(rotate: ModuleType) -> None:
    plan = rotate.rotate_plan(
        {"cp-1": pkcs11("kleidi-kek-1"), "cp-2": {}, "cp-3": pkcs11("kleidi-kek-1")},
        {"cp-1": kid("kleidi-kek-1"), "cp-2": "", "cp-3": ""},
        {},
        "kleidi_softhsm",
    )
    problems = " ".join(plan["problems"])
    assert "cp-2: no kleidi.yaml" in problems
    assert "cp-3: its plugin did not pass `kleidi check`" in problems
    wrong = rotate.rotate_plan({"cp-1": pkcs11("kleidi-kek-1")}, {"cp-1": kid("kleidi-kek-1")}, {}, "kleidi_vault")
    assert "kleidi_backend_role is kleidi_vault (vault)" in " ".join(wrong["problems"])


def vault(version: int) -> str:
    return f"vault:0123abcd:v{version}:89ef"


def test_vault_goes_to_the_next_version_or_the_one_given(rotate: ModuleType) -> None:
    in_force = {h: {"provider": "vault", "vault": {}} for h in HOSTS}
    plan = rotate.rotate_plan(in_force, {h: vault(3) for h in HOSTS}, {}, "kleidi_vault")
    assert (plan["target"], plan["marker"], plan["old_key_id"]) == ("4", "^vault:[^:]+:v4:", vault(3))
    given = rotate.rotate_plan(in_force, {h: vault(3) for h in HOSTS}, {}, "kleidi_vault", 6)
    assert given["target"] == "6"
    done = rotate.rotate_plan(in_force, {h: vault(6) for h in HOSTS}, {}, "kleidi_vault", "6")
    assert done["done"]
    back = rotate.rotate_plan(in_force, {h: vault(6) for h in HOSTS}, {}, "kleidi_vault", "5")
    assert "only go up" in " ".join(back["problems"])
    bad = rotate.rotate_plan(in_force, {h: vault(6) for h in HOSTS}, {}, "kleidi_vault", "v7")
    assert "not a transit key version" in " ".join(bad["problems"])


# -- kleidi_softhsm -------------------------------------------------------------------------------------------------
def node(serial: str = "aa", labels: tuple[str, ...] = (), key_count: int | None = None) -> dict[str, Any]:
    count = key_count if key_count is not None else labels.count("kek-2")
    return {
        "token": True,
        "serial": serial,
        "dir": "d",
        "pin_initialized": True,
        "key_count": count,
        "labels": list(labels),
    }


def plan(
    softhsm: ModuleType, nodes: dict[str, dict[str, Any]], add: bool = False, play: tuple[str, ...] = HOSTS
) -> Any:
    return softhsm.softhsm_plan(nodes, list(HOSTS), list(play), "kek-2", "kleidi", add)


def test_fresh_nodes_get_the_token_made_on_the_first_node(softhsm: ModuleType) -> None:
    fresh = {h: {"token": False, "free_slot": "0"} for h in HOSTS}
    assert plan(softhsm, fresh)["creator"] == "cp-1"
    assert plan(softhsm, fresh)["problems"] == []


def test_a_new_kek_is_added_on_one_node_only_when_asked(softhsm: ModuleType) -> None:
    stores = {h: node(labels=("kek-1",)) for h in HOSTS}
    refused = plan(softhsm, stores)
    assert refused["creator"] == "" and "playbooks/rotate.yml" in " ".join(refused["problems"])
    adding = plan(softhsm, stores, add=True)
    assert (adding["creator"], adding["adding"], adding["problems"]) == ("cp-1", True, [])
    # After the key is made on cp-1: the others, the same token with fewer keys, get cp-1's store.
    after = {"cp-1": node(labels=("kek-1", "kek-2")), "cp-2": node(labels=("kek-1",)), "cp-3": node(labels=("kek-1",))}
    copy = plan(softhsm, after, add=True)
    assert (copy["source"], copy["targets"], copy["problems"]) == ("cp-1", ["cp-2", "cp-3"], [])


def test_a_token_is_never_overwritten_by_one_that_lacks_one_of_its_keys(softhsm: ModuleType) -> None:
    nodes = {
        "cp-1": node(labels=("kek-1", "kek-2")),
        "cp-2": node(labels=("kek-1", "kek-9")),
        "cp-3": node(serial="bb", labels=("kek-1",)),
    }
    found = plan(softhsm, nodes, add=True)
    problems = " ".join(found["problems"])
    assert found["targets"] == []
    assert "cp-2: its token lacks the key labelled kek-2" in problems and "kek-9" in problems
    assert "cp-3:" in problems and "serial differs" in problems


def test_adding_needs_the_node_with_the_most_keys_in_the_play(softhsm: ModuleType) -> None:
    stores = {"cp-1": node(labels=("kek-1",)), "cp-2": node(labels=("kek-0", "kek-1")), "cp-3": node(labels=("kek-1",))}
    found = plan(softhsm, stores, add=True, play=("cp-1", "cp-3"))
    assert found["creator"] == "" and "cp-2: its token holds the most keys" in " ".join(found["problems"])
    found = plan(softhsm, stores, add=True)
    assert found["creator"] == "cp-2"


def test_a_node_added_later_and_a_refused_pin_are_handled_as_before(softhsm: ModuleType) -> None:
    nodes = {
        "cp-1": node(labels=("kek-2",)),
        "cp-2": node(labels=("kek-2",)),
        "cp-3": {"token": False, "free_slot": "0"},
    }
    assert plan(softhsm, nodes, play=("cp-3",))["targets"] == ["cp-3"]
    nodes["cp-2"] = node(key_count=-1)
    assert "cp-2: its token refuses kleidi_softhsm_pin." in plan(softhsm, nodes)["problems"]


# -- kleidi_apiserver ------------------------------------------------------------------------------------------------
def test_the_newest_key_id_hash_of_the_provider_is_the_one_in_use(metrics: ModuleType) -> None:
    old, new = metrics.key_id_hash("pkcs11:aes-gcm:kek-1:aa"), metrics.key_id_hash("pkcs11:aes-gcm:kek-2:bb")
    assert new == "sha256:" + hashlib.sha256(b"pkcs11:aes-gcm:kek-2:bb").hexdigest()
    name = metrics.METRIC
    text = "\n".join(
        [
            f"# HELP {name} The last time in seconds when a keyID was returned by the Status RPC call.",
            f"# TYPE {name} gauge",
            f'{name}{{apiserver_id_hash="sha256:x",key_id_hash="{old}",provider_name="kleidi"}} 9.99e+08',
            f'{name}{{apiserver_id_hash="sha256:x",key_id_hash="{new}",provider_name="kleidi"}} 1.7e+09',
            f'{name}{{apiserver_id_hash="sha256:x",key_id_hash="sha256:other",provider_name="other"}} 1.8e+09',
        ]
    )
    status = metrics.key_id_status(text, "kleidi")
    assert (status["found"], status["newest"]) == (True, new)
    assert status["series"] == {old: 9.99e08, new: 1.7e09}
    assert metrics.key_id_status("process_start_time_seconds 1.7e+09\n", "kleidi") == {
        "found": False,
        "newest": "",
        "series": {},
    }
