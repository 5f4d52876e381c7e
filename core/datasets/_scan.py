"""Finding image files: which names count as images, which are ignored, and the folder walk.

Shared by the folder, MVTec and zip readers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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


def outside_roots(path: str | os.PathLike, roots: Sequence[Path] | None) -> str | None:
    """Why the file ``path`` may not be read when it leads outside ``roots`` (None: it may).

    ``roots``: the folders the app may read (:func:`core.paths.folder_roots`); None = no limit (the
    command line reads what its user names). The app checks the folder a user names; this checks each
    file in it, after following links, so a folder of links (to files or folders) cannot reach elsewhere.
    """
    if roots is None:
        return None
    from core.paths import FolderNotAllowed, allowed_folder

    try:
        allowed_folder(path, roots)
    except FolderNotAllowed:
        return "a link to a file outside the folders this app may use (ANOMALY_FOLDER_ROOTS); skipped"
    return None


def _scan_images(folder: Path, root: Path,
                 roots: Sequence[Path] | None = None) -> tuple[list[_FoundImage], list[Problem]]:
    """Images under ``folder`` (recursively), sorted by name relative to ``root``.

    Hidden files and folders and OS litter are ignored silently; other
    non-image files, images whose header is unreadable, subfolders that
    cannot be listed and (with ``roots``) files that lead outside the roots
    become problems.
    """
    found: list[_FoundImage] = []
    problems: list[Problem] = []
    unreadable: list[OSError] = []
    for directory, subfolders, files in os.walk(folder, onerror=unreadable.append):
        subfolders[:] = sorted(name for name in subfolders if not _is_ignored(name))
        for file_name in files:
            if _is_ignored(file_name):
                continue
            full_path = os.path.join(directory, file_name)
            relative = Path(full_path).relative_to(root).as_posix()
            outside = outside_roots(full_path, roots)
            if outside is not None:
                problems.append(Problem(relative, outside))
                continue
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
    for error in unreadable:
        shown = Path(error.filename).relative_to(root).as_posix() if error.filename is not None else str(folder)
        problems.append(Problem(shown or ".", f"folder cannot be read ({error.strerror or error}); "
                                              f"its images were not imported"))
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
