"""Plain-text tables for the benchmark scripts in this folder."""

from __future__ import annotations

import platform
from pathlib import Path


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


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "asimd", "sve")


def cpu_class() -> str:
    """The CPU's model name and which of SIMD_FLAGS it has (Linux's /proc/cpuinfo), the
    class a benchmark's figures hold for."""
    flags, name = set(), platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            if key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    return f"{name} [{' '.join(flag for flag in SIMD_FLAGS if flag in flags) or 'no SIMD flags'}]"
