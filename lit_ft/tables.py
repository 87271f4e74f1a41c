"""Result tables of lit-ft's own commands (soup, wise, robustness): markdown and CSV from rows.

Owns only the rendering: a table is a list of dicts with the same keys, in column order.
Floats print with 4 decimals; ``None`` prints as ``-``. Files are written through a temporary
file and one rename, so an interrupted command never leaves half a table.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub markdown table (``|`` in cells escaped)."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k)).replace("|", "\\|") for k in keys) + " |")
    return "\n".join(lines)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV with a header row; floats at full precision, ``None`` as an empty field."""
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file beside it, then one rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_tables(stem: Path, title: str, rows: Sequence[Mapping[str, Any]], notes: str = "") -> tuple[Path, Path]:
    """``<stem>.md`` (title, notes, table) and ``<stem>.csv`` (the rows); returns both paths."""
    stem = Path(stem)
    md = f"# {title}\n\n" + (notes.strip() + "\n\n" if notes.strip() else "") + markdown(rows) + "\n"
    return write_text(stem.with_suffix(".md"), md), write_text(stem.with_suffix(".csv"), csv_text(rows))
