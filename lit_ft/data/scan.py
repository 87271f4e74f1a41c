"""Finding image files on disk and weeding out unreadable ones, with the user told about both."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from lit_ft.data.images import check_image
from lit_ft.errors import UserError

log = logging.getLogger(__name__)

BadImages = Literal["error", "skip"]

_SHOW = 5  # how many file names a message lists before "..."


@dataclass
class FileListing:
    """Files under a folder, split by whether their extension marks them as images.

    Attributes:
        images: files with an image extension, sorted by path.
        ignored: other files (not hidden), sorted by path.
    """

    images: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def is_hidden(name: str) -> bool:
    # .DS_Store, ._foo (macOS resource forks), .ipynb_checkpoints: OS/tool noise, never data.
    return name.startswith(".")


def list_files(root: Path, extensions: Sequence[str]) -> FileListing:
    """Recursively list the files under ``root`` (symlinks followed, hidden entries skipped).

    Args:
        root: folder to walk.
        extensions: lower-case extensions (with the dot) that mark image files; matching is
            case-insensitive, so ``IMG_1.JPG`` counts.
    """
    exts = {e.lower() for e in extensions}
    listing = FileListing()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            if is_hidden(name):
                continue
            path = Path(dirpath, name)
            (listing.images if path.suffix.lower() in exts else listing.ignored).append(path)
    listing.images.sort()
    listing.ignored.sort()
    return listing


def report_ignored(ignored: Sequence[Path], where: str, extensions: Sequence[str]) -> None:
    """Log (once) how many files were passed over for their extension."""
    if not ignored:
        return
    log.warning(
        "ignored %d file(s) without an image extension in %s: %s. Accepted extensions: %s "
        "(set `extensions` to accept others)",
        len(ignored), where, _names(ignored), ", ".join(extensions),
    )


def verify_images(paths: Sequence[Path], policy: BadImages, where: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Fully decode every file once; raise on the first bad one or drop the bad ones.

    Args:
        paths: image files, in the order the caller wants errors reported.
        policy: ``"error"`` raises a :class:`UserError` naming the first unreadable file;
            ``"skip"`` drops unreadable files and logs one warning listing the first few.
        where: what the files belong to (e.g. ``"train_dir /data/train"``), for messages.

    Returns:
        ``(good, bad)``: readable paths in input order, and ``(path, reason)`` for the others.
    """
    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    if not paths:
        return good, bad
    log.info("checking %d image file(s) in %s (full decode, once per setup)", len(paths), where)
    # Decoding happens in C with the GIL released, so threads give a real speed-up.
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, reason in zip(paths, pool.map(check_image, paths)):
            if reason is None:
                good.append(path)
                continue
            if policy == "error":
                pool.shutdown(wait=False, cancel_futures=True)
                raise UserError(
                    f"cannot read image {path} ({where}): {reason}",
                    "fix or delete the file, or set `bad_images: skip` to drop unreadable files with a warning",
                )
            bad.append((path, reason))
    if bad:
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:_SHOW]) + ("; ..." if len(bad) > _SHOW else "")
        log.warning("skipped %d unreadable image file(s) of %d in %s: %s", len(bad), len(paths), where, shown)
    return good, bad


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:_SHOW])
    return shown + (", ..." if len(paths) > _SHOW else "")
