"""Finding image files: which names count as images, which are ignored, and the folder walk.

Shared by the folder, MVTec and zip readers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.datasets.image_set import Problem
from core.images import ImageError, probe_size


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
"""File name endings (lower case) that readers treat as images."""

# Operating-system litter that is never worth a problem report.
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def _require_folder(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: folder not found")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a folder")


@dataclass(frozen=True)
class _FoundImage:
    relative: str  # posix path relative to the reader's root
    path: str
    height: int
    width: int


def _scan_images(folder: Path, root: Path) -> tuple[list[_FoundImage], list[Problem]]:
    """Images under ``folder`` (recursively), sorted by name relative to ``root``.

    Hidden files and folders and OS litter are ignored silently; other
    non-image files and images whose header is unreadable become problems.
    """
    found: list[_FoundImage] = []
    problems: list[Problem] = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not _is_ignored(name))
        for file_name in files:
            if _is_ignored(file_name):
                continue
            full_path = os.path.join(directory, file_name)
            relative = Path(full_path).relative_to(root).as_posix()
            extension = Path(file_name).suffix.lower()
            if extension not in IMAGE_EXTENSIONS:
                shown = extension or "no extension"
                problems.append(Problem(relative, f"not an image file type ({shown}); skipped"))
                continue
            try:
                height, width = probe_size(full_path, name=relative)
            except ImageError as error:
                problems.append(Problem(relative, error.reason))
                continue
            found.append(_FoundImage(relative, full_path, height, width))
    found.sort(key=lambda image: image.relative)
    problems.sort(key=lambda problem: problem.source)
    return found, problems


def _parent_group(relative: str) -> str | None:
    parent = PurePosixPath(relative).parent.as_posix()
    return None if parent == "." else parent


def _subfolders(folder: Path) -> list[Path]:
    return sorted(child for child in folder.iterdir() if child.is_dir() and not _is_ignored(child.name))


def _stray_files(folder: Path, root: Path, reason: str) -> list[Problem]:
    return [
        Problem(child.relative_to(root).as_posix(), reason)
        for child in sorted(folder.iterdir())
        if child.is_file() and not _is_ignored(child.name)
    ]
