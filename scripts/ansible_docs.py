"""Writes the variable tables of docs/ansible.md from every role's meta/argument_specs.yml.

Run `python -m scripts.ansible_docs` after changing a role's variables; tests/test_ansible_docs.py fails while the
committed page differs from what this writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from scripts.values_doc import REPO

DOC = REPO / "docs" / "ansible.md"
ROLES = REPO / "roles"
START, END = "<!-- variables:start (python -m scripts.ansible_docs) -->", "<!-- variables:end -->"


def role_options(role: Path) -> dict[str, dict[str, Any]]:
    """The options of every entry point of the role (main first): a role used only through tasks_from has none."""
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text(encoding="utf-8"))
    entries = spec["argument_specs"]
    options: dict[str, dict[str, Any]] = {}
    for name in sorted(entries, key=lambda entry: entry != "main"):
        for option, settings in (entries[name].get("options") or {}).items():
            options.setdefault(option, settings)
    return options


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(option: dict[str, Any]) -> str:
    if option.get("required"):
        return "**required**"
    if "default" not in option:
        return ""
    value = option["default"]
    shown = value if isinstance(value, str) else json.dumps(value)
    return f"`{_cell(shown)}`" if shown != "" else '`""`'


def table(role: Path) -> str:
    rows = ["| variable | type | default | what it does |", "|---|---|---|---|"]
    for name, option in role_options(role).items():
        kind = option.get("type", "str")
        if option.get("choices"):
            kind += ": " + ", ".join(str(choice) for choice in option["choices"])
        rows.append(f"| `{name}` | {_cell(kind)} | {_default(option)} | {_cell(option.get('description', ''))} |")
    return "\n".join(rows)


def render_section() -> str:
    parts = [START]
    for role in sorted(path for path in ROLES.iterdir() if (path / "meta" / "argument_specs.yml").exists()):
        parts.append(f"\n### Role `{role.name}`\n\n{table(role)}\n")
    parts.append(END)
    return "\n".join(parts)


def render(page: str) -> str:
    head, _, rest = page.partition(START)
    _, _, tail = rest.partition(END)
    return head + render_section() + tail


def main() -> int:
    DOC.write_text(render(DOC.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
