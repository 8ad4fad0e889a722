"""The kleidi role's file helpers, which every role writes node files through: what a run's backup directory holds
afterwards is exactly the state before the run (copies with mode and owner, and the list of files it created),
which is what kleidi_rollback restores."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.role_modules import ROLES, load

pytestmark = pytest.mark.unit

files = load(ROLES / "kleidi" / "module_utils" / "kleidi_files.py", "ansible.module_utils.kleidi_files")


class FakeModule:
    """The one AnsibleModule method the helpers call."""

    def atomic_move(self, src: str, dest: str) -> None:
        shutil.move(src, dest)


def test_a_changed_file_is_copied_with_its_mode_and_owner_and_a_new_one_is_listed(tmp_path: Path) -> None:
    root, backups = tmp_path / "node", tmp_path / "node/var/backups/kleidi"
    old = root / "etc/kleidi/kleidi.yaml"
    old.parent.mkdir(parents=True)
    old.write_text("log_level: info\n")
    old.chmod(0o640)
    os.chown(old, 10001, 10002)
    new = root / "etc/kubernetes/patches/kube-apiserver0+json.yaml"

    saved = files.backup_file(FakeModule(), str(old), str(backups), "20250101T000000Z", str(root))
    files.write_file(FakeModule(), str(old), "log_level: debug\n")
    assert files.backup_file(FakeModule(), str(new), str(backups), "20250101T000000Z", str(root)) is None
    files.write_file(FakeModule(), str(new), "[]\n")

    copy = backups / "20250101T000000Z/etc/kleidi/kleidi.yaml"
    assert saved == str(copy)
    assert copy.read_text() == "log_level: info\n"
    info = copy.stat()
    assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (0o640, 10001, 10002)
    created = backups / "20250101T000000Z/.created"
    assert created.read_text() == "/etc/kubernetes/patches/kube-apiserver0+json.yaml\n"
    assert created.stat().st_mode & 0o777 == 0o600


def test_the_first_copy_of_a_run_is_the_state_before_the_run(tmp_path: Path) -> None:
    backups, target = tmp_path / "backups", tmp_path / "etc/thing.yaml"
    target.parent.mkdir(parents=True)
    for content in ("first\n", "second\n", "third\n"):
        files.backup_file(FakeModule(), str(target), str(backups), "S", "")
        files.write_file(FakeModule(), str(target), content)
    # A file the run created and then changed again is still only "created": there is nothing to restore.
    assert files.created_files(str(backups / "S")) == [str(target)]
    assert not (backups / "S" / str(target).lstrip("/")).exists()

    target2 = tmp_path / "etc/other.yaml"
    target2.write_text("before\n")
    for content in ("one\n", "two\n"):
        files.backup_file(FakeModule(), str(target2), str(backups), "S", "")
        files.write_file(FakeModule(), str(target2), content)
    assert (backups / "S" / str(target2).lstrip("/")).read_text() == "before\n"
    assert files.created_files(str(backups / "S")) == [str(target)]


def test_a_removed_file_is_copied_first(tmp_path: Path) -> None:
    root, backups = tmp_path / "node", tmp_path / "backups"
    unit = root / "etc/systemd/system/kleidi.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    saved = files.remove_file(FakeModule(), str(unit), str(backups), "S", str(root))
    assert not unit.exists()
    assert Path(saved).read_text() == "[Service]\n"
    assert saved == str(backups / "S/etc/systemd/system/kleidi.service")
    assert files.remove_file(FakeModule(), str(unit), str(backups), "S", str(root)) is None
