"""Reader for zip archives (e.g. uploads): images read into memory, never extracted to disk."""

from __future__ import annotations

import io
import os
import re
import zipfile
import zlib
from pathlib import PurePosixPath

from core.datasets._scan import IMAGE_EXTENSIONS, _is_ignored, _parent_group
from core.datasets.image_set import ImageItem, ImageSet, Problem
from core.images import ImageError, probe_size


MAX_ZIP_MEMBERS = 20_000
"""Archives listing more files than this are refused outright."""

MAX_ZIP_TOTAL_BYTES = 2 * 1024**3
"""Archives whose files add up to more than this, uncompressed, are refused outright."""

MAX_ZIP_MEMBER_BYTES = 256 * 1024**2
"""Single archive members larger than this, uncompressed, are skipped."""

_ARCHIVE_EXTENSIONS = frozenset(
    {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".7z", ".rar", ".zst", ".lzma"}
)
# Deflate can be decompressed in bounded chunks; other methods (bzip2, lzma)
# may expand a small input in one go, and image archives rarely use them.
_SAFE_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_READ_CHUNK = 1024 * 1024
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def _unsafe_member_name(member: str) -> bool:
    normalised = member.replace("\\", "/")
    return (
        normalised.startswith("/")
        or _WINDOWS_DRIVE.match(normalised) is not None
        or ".." in normalised.split("/")
    )


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    # Chunked reads bound each decompression step even if the declared size lies;
    # zipfile itself never returns more than the declared size.
    chunks: list[bytes] = []
    with archive.open(info) as stream:
        while chunk := stream.read(_READ_CHUNK):
            chunks.append(chunk)
    return b"".join(chunks)


def _zip_member_problem(info: zipfile.ZipInfo, relative: str, seen: set[str]) -> str | None:
    """Why an archive member cannot be used as an image, or None when it can."""
    extension = PurePosixPath(relative).suffix.lower()
    if extension in _ARCHIVE_EXTENSIONS:
        return "archive inside the archive; not opened (unpack it and include its images instead)"
    if extension not in IMAGE_EXTENSIONS:
        return f"not an image file type ({extension or 'no extension'}); skipped"
    if info.flag_bits & 0x1:
        return "encrypted; skipped"
    if info.compress_type not in _SAFE_COMPRESSION:
        return f"compression method {info.compress_type} not supported (use deflate or none); skipped"
    if info.file_size > MAX_ZIP_MEMBER_BYTES:
        return f"too large ({info.file_size:,} bytes uncompressed, limit {MAX_ZIP_MEMBER_BYTES:,}); skipped"
    if relative in seen:
        return "duplicate entry in the archive; skipped"
    return None


def read_zip(
    source: bytes | str | os.PathLike,
    name: str | None = None,
    label: int | None = None,
) -> ImageSet:
    """Images inside a zip archive, read into memory without extracting to disk.

    Args:
        source: the archive's bytes (e.g. an upload) or its path.
        name: how to refer to the archive in messages; defaults to the file
            name of a path, or ``"upload.zip"`` for bytes.
        label: label given to every image.

    Returns:
        A set named after the archive; item names are member paths (folders
        allowed, sorted); ``group`` is the member's folder (None at the top).
        Skipped and reported as problems: members with absolute paths or
        ``..`` components, archives inside the archive, non-images, encrypted,
        oversized or corrupt members, unreadable image headers. Hidden files
        and ``__MACOSX`` folders are ignored silently.

    Raises:
        ValueError: when the input is not a zip archive, lists more than
            ``MAX_ZIP_MEMBERS`` files or more than ``MAX_ZIP_TOTAL_BYTES``
            uncompressed, or holds no usable image.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        archive_name = name or "upload.zip"
        file: io.BytesIO | str | os.PathLike = io.BytesIO(bytes(source))
    else:
        archive_name = name or os.path.basename(os.fspath(source))
        file = source
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{archive_name}: not a zip archive ({exc})") from exc

    items: list[ImageItem] = []
    problems: list[Problem] = []
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise ValueError(
                f"{archive_name}: holds {len(members):,} files, more than the limit of {MAX_ZIP_MEMBERS:,}"
            )
        total_bytes = sum(info.file_size for info in members)
        if total_bytes > MAX_ZIP_TOTAL_BYTES:
            raise ValueError(
                f"{archive_name}: {total_bytes:,} bytes uncompressed, more than the limit of {MAX_ZIP_TOTAL_BYTES:,}"
            )
        seen: set[str] = set()
        for info in sorted(members, key=lambda member: member.filename.replace("\\", "/")):
            if _unsafe_member_name(info.filename):
                problems.append(Problem(info.filename, "unsafe path (absolute or containing '..'); skipped"))
                continue
            parts = [part for part in info.filename.replace("\\", "/").split("/") if part not in ("", ".")]
            if not parts or any(_is_ignored(part) for part in parts):
                continue
            relative = "/".join(parts)
            reason = _zip_member_problem(info, relative, seen)
            if reason is not None:
                problems.append(Problem(relative, reason))
                continue
            seen.add(relative)
            try:
                data = _read_member(archive, info)
                probe_size(data, name=relative)
            except ImageError as error:
                problems.append(Problem(relative, error.reason))
                continue
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
                problems.append(Problem(relative, f"cannot be extracted ({exc}); skipped"))
                continue
            items.append(ImageItem(name=relative, data=data, label=label, group=_parent_group(relative)))

    if not items:
        details = "; ".join(str(problem) for problem in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            f"{archive_name}: no usable images inside" + (f": {details}{more}" if details else " (the archive is empty)")
        )
    return ImageSet(items, problems, name=PurePosixPath(archive_name).stem or archive_name)
