"""Plain-text tables for the benchmark scripts in this folder."""

from __future__ import annotations


def format_table(columns: list[tuple[str, str]], rows: list[dict]) -> str:
    """`rows` as right-aligned text columns: `columns` holds (title, format template) pairs,
    the templates filled from each row's keys; a rule under the titles."""
    cells = [[title for title, _ in columns]] + [
        [template.format(**row) for _, template in columns] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
