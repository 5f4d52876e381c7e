"""Lazy listing of the images to score: folders, globs, zip archives, text files of paths.

:func:`iter_sources` turns what a user typed (``shift_07/``, ``'line3/*.png'``,
``archive.zip``, ``todo.txt``) into a stream of :class:`Source` records
without reading any pixels and without building a list of the whole input:
a folder is walked one directory at a time, a glob is expanded lazily, a text
file is read one line at a time. Only a zip's central directory (its table of
contents) is read at once.

Every source carries a resume ``key`` (file size + modification time, or a
zip member's size + CRC): an output row with the same ``file`` and ``key``
means "this very file was already scored". A source that can already be
seen to be unusable (missing, not an image type, an unsafe zip member) carries
a ``problem`` instead and becomes an error row, never an abort.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

from core.datasets._scan import IMAGE_EXTENSIONS, _is_ignored
from core.datasets.archives import _read_member, _unsafe_member_name, _zip_member_problem
from core.images import ImageError, decode_image

LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
"""A file with one of these endings is read as a list of paths, one per line."""

_GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class Source:
    """One input image, not yet read.

    Attributes:
        file: the name written to the output's ``file`` column: the path as
            given (joined with the folder it was found in), or
            ``archive.zip!member/name.png`` for a zip member.
        path: the file to open (the archive, for a zip member).
        member: the member name inside the archive, or None.
        key: resume key, ``"<size>:<mtime_ns>"`` or ``"zip:<size>:<crc32>"``.
        problem: why the source cannot be scored (known without decoding), or None.
        index: position in the whole listing (:func:`numbered`), -1 when unknown;
            output file names of ``segment`` start with it.
    """

    file: str
    path: str
    member: str | None = None
    key: str = ""
    problem: str | None = None
    index: int = -1

    def as_dict(self) -> dict:
        """Plain strings and an int (the form Ray Data rows carry); ``""`` stands for None."""
        return {"file": self.file, "path": self.path, "member": self.member or "", "key": self.key,
                "problem": self.problem or "", "index": self.index}

    @classmethod
    def from_dict(cls, row: dict) -> "Source":
        return cls(str(row["file"]), str(row["path"]), str(row["member"]) or None, str(row["key"]),
                   str(row["problem"]) or None, int(row["index"]))


def _file_source(path: str) -> Source:
    """A source for one file on disk (stat only)."""
    try:
        status = os.stat(path)
    except OSError as error:
        return Source(path, path, problem=f"cannot be read ({error.strerror or error})")
    key = f"{status.st_size}:{status.st_mtime_ns}"
    extension = Path(path).suffix.lower()
    if extension not in IMAGE_EXTENSIONS:
        return Source(path, path, key=key, problem=f"not an image file type ({extension or 'no extension'})")
    return Source(path, path, key=key)


def _unreadable_folder(error: OSError) -> Source:
    """The row of a folder the walk cannot list (no permission, removed meanwhile): nothing under it is scored."""
    folder = os.fspath(error.filename) if error.filename is not None else "?"
    reason = error.strerror or str(error)
    return Source(folder, folder, problem=f"folder cannot be read ({reason}); nothing in it was scored")


def _walk_folder(folder: str) -> Iterator[Source]:
    """Images under ``folder``, recursively, in name order; hidden files and OS litter are ignored.

    Links to folders are not followed (a link to a parent would list everything again, without end);
    a subfolder that cannot be listed becomes an error row.
    """
    unreadable: list[OSError] = []
    for directory, subfolders, files in os.walk(folder, onerror=unreadable.append):
        while unreadable:
            yield _unreadable_folder(unreadable.pop(0))
        subfolders[:] = sorted(name for name in subfolders if not _is_ignored(name))
        for name in sorted(files):
            if not _is_ignored(name):
                yield _file_source(os.path.join(directory, name))
    while unreadable:
        yield _unreadable_folder(unreadable.pop(0))


def _parts_match(pattern: list[str], parts: list[str]) -> bool:
    """Whether path ``parts`` match glob ``pattern`` parts (``**`` stands for any number of folders)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_parts_match(pattern[1:], parts[skip:]) for skip in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatch(parts[0], pattern[0]) and _parts_match(pattern[1:], parts[1:])


def _may_hold_matches(pattern: list[str], parts: list[str]) -> bool:
    """Whether something under the folder ``parts`` could match ``pattern`` (prunes the walk)."""
    if not parts:
        return bool(pattern)
    if not pattern:
        return False
    if pattern[0] == "**":
        return True
    return fnmatch.fnmatch(parts[0], pattern[0]) and _may_hold_matches(pattern[1:], parts[1:])


