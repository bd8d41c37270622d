"""Rows of cells as plain-text columns, for the benchmarks' and the report's tables in a terminal."""
from __future__ import annotations


def aligned_table(cells: list[list[str]], left: int = 1) -> str:
    """The first `left` columns left-aligned, the others right-aligned, a rule under the header row."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [" | ".join(c.ljust(w) if i < left else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
