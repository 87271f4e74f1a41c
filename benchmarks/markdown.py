"""Writing measured results into markdown files, for every benchmark script.

Owns: replacing one ``## section`` of a file (or appending it), replacing the block between two
marker comments (the README's results table), and writing files atomically. Every script under
``benchmarks/`` that writes BENCHMARKS.md, README.md or docs/ goes through here, so a section is
found and replaced the same way everywhere and a file is never left half written.

Must not: compose any section's text (each benchmark owns its own) or decide which file a
benchmark writes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

NEW_FILE_NOTE = "Each section is written by the command it names."


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it and one rename:
    a benchmark killed while writing (some run for hours) leaves the old file, never half of one.
    The temporary file is named per process, so two writers never share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        tmp.unlink(missing_ok=True)


def replace_section(text: str, name: str, section: str) -> str:
    """``text`` with its ``## name`` section (up to the next ``## `` heading or the end) replaced by
    ``section``, or ``section`` appended when there is none. Sections are separated by one blank
    line and the result ends with exactly one newline, so rewriting a section with the same text
    gives the same bytes however often it is done."""
    pattern = re.compile(rf"^## {re.escape(name)}[ \t]*(?:\n|\Z).*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)  # a function: no escapes read in section
    else:
        text = text.rstrip() + "\n\n" + section
    return text.rstrip("\n") + "\n"


def write_section(path: Path, name: str, body: str, *, heading: str = "# lit-ft results") -> str:
    """Replace (or append) the section ``## name`` of ``path`` with ``body``; every other section
    stays byte for byte. A missing file starts with ``heading``. Returns the section written."""
    path = Path(path)
    section = f"## {name}\n\n{body.strip()}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else f"{heading}\n\n{NEW_FILE_NOTE}\n"
    atomic_write(path, replace_section(text, name, section))
    return section


def write_between(path: Path, begin: str, end: str, body: str) -> bool:
    """Replace what lies between the markers ``begin`` and ``end`` in ``path`` with a newline and
    ``body``; the markers and everything outside them stay. False (nothing written) when the file
    or either marker is missing: a hand-edited README is not rewritten by guesswork."""
    path = Path(path)
    if not path.exists():
        return False
    text = path.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        return False
    start, stop = text.index(begin) + len(begin), text.index(end)
    atomic_write(path, text[:start] + "\n" + body + text[stop:])
    return True