def _expand_glob(entry: str) -> Iterator[Source]:
    """The files and folders matching the glob ``entry``, in name order, never through a link to a folder.

    ``glob`` follows folder links, so with ``**`` a link to a parent folder listed every file again
    (41 times here) and two such links made the listing grow without end. Here the folder of the
    pattern's fixed start is walked without following links and without entering folders that
    cannot hold a match; a matching folder is scored whole, like a folder given by name.
    """
    separators = "/\\" if os.sep == "\\" else "/"
    parts = re.split(f"[{re.escape(separators)}]", entry)
    fixed = 0
    while fixed < len(parts) - 1 and not _GLOB_CHARACTERS & set(parts[fixed]):
        fixed += 1
    base = os.sep.join(parts[:fixed]) if fixed else ""
    if base == "" and entry.startswith(tuple(separators)):
        base = os.sep
    pattern = [part for part in parts[fixed:] if part not in ("", ".")]
    top = base or os.curdir
    if not os.path.isdir(top):
        return
    unreadable: list[OSError] = []
    for directory, subfolders, files in os.walk(top, onerror=unreadable.append):
        while unreadable:
            yield _unreadable_folder(unreadable.pop(0))
        relative = os.path.relpath(directory, top)
        here = [] if relative == os.curdir else relative.split(os.sep)
        keep = []
        for name in sorted(subfolders):
            if _is_ignored(name) or os.path.islink(os.path.join(directory, name)):
                continue
            if _parts_match(pattern, here + [name]):
                yield from _walk_folder(os.path.join(base, *here, name))
            elif _may_hold_matches(pattern, here + [name]):
                keep.append(name)
        subfolders[:] = keep
        for name in sorted(files):
            if not _is_ignored(name) and _parts_match(pattern, here + [name]):
                yield _file_source(os.path.join(base, *here, name))  # the name glob would give
    while unreadable:
        yield _unreadable_folder(unreadable.pop(0))


def _zip_members(path: str) -> Iterator[Source]:
    """Members of a zip archive (the central directory is read once; no member is decompressed)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        yield Source(path, path, problem=f"not a readable zip archive ({error})")
        return
    with archive:
        seen: set[str] = set()
        for info in archive.infolist():
            if info.is_dir():
                continue
            parts = [part for part in info.filename.replace("\\", "/").split("/") if part not in ("", ".")]
            relative = "/".join(parts)
            shown = f"{path}!{relative}"
            key = f"zip:{info.file_size}:{info.CRC:08x}"
            if _unsafe_member_name(info.filename):  # before the hidden-name rule: '..' starts with a dot
                yield Source(shown, path, info.filename, key, "unsafe path (absolute or containing '..')")
                continue
            if not parts or any(_is_ignored(part) for part in parts):
                continue
            reason = _zip_member_problem(info, relative, seen)
            seen.add(relative)
            yield Source(shown, path, info.filename, key, reason)


def _path_list(path: str) -> Iterator[str]:
    """Lines of a text file of paths; relative paths are relative to the list's folder; ``#`` starts a comment."""
    base = os.path.dirname(path)
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield entry if os.path.isabs(entry) else os.path.join(base, entry)


def iter_sources(inputs: Iterable[str | os.PathLike], _depth: int = 0) -> Iterator[Source]:
    """Lazily list every image named by ``inputs`` (folders, globs, zips, text files of paths, files).

    Folders are walked in name order; glob matches come in the file system's
    order (``**`` recurses). A list file may name folders, zips and globs too
    (but not another list file more than two levels deep).
    """
    for given in inputs:
        entry = os.fspath(given)
        if os.path.isdir(entry):
            yield from _walk_folder(entry)
        elif os.path.isfile(entry) and entry.lower().endswith(".zip"):
            yield from _zip_members(entry)
        elif os.path.isfile(entry) and Path(entry).suffix.lower() in LIST_EXTENSIONS:
            if _depth >= 2:
                yield Source(entry, entry, problem="list file nested too deeply (a list may name lists two levels deep)")
                continue
            try:
                yield from iter_sources(_path_list(entry), _depth + 1)
            except (OSError, UnicodeDecodeError) as error:
                yield Source(entry, entry, problem=f"cannot read the list of paths ({error})")
        elif not os.path.exists(entry) and _GLOB_CHARACTERS & set(entry):
            matched = False
            for source in _expand_glob(entry):
                matched = True
                yield source
            if not matched:
                yield Source(entry, entry, problem="no file matches this pattern")
        elif not os.path.exists(entry):
            yield Source(entry, entry, problem="no such file or folder")
        else:
            yield _file_source(entry)


def numbered(sources: Iterable[Source]) -> Iterator[Source]:
    """The sources with ``index`` set to their position (0, 1, ...)."""
    for position, source in enumerate(sources):
        yield replace(source, index=position)


def count_sources(inputs: Iterable[str | os.PathLike]) -> int:
    """How many sources :func:`iter_sources` lists (a listing pass, no image is read)."""
    return sum(1 for _ in iter_sources(inputs))


# --------------------------------------------------------------------------- reading one source

_open_archives = threading.local()


def _archive(path: str) -> zipfile.ZipFile:
    """This thread's open handle on ``path`` (ZipFile objects must not be shared between threads)."""
    archives = getattr(_open_archives, "by_path", None)
    if archives is None:
        archives = _open_archives.by_path = {}
    if path not in archives:
        if len(archives) >= 8:  # a long list of zips must not keep every one open
            archives.pop(next(iter(archives))).close()
        archives[path] = zipfile.ZipFile(path)
    return archives[path]


def load_source(source: Source) -> np.ndarray:
    """Decode one source: ``(H, W, 3)`` uint8 RGB. Raises :class:`~core.images.ImageError` naming it."""
    if source.problem is not None:
        raise ImageError(source.file, source.problem)
    if source.member is None:
        return decode_image(source.path, name=source.file)
    try:
        archive = _archive(source.path)
        data = _read_member(archive, archive.getinfo(source.member))
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, RuntimeError, NotImplementedError) as error:
        raise ImageError(source.file, f"cannot be extracted ({error})") from error
    return decode_image(data, name=source.file)


def source_name(file: str) -> str:
    """The last part of a ``file`` column value (for output file names)."""
    return PurePosixPath(file.replace("!", "/").replace("\\", "/")).name
