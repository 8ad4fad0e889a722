"""How `make test` spreads the tests over pytest-xdist workers (`-n 2 --dist loadscope`; tests/conftest.py hooks
this in).

A worker takes a whole module at a time, so module-scoped backends are set up once and the tests of a module that
build on each other's effects (a backup, then a restore of it) run in their order. The modules that share the real
host's paths are one unit, run one after another on one worker: simulated nodes whose sandboxes create their mount
points (/etc/kleidi, /run/kleidi, /var/lib/kleidi...) on the host while they run, and checks that a playbook wrote
nothing there (or under /var/lib/softhsm).

pytest-xdist's own `--dist loadgroup` cannot do this here: it tags a test's group onto ``item._nodeid``, which
pytest 9 no longer reads, so every test became a unit of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HOST_PATH_MODULES = frozenset(
    {
        "test_simnode.py",
        "test_helm_on_simnode.py",
        "test_rollback.py",
        "test_uninstall.py",
        "test_site_check_mode.py",
        "test_role_softhsm.py",
    }
)
HOST_PATHS = "host-paths"

# The longest units, longest first (measured): a worker takes the next unit in this order when it is almost done,
# so the long ones start early and the short modules, in file order after them, fill in the end. Only the balance
# between the workers depends on this list.
LONGEST_FIRST = (
    HOST_PATHS,
    "test_playbook_rotate.py",
    "test_playbook_backup.py",
    "test_playbook_rotate_vault.py",
    "test_role_kleidi_keyserver.py",
    "test_playbook_rotate_tpm2.py",
    "test_role_kleidi_verify.py",
    "test_role_kleidi_reencrypt.py",
    "test_role_kleidi_vault.py",
    "test_role_kleidi_remote.py",
    "test_playbook_backup_tpm2.py",
    "test_role_tpm2.py",
    "test_role_kleidi_plugin_health.py",
    "test_tpm.py",
)
_RANK = {unit: n for n, unit in enumerate(LONGEST_FIRST)}


def unit_of(module: str) -> str:
    """The unit of work a test module belongs to: its file name, or HOST_PATHS."""
    name = Path(module).name
    return HOST_PATHS if name in HOST_PATH_MODULES else name


def rank(module: str) -> int:
    """Where a module's tests go in a worker's collection: the longest units first, then file order."""
    return _RANK.get(unit_of(module), len(_RANK))


def short_basetemp(config: Any) -> None:
    """A worker's temp directories under <basetemp>/0, not xdist's <basetemp>/popen-gw0: as long as a serial run's
    but for two characters, so the deepest unix socket paths the tests make stay within the 107 bytes allowed."""
    basetemp = Path(config.option.basetemp or "")
    if hasattr(config, "workerinput") and basetemp.name.startswith("popen-gw"):
        config.option.basetemp = str(basetemp.with_name(basetemp.name.removeprefix("popen-gw")))


def scheduler(config: Any, log: Any) -> Any:
    """xdist's loadscope scheduling with a test's unit as its scope, taken in the order the workers collected
    them (tests/conftest.py sorts them with rank()), not by the number of tests in each."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid.split("::", 1)[0])

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)
