"""One way to write and read the project's ``.npz`` files (models, Fisher diagonals, raw maps, feature caches).

Writing (:func:`write_npz`) is atomic: the arrays go to a temporary file in
the same folder, which is flushed to disk and then renamed over the target, so
a crash or a full disk never leaves half a file where a good one was.

Reading (:func:`open_npz`) treats the file as untrusted input:

* the JSON header (a ``uint8`` array member) is read and parsed *before* any
  other array, so a caller can refuse a foreign file without loading it;
* every array's declared size (from its ``.npy`` header inside the zip) is
  checked against what the zip member holds and against a cap that grows with
  the file's size, so a 1 MB file cannot make us allocate 1 GB;
* nothing is unpickled (object arrays are refused);
* every failure — missing file, not a zip, truncated file, flipped byte (the
  zip CRC catches it), header of the wrong JSON type — raises one error type
  (:class:`NpzFileError`, or the subclass the caller names) whose message
  starts with the file's path.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAX_HEADER_BYTES = 64 * 1024**2
"""A JSON header larger than this is refused (ours are a few kB; SPADE's raw-map keys a few MB)."""

MIN_ARRAY_ALLOWANCE = 256 * 1024**2
"""Arrays may always add up to this much, whatever the file's size."""

MAX_EXPANSION = 20
"""Beyond the allowance, arrays may hold at most this many times the file's size (ours are stored
uncompressed, so about 1x; float arrays deflate by far less than 20x)."""

# What reading a damaged or hand-made zip can raise: zipfile's own errors, zlib's, short
# reads, numpy's header parser (ValueError), encrypted or exotic members (RuntimeError,
# NotImplementedError), absurd numbers in headers (OverflowError, MemoryError).
_READ_ERRORS = (
    zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError, RuntimeError,
    NotImplementedError, OverflowError, MemoryError, SyntaxError,
)


_MAX_TAIL = 4096


class NpzFileError(ValueError):
    """An ``.npz`` file of this tool cannot be used; the message starts with the file's path."""


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
              header: Mapping[str, Any] | None = None, header_key: str = "__header__",
              compress: bool = False) -> Path:
    """Write ``arrays`` (and ``header`` as JSON under ``header_key``) to ``path`` atomically; returns the path.

    The suffix ``.npz`` is added when missing. Arrays are stored uncompressed
    (``np.savez``) unless ``compress`` (deflate, for outputs users keep many of);
    object arrays are refused by numpy's reader, so never write them.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz")
    members = dict(arrays)
    if header is not None:
        if header_key in members:
            raise ValueError(f"array name {header_key!r} is reserved for the header")
        members = {header_key: np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8), **members}
    return atomic_write(path, lambda stream: (np.savez_compressed if compress else np.savez)(stream, **members))


def atomic_write(path: str | os.PathLike, fill: Callable[[BinaryIO], None]) -> Path:
    """Write a file so that a reader sees the old one or the whole new one, never a part.

    ``fill(stream)`` writes the contents into a temporary file (``.tmp-*``) in the
    same folder, which is flushed to disk and renamed over ``path``; on any
    failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as stream:
            fill(stream)
            stream.flush()
            os.fsync(stream.fileno())  # the rename must not overtake the data on a crash
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


