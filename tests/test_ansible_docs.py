"""docs/ansible.md documents every role variable, and every role documents each of its defaults in argument_specs."""

from __future__ import annotations

import pytest
import yaml

from scripts import ansible_docs
from tests.plugin import REPO

pytestmark = pytest.mark.unit

ROLES = sorted(path for path in (REPO / "roles").iterdir() if path.is_dir())


def test_the_variable_tables_are_what_the_generator_writes() -> None:
    page = ansible_docs.DOC.read_text()
    assert page == ansible_docs.render(page), "run: python -m scripts.ansible_docs"


def test_every_role_has_argument_specs_covering_its_defaults() -> None:
    for role in ROLES:
        specs = ansible_docs.role_options(role)
        defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
        missing = [name for name in defaults if name not in specs]
        assert not missing, f"{role.name}: defaults without argument_specs: {missing}"
        foreign = [name for name in {**defaults, **specs} if not name.startswith(role.name + "_")]
        assert not foreign, f"{role.name}: variables without the role's prefix: {foreign}"


def test_every_documented_variable_is_in_the_page() -> None:
    page = ansible_docs.DOC.read_text()
    for role in ROLES:
        for name in ansible_docs.role_options(role):
            assert f"`{name}`" in page, f"docs/ansible.md does not mention {name}"
