"""Datamodule for images in class folders: ``root/<class>/<image>``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from lit_ft.data.base import BaseImageDataModule, Split
from lit_ft.data.datasets import FileSource
from lit_ft.data.images import IMAGE_EXTENSIONS
from lit_ft.data.scan import BadImages, FileListing, is_hidden, list_files, report_ignored, report_repeated, verify_images
from lit_ft.errors import UserError

log = logging.getLogger(__name__)


class ImageFolderDataModule(BaseImageDataModule):
    """Images sorted into one subfolder per class: ``train_dir/<class>/<image>``.

    Classes are the sorted subfolder names of ``train_dir`` (or of ``val_dir``/``test_dir``
    when there is no ``train_dir``); every split folder must have the same class subfolders.
    Images are found recursively inside each class folder. Without ``val_dir``, ``val_split``
    of the training images are held out for validation.

    Every image is decoded once at setup, so zero-byte, truncated, corrupt and mislabelled
    files are found before training starts rather than in the middle of an epoch. With
    ``class_names`` the label order follows that list (it must name exactly the class folders),
    e.g. to match a model trained before.

    Args:
        train_dir: folder of training images, one subfolder per class.
        val_dir: folder of validation images; ``None`` holds out ``val_split`` of train.
        test_dir: folder of test images.
        bad_images: what to do with files that have an image extension but cannot be decoded:
            ``"error"`` stops with the file's name, ``"skip"`` drops them with a warning
            (counts in :attr:`skipped_files`).
        extensions: file extensions (case-insensitive) taken as images; other files are
            ignored with a warning (counts in :attr:`ignored_files`).
        **kwargs: options of :class:`~lit_ft.data.base.BaseImageDataModule`.
    """

    def __init__(
        self,
        train_dir: Optional[str] = None,
        val_dir: Optional[str] = None,
        test_dir: Optional[str] = None,
        bad_images: BadImages = "error",
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if bad_images not in ("error", "skip"):
            raise UserError(f"bad_images={bad_images!r} is invalid", "use 'error' or 'skip'")
        self._bad_images = bad_images
        self._extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.test_dir = test_dir
        self._dirs: dict[str, Path] = {
            split: Path(d).expanduser()
            for split, d in (("train", train_dir), ("val", val_dir), ("test", test_dir))
            if d is not None
        }
        if not self._dirs and self.predict_dir is None:
            raise UserError("ImageFolderDataModule got no folders", "set train_dir (and optionally val_dir/test_dir), or predict_dir")
        if self._dirs:
            self._init_classes()

    @property
    def bad_images(self) -> BadImages:
        """The unreadable-file policy (``"error"`` or ``"skip"``)."""
        return self._bad_images

    @property
    def extensions(self) -> tuple[str, ...]:
        """Lower-case file extensions taken as images."""
        return self._extensions

    def _option(self, split: str) -> str:
        return f"{split}_dir {self._dirs[split]}"

    def _init_classes(self) -> None:
        per_split = {split: _class_folders(root, self._option(split)) for split, root in self._dirs.items()}
        first = next(iter(per_split))  # train when given: it defines the classes
        reference = per_split[first]
        problems = []
        for split, names in per_split.items():
            missing, extra = sorted(set(reference) - set(names)), sorted(set(names) - set(reference))
            if missing or extra:
                what = [f"lacks {', '.join(missing)}"] if missing else []
                what += [f"has extra {', '.join(extra)}"] if extra else []
                problems.append(f"{self._option(split)} {' and '.join(what)}")
        if problems:
            raise UserError(
                f"class folders differ from those of {self._option(first)}: " + "; ".join(problems),
                "every split folder needs the same class subfolders: rename, add or remove folders so they match",
            )
        override = self._class_names_arg
        if override is not None:
            missing, extra = sorted(set(reference) - set(override)), sorted(set(override) - set(reference))
            if missing or extra or len(set(override)) != len(override):
                raise UserError(
                    f"class_names must name each class folder of {self._option(first)} once; "
                    f"not in class_names: {missing or 'none'}; no such folder: {extra or 'none'}",
                    "fix class_names, or drop it to use the sorted folder names",
                )
            self._classes = list(override)
        else:
            self._classes = list(reference)

    def _missing_hint(self, split: str) -> str:
        return {"train": "set train_dir", "val": "set val_dir, or train_dir with val_split > 0", "test": "set test_dir"}.get(
            split, f"set {split}_dir"
        )

    def _load_source(self, split: Split) -> Optional[FileSource]:
        root = self._dirs.get(split)
        if root is None:
            return None
        where = self._option(split)
        assert self._classes is not None
        same: dict[str, str] = {}
        for name in self._classes:
            first = same.setdefault(os.path.realpath(root / name), name)
            if first != name:
                raise UserError(
                    f"class folders {first} and {name} of {where} are the same folder (a symbolic link): "
                    "its images would get two labels",
                    "give each class its own folder, or remove the link",
                )
        paths, targets, ignored = [], [], []
        repeated = FileListing()
        for label, name in enumerate(self._classes):
            others = [root] + [root / other for other in self._classes if other != name]
            listing = list_files(root / name, self._extensions, elsewhere=others)
            ignored += listing.ignored
            repeated.repeated_dirs += listing.repeated_dirs
            repeated.repeated_files += listing.repeated_files
            if not listing.images:
                raise UserError(
                    f"class folder {root / name} has no images" + (f" (only {len(listing.ignored)} non-image files)" if listing.ignored else ""),
                    f"add {', '.join(self._extensions)} images to it, or remove the folder (every subfolder of the {split}_dir is a class)",
                )
            paths += listing.images
            targets += [label] * len(listing.images)
        stray = [root / f for f in sorted(os.listdir(root)) if not is_hidden(f) and (root / f).is_file()]
        if stray:
            log.warning("ignored %d file(s) directly in %s: only files inside class subfolders are used", len(stray), where)
        report_ignored(ignored, where, self._extensions)
        report_repeated(repeated, where)
        self.ignored_files[split] = len(ignored) + len(stray)

        good, bad = verify_images(paths, self._bad_images, where)
        self.skipped_files[split] = len(bad)
        if bad:
            bad_set = {p for p, _ in bad}
            targets = [t for p, t in zip(paths, targets) if p not in bad_set]
            emptied = sorted(set(self._classes) - {self._classes[t] for t in targets})
            if emptied:
                raise UserError(
                    f"no readable images left in class folder(s) {', '.join(emptied)} of {where}",
                    "replace the unreadable files with good images",
                )
        return FileSource(good, targets, root)


def _class_folders(root: Path, where: str) -> list[str]:
    if not root.exists():
        raise UserError(f"{where} does not exist", "check the path (relative paths are relative to the working directory)")
    if not root.is_dir():
        raise UserError(f"{where} is a file, not a folder", "point it at a folder with one subfolder per class")
    entries = [e for e in os.scandir(root) if not is_hidden(e.name)]
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        files = sum(1 for e in entries if e.is_file())
        found = f" (it has {files} files but no subfolders)" if files else " (it is empty)"
        raise UserError(
            f"no class subfolders in {where}{found}",
            "arrange images as <folder>/<class name>/<image>; for unlabeled images use predict_dir",
        )
    return classes
