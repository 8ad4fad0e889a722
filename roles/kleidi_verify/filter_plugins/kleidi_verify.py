"""Filters of the kleidi_verify role: where the control-plane nodes disagree."""

from __future__ import annotations


def kleidi_verify_disagreements(nodes, fields):
    """``nodes``: host -> {field: value}; ``fields``: field -> label, in report order. Returns one entry per field
    whose value is not the same on every node: {"field", "label", "values": host -> value}."""
    found = []
    for field, label in fields.items():
        values = {host: str(node.get(field, "")) for host, node in nodes.items()}
        if len(set(values.values())) > 1:
            found.append({"field": field, "label": label, "values": values})
    return found


def kleidi_verify_problem_lines(problems):
    """``problems``: host -> [problem, ...]. One line per problem, naming its node."""
    return [f"{host}: {problem}" for host, found in problems.items() for problem in found or []]


class FilterModule:
    def filters(self):
        return {
            "kleidi_verify_disagreements": kleidi_verify_disagreements,
            "kleidi_verify_problem_lines": kleidi_verify_problem_lines,
        }