class NpzReader:
    """An open ``.npz`` (see :func:`open_npz`): ``names``, ``header(key)``, ``array(name)``, ``arrays()``."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, kind: str, error: type[NpzFileError]) -> None:
        self.path = path
        self.kind = kind
        self._archive = archive
        self._error = error
        self._members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
        budget = max(MIN_ARRAY_ALLOWANCE, MAX_EXPANSION * path.stat().st_size)
        self._budget_left = budget
        self._budget = budget

    def fail(self, reason: str) -> NpzFileError:
        """The caller's error type, naming the file: ``raise reader.fail("no header")``."""
        return self._error(f"{self.path}: {reason}")

    @property
    def names(self) -> list[str]:
        """Array names in the file (header included), in file order."""
        return list(self._members)

    def __contains__(self, name: str) -> bool:
        return name in self._members

    def header(self, key: str = "__header__", max_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
        """The JSON object stored under ``key``; a missing, damaged or non-object header raises."""
        if key not in self._members:
            raise self.fail(f"not a {self.kind} of this tool (no header)")
        raw = self.array(key, max_bytes=max_bytes)
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise self.fail(f"not a {self.kind} of this tool (header is {raw.dtype} {raw.shape}, not JSON bytes)")
        try:
            header = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise self.fail(f"damaged {self.kind} header ({error})") from None
        if not isinstance(header, dict):
            raise self.fail(f"damaged {self.kind} header (a JSON {type(header).__name__}, expected an object)")
        return header

    def array(self, name: str, max_bytes: int | None = None) -> np.ndarray:
        """One array, after checking its declared size; never unpickles."""
        info = self._members.get(name)
        if info is None:
            raise self.fail(f"{self.kind} lacks the array {name!r}")
        try:
            with self._archive.open(info) as stream:
                shape, dtype, fortran = _npy_header(stream)
                declared = math.prod(shape) * dtype.itemsize
                limit = self._budget_left if max_bytes is None else min(max_bytes, self._budget_left)
                if dtype.hasobject:
                    raise self.fail(f"array {name!r} holds Python objects; refused (this tool never unpickles)")
                if declared > info.file_size:
                    raise self.fail(f"array {name!r} declares {declared:,} bytes but its entry holds "
                                    f"{info.file_size:,} (truncated or damaged)")
                if declared > limit:
                    raise self.fail(f"array {name!r} declares {declared:,} bytes, more than this file "
                                    f"({self.path.stat().st_size:,} bytes) may hold ({self._budget:,}); refused")
                data = _read_exactly(stream, declared)
                # To the end of the member, so zipfile checks its CRC; a .npy holds nothing after its
                # array, so a long tail (a small array in front of a deflated bomb) is refused unread.
                if len(stream.read(_MAX_TAIL + 1)) > _MAX_TAIL:
                    raise self.fail(f"array {name!r} is followed by other data inside its entry (damaged or forged)")
        except NpzFileError:
            raise
        except _READ_ERRORS as error:
            raise self.fail(f"damaged {self.kind} (array {name!r}: {type(error).__name__}: {error})") from None
        self._budget_left -= declared
        if not declared:
            return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")

    def arrays(self, exclude: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Every array but those named in ``exclude`` (e.g. the header)."""
        return {name: self.array(name) for name in self._members if name not in exclude}


def _npy_header(stream: BinaryIO) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=10_000)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=10_000)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f"bad shape {shape}")
    return tuple(shape), np.dtype(dtype), bool(fortran)


def _read_exactly(stream: BinaryIO, size: int) -> bytearray:
    """``size`` bytes into one writable buffer (callers may modify the arrays, as np.load's)."""
    data = bytearray(size)
    view, done = memoryview(data), 0
    while done < size:
        count = stream.readinto(view[done:done + 16 * 1024**2])
        if not count:
            raise EOFError(f"{done:,} of {size:,} bytes")
        done += count
    return data


@contextmanager
def open_npz(path: str | os.PathLike, kind: str = "file",
             error: type[NpzFileError] = NpzFileError) -> Iterator[NpzReader]:
    """Open an ``.npz`` for checked reading (see the module docstring).

    ``kind`` names the file in messages ("model file", "Fisher file", ...);
    ``error`` is the exception type raised (a subclass of :class:`NpzFileError`).
    Errors raised while the caller reads are turned into ``error`` too.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise error(f"{path}: no such {kind}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {kind}") from None
    except PermissionError as failure:
        raise error(f"{path}: cannot read the {kind} ({failure.strerror})") from None
    except _READ_ERRORS as failure:
        raise error(f"{path}: not a {kind} of this tool (damaged, or not an .npz: {failure})") from None
    try:
        with archive:
            yield NpzReader(path, archive, kind, error)
    except NpzFileError:
        raise
    except _READ_ERRORS as failure:
        raise error(f"{path}: damaged {kind} ({type(failure).__name__}: {failure})") from None


def read_npz(path: str | os.PathLike, header_key: str = "__header__", kind: str = "file",
             error: type[NpzFileError] = NpzFileError) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, the other arrays) of a file written by :func:`write_npz` with a header."""
    with open_npz(path, kind, error) as npz:
        header = npz.header(header_key)
        return header, npz.arrays(exclude=(header_key,))
