"""Finding image files on disk and weeding out unreadable ones, with the user told about both.

Owns: walking folders (symbolic links followed, each real folder and file taken once) and the
warnings about what was passed over. Must not touch: labels and splits (the datamodules').
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

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
        repeated_dirs: ``(path, first)`` for each folder reached again through a symbolic link
            (a link loop, or two paths to one folder): not entered, ``first`` is where it was
            (or is) listed from.
        repeated_files: ``(path, kept)`` for each file reached again under another path (a
            link to a file already listed): left out, ``kept`` is the path that was listed (the
            file itself rather than a link to it, when the walk reaches both).
    """

    images: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    repeated_dirs: list[tuple[Path, Path]] = field(default_factory=list)
    repeated_files: list[tuple[Path, Path]] = field(default_factory=list)


def is_hidden(name: str) -> bool:
    # .DS_Store, ._foo (macOS resource forks), .ipynb_checkpoints: OS/tool noise, never data.
    return name.startswith(".")


def list_files(root: Path, extensions: Sequence[str], elsewhere: Iterable[Path] = ()) -> FileListing:
    """Recursively list the files under ``root`` (symlinks followed, hidden entries skipped).

    Each real folder is entered once and each real file listed once: ``os.walk(followlinks=True)``
    has no cycle detection, so a link loop (``cat/up -> ..``) listed every image ~40 times (until
    the OS refused the path), silently. Folders and files reached again are recorded in
    ``repeated_dirs``/``repeated_files`` for :func:`report_repeated`.

    Args:
        root: folder to walk.
        extensions: lower-case extensions (with the dot) that mark image files; matching is
            case-insensitive, so ``IMG_1.JPG`` counts.
        elsewhere: folders listed separately (e.g. the split folder and the other class
            folders when ``root`` is one class folder): a link into one of them is not
            followed, so a link loop cannot pull other classes' images under this label.
    """
    exts = {e.lower() for e in extensions}
    listing = FileListing()
    root = Path(root)
    seen_dirs: dict[str, Path] = {os.path.realpath(d): Path(d) for d in elsewhere}
    seen_dirs.pop(os.path.realpath(root), None)
    files: dict[str, list[tuple[Path, bool]]] = {}  # real path -> (path, is a link) in walk order
    stack = [root]  # depth-first, in sorted order, so which duplicate is kept is reproducible
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:
            listing.repeated_dirs.append((folder, seen_dirs[real]))
            continue
        seen_dirs[real] = folder
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not is_hidden(e.name)), key=lambda e: e.name)
        except OSError as err:  # unreadable folder: say so (os.walk skipped it silently)
            log.warning("cannot list folder %s: %s", folder, err.strerror or err)
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if _is_dir(entry):
                subfolders.append(path)
                continue
            files.setdefault(os.path.realpath(path), []).append((path, entry.is_symlink()))
        stack.extend(reversed(subfolders))
    for paths in files.values():
        kept = next((p for p, link in paths if not link), paths[0][0])
        listing.repeated_files += [(p, kept) for p, _ in paths if p != kept]
        (listing.images if kept.suffix.lower() in exts else listing.ignored).append(kept)
    listing.images.sort()
    listing.ignored.sort()
    return listing


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:  # e.g. a link loop the OS refuses to resolve: not a folder we can enter
        return False


def report_repeated(listing: FileListing, where: str) -> None:
    """Log one warning per kind of repeat (folders, files), with the count and an example."""
    if listing.repeated_dirs:
        path, first = listing.repeated_dirs[0]
        log.warning(
            "%s: %d folder(s) reached a second time through symbolic links were not entered "
            "(a link loop, or two links to one folder), e.g. %s is the same folder as %s",
            where, len(listing.repeated_dirs), path, first,
        )
    if listing.repeated_files:
        path, first = listing.repeated_files[0]
        log.warning(
            "%s: %d file(s) reached a second time under another path (symbolic links) were listed once, "
            "e.g. %s is the same file as %s",
            where, len(listing.repeated_files), path, first,
        )


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
