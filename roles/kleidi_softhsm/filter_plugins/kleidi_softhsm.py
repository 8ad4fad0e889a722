"""What the kleidi_softhsm role does with the token stores it found: the one place that decides which node creates
or adds a key, which node the store is copied from, which nodes get a copy, and what stops the play.

Input: what files/probe.sh reported per control-plane host ({token, serial, dir, pin_initialized, key_count,
labels, free_slot}; key_count counts the secret keys labelled like the KEK, -1 when the PIN was refused; labels are
the labels of every secret key on the token). The one rule behind every answer: a node's token store is only ever
replaced by a copy of the same token (same serial) that holds every key it holds, and more; never by anything that
lacks one of its keys."""

from __future__ import annotations

from typing import Any


def _labels(node: dict[str, Any]) -> list[str]:
    return [str(label) for label in node.get("labels") or []]


def softhsm_plan(
    nodes: dict[str, dict[str, Any]],
    hosts: list[str],
    play_hosts: list[str],
    label: str,
    token_label: str,
    add_key: bool = False,
) -> dict[str, Any]:
    """The role's plan.

    ``hosts``: every control-plane host in inventory order (the probe's order); ``play_hosts``: the hosts of the
    play, the only ones written to. Returns holders (nodes whose token holds the KEK), source (the holder the store
    is copied from, "" for none), creator (the play host that initialises the token and generates the KEK, or adds
    the KEK to a token that has other keys; "" for none), adding (whether the creator adds the KEK to an existing
    store), targets (play hosts that get a copy of the source's store: those without the token, and those whose
    token is the source's with fewer keys) and problems (messages that stop the play)."""
    order = [host for host in hosts if host in nodes] + [host for host in nodes if host not in hosts]
    with_token = [host for host in order if nodes[host].get("token")]
    counted = [host for host in with_token if "key_count" in nodes[host]]
    holders = [host for host in counted if nodes[host]["key_count"] == 1]
    problems: list[str] = []
    for host in counted:
        if nodes[host]["key_count"] < 0:
            problems.append(f"{host}: its token refuses kleidi_softhsm_pin.")
        elif nodes[host]["key_count"] > 1:
            problems.append(f"{host}: its token has more than one key labelled {label}.")
    lacking = [host for host in counted if nodes[host]["key_count"] == 0]
    source, creator, adding, behind = (holders[0] if holders else ""), "", False, []
    stores = [host for host in lacking if _labels(nodes[host])]

    def subset_of(host: str, other: str) -> bool:
        return nodes[host].get("serial") == nodes[other].get("serial") and set(_labels(nodes[host])) <= set(
            _labels(nodes[other])
        )

    if holders:
        # The KEK exists: a token without it is brought up to date only from a copy of itself with more keys.
        behind = [host for host in lacking if subset_of(host, source)]
        for host in lacking:
            if host not in behind:
                problems.append(
                    f"{host}: its token lacks the key labelled {label} and is not an older copy of {source}'s token "
                    + (
                        "(another token: its serial differs)."
                        if nodes[host].get("serial") != nodes[source].get("serial")
                        else f"(it holds keys {source}'s token lacks: "
                        + ", ".join(sorted(set(_labels(nodes[host])) - set(_labels(nodes[source]))))
                        + ")."
                    )
                )
    elif stores:
        # No node holds the KEK, but the tokens hold other keys: a new KEK, added only when asked (rotation).
        held = ", ".join(sorted({label for host in stores for label in _labels(nodes[host])}))
        if not add_key:
            problems.extend(
                f"{host}: its token has no key labelled {label} (it holds {', '.join(_labels(nodes[host]))})."
                for host in stores
            )
            problems.append(
                f"The nodes' KEKs are {held}: to add {label} as a new KEK, run playbooks/rotate.yml; to keep the one "
                "in use, leave kleidi_softhsm_key_label unset (the label the nodes' kleidi.yaml names is kept)."
            )
        else:
            in_play = [host for host in stores if host in play_hosts]
            widest = max(stores, key=lambda host: len(_labels(nodes[host])))
            best = max(in_play, key=lambda host: len(_labels(nodes[host])), default="")
            if not best or len(_labels(nodes[best])) < len(_labels(nodes[widest])):
                problems.append(
                    f"{widest}: its token holds the most keys, so the new KEK is added there: run the play with it."
                )
            else:
                creator, adding = best, True
                for host in lacking:
                    if host != best and not subset_of(host, best):
                        problems.append(
                            f"{host}: its token is not a copy of {best}'s token with the same or fewer keys, so the "
                            f"new KEK could not be copied to it without losing a key; it is never overwritten."
                        )
    elif len(lacking) > 1 or any(host not in play_hosts for host in lacking):
        # No node has any key: a first run, or one that stopped after making a token. At most one such token is
        # finished (it is the only one), on a node of the play.
        problems.extend(f"{host}: its token has no key labelled {label}." for host in lacking)
    else:
        creator = (lacking + [host for host in order if host in play_hosts] + [*play_hosts, ""])[0]
    if problems:
        problems.append(
            f"Every control-plane node shares one token {token_label} and a node that has it is never overwritten by "
            "anything that lacks one of its keys: fix or remove that token directory (the role then copies the shared "
            "token to it), or run the play with that node."
        )
    copy_from = source if holders else ""
    targets = (
        [host for host in play_hosts if host not in with_token or host in behind] if copy_from and not problems else []
    )
    return {
        "holders": holders,
        "source": copy_from,
        "creator": "" if problems else creator,
        "adding": adding and not problems,
        "targets": targets,
        "problems": problems,
    }


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"kleidi_softhsm_plan": softhsm_plan}
