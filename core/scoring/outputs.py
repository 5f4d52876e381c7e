"""Result files that survive a kill: CSV or JSON Lines, appended and fsynced one batch at a time.

A row is written only once its batch is scored, and every batch ends with
``flush`` + ``fsync``, so a run killed at any moment (``SIGKILL``, power cut
after the fsync) leaves complete rows for everything it reported, plus at
most one torn last line. :func:`open_results` with ``resume=True`` cuts that
torn line off and returns the ``(file, key)`` pairs already present, which
the scorer then skips: nothing is lost and nothing is written twice.

The format follows the file name: ``.jsonl`` (or ``.ndjson``) is JSON Lines,
anything else CSV. The first columns are the historic ``file, score,
anomalous, threshold`` so existing scripts keep working.

Every row is one line. A CSV cell escapes what would break that or the
file's UTF-8 (line breaks, control characters, the bytes of a file name that
are not UTF-8) and neutralises spreadsheet formulas (:func:`csv_text`);
JSON Lines keep every name exactly. Before a resume appends anything, every
line is checked: a line that is not a row stops it with a
:class:`ResultFileError` naming the file and the line, and the file is left
untouched.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

SCORE_COLUMNS: tuple[str, ...] = ("file", "score", "anomalous", "threshold", "model", "error", "key")
"""Columns of ``python -m core score``; ``error`` is empty for a scored image, ``key`` is the resume key."""

_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})


class ResultFileError(ValueError):
    """An existing output cannot be resumed (another tool's file, other columns, another model)."""


_MEND = "mend or delete that line to resume, or score into a new file"
_NOT_OUTPUTS = frozenset({".npz", ".zip", ".pth", ".pt"})
"""Output names that are refused whatever exists: a model, an archive or weights, never a result file."""


def check_output(path: str | os.PathLike | None, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse (``ValueError``) an output that would overwrite one of ``inputs`` (the model, images, lists).

    Also refused: a name ending like an image, a model or an archive, which a typo in ``--csv`` could
    otherwise overwrite even when it is not among the inputs.
    """
    if path is None:
        return
    from core.datasets._scan import IMAGE_EXTENSIONS

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix in _NOT_OUTPUTS:
        raise ValueError(f"{path}: a {suffix} file cannot hold results (they would overwrite it); "
                         f"name a .csv or .jsonl file")
    if not path.exists():
        return
    for given in inputs:
        try:
            same = os.path.isfile(given) and os.path.samefile(path, given)
        except OSError:
            same = False
        if same:
            raise ValueError(f"{path}: this is an input ({os.fspath(given)}); results would overwrite it, "
                             f"name another output file")


def _clean(value: Any) -> Any:
    """NaN (a score that could not be computed) is written as an empty cell / JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# Characters a CSV cell cannot carry as they are: line breaks and other control characters (a row must
# stay on one line, or a torn row could swallow the rows appended after it) and lone surrogates, which
# is how Python holds the bytes of a file name that are not valid UTF-8 (``caf\xe9.png`` from Latin-1).
_UNWRITABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_FORMULA_STARTS = ("=", "+", "-", "@")
"""A spreadsheet runs a cell that starts with one of these as a formula (CSV injection, OWASP; its tab
and carriage return are escaped above, so no cell starts with them)."""


def _escape(match: re.Match) -> str:
    character = match.group()
    code = ord(character)
    if character in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[character]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def csv_text(text: str) -> str:
    """``text`` as a CSV cell of this tool: one line of valid UTF-8 that a spreadsheet shows as text.

    A line break becomes ``\\n`` / ``\\r``, a tab ``\\t``, another control character ``\\xNN``; a
    byte of a file name that is not valid UTF-8 becomes ``\\xNN`` (its value in hex: ``caf\\xe9.png``).
    A cell starting with ``=``, ``+``, ``-``, ``@`` (a formula for Excel, LibreOffice, Google Sheets)
    gets a leading ``'``, as OWASP advises. JSON Lines keep names exactly as they are.
    """
    text = _UNWRITABLE.sub(_escape, text)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _csv_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    if isinstance(value, str):
        return csv_text(value)
    return str(value)


class ResultWriter:
    """Appends rows (dicts keyed by ``columns``) to a CSV/JSONL file or a stream; see the module docstring."""

    def __init__(self, stream: TextIO, columns: Sequence[str], jsonl: bool, owns: bool, path: Path | None) -> None:
        self.columns = tuple(columns)
        self.jsonl = jsonl
        self.path = path
        self.rows_written = 0
        self._stream = stream
        self._owns = owns
        self._csv = None if jsonl else csv.writer(stream, lineterminator="\n")

    def write_header(self) -> None:
        if self._csv is not None:
            self._csv.writerow(self.columns)
            self._sync()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append one batch of rows, then flush and fsync (the batch is durable when this returns)."""
        if not rows:
            return
        if self.jsonl:
            # json.dumps escapes line breaks and undecodable bytes (as \\udcNN): a name stays exact and on one line.
            text = "".join(json.dumps({c: _clean(row.get(c)) for c in self.columns}) + "\n" for row in rows)
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerows([[_csv_text(_clean(row.get(c))) for c in self.columns] for row in rows])
            text = buffer.getvalue()
        # One write call per batch: a kill leaves whole rows plus at most one torn line.
        self._stream.write(text)
        self._sync()
        self.rows_written += len(rows)

    def _sync(self) -> None:
        self._stream.flush()
        if self._owns:
            os.fsync(self._stream.fileno())

    def close(self) -> None:
        if self._owns:
            self._stream.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


MAX_LINE_BYTES = 1 << 20
"""A longer line is not a row of this tool (its longest cells are a path and an error message)."""


class _Line:
    """One line of a result file: its number (from 1), its text without the newline, whether it ended
    with a newline (the last one may be torn by a kill), and why it cannot be a row (or None)."""

    def __init__(self, number: int, text: str, complete: bool, problem: str | None = None) -> None:
        self.number, self.text, self.complete, self.problem = number, text, complete, problem

    def error(self, path: Path) -> ResultFileError:
        return ResultFileError(f"{path}, line {self.number}: {self.problem}, not a row of a result file; {_MEND}")


def _lines(path: Path) -> Iterator[_Line]:
    """The lines of ``path`` one at a time (millions of rows fit, and so does one endless line).

    A line that is not UTF-8 text or is longer than :data:`MAX_LINE_BYTES` comes with a ``problem``:
    this tool never writes one.
    """
    with open(path, "rb") as stream:
        number = 0
        while raw := stream.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):  # skip the rest of it, a block at a time
                    raw = stream.readline(MAX_LINE_BYTES)
                yield _Line(number, "", raw.endswith(b"\n"), f"longer than {MAX_LINE_BYTES:,} bytes")
                continue
            complete = raw.endswith(b"\n")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield _Line(number, "", complete, f"not UTF-8 text (byte {error.start + 1} of the line)")
                continue
            yield _Line(number, text.rstrip("\n"), complete)


def _csv_fields(path: Path, line: _Line, columns: Sequence[str]) -> list[str]:
    """The cells of one CSV line; every row of this tool is one line with one cell per column."""
    if line.problem:
        raise line.error(path)
    try:
        fields = next(csv.reader([line.text], strict=True), [])
    except csv.Error as error:
        raise ResultFileError(f"{path}, line {line.number}: not a CSV row ({error}); {_MEND}") from None
    if len(fields) != len(columns):
        raise ResultFileError(f"{path}, line {line.number}: {len(fields)} cells, a row has {len(columns)} "
                              f"({', '.join(columns)}); {_MEND}")
    return fields


def _json_row(path: Path, line: _Line) -> dict[str, Any]:
    if line.problem:
        raise line.error(path)
    try:
        row = json.loads(line.text)
    except ValueError as error:
        raise ResultFileError(f"{path}, line {line.number}: not JSON ({error}); {_MEND}") from None
    if not isinstance(row, dict):
        raise ResultFileError(f"{path}, line {line.number}: a JSON {type(row).__name__}, a row is an object; {_MEND}")
    if not isinstance(row.get("file"), str) or not isinstance(row.get("key") or "", str):
        raise ResultFileError(f"{path}, line {line.number}: a row needs a text \"file\" (and \"key\"); {_MEND}")
    return row


def _parsed_rows(path: Path, jsonl: bool, columns: Sequence[str]) -> Iterator[tuple[_Line, dict[str, Any]]]:
    """``(line, row)`` for every complete row of a result file; :class:`ResultFileError` for any line that is
    not one (naming the file and line). A torn last line is not a row and is not checked."""
    lines = _lines(path)
    if not jsonl:
        header = next(lines, None)
        if header is None or not header.complete:
            return
        if header.problem:
            raise header.error(path)
        found = next(csv.reader([header.text]), [])
        if tuple(found) != tuple(columns):
            raise ResultFileError(f"{path}: cannot resume, its columns {found} are not {list(columns)}")
    for line in lines:
        if not line.complete:
            return
        if not line.problem and not line.text.strip():
            continue
        yield line, (_json_row(path, line) if jsonl else dict(zip(columns, _csv_fields(path, line, columns))))


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete row of a result file (CSV or JSONL) as dicts of strings/values (tests, dashboard).

    Lines that are not rows (a damaged file) are left out; ``--resume`` names them.
    """
    path = Path(path)
    if not path.exists():
        return []
    jsonl = path.suffix.lower() in _JSONL_SUFFIXES
    rows: list[dict[str, Any]] = []
    lines = _lines(path)
    columns: list[str] = []
    if not jsonl:
        header = next(lines, None)
        if header is None or not header.complete or header.problem:
            return []
        columns = next(csv.reader([header.text]), [])
    for line in lines:
        if not line.complete:
            break
        try:
            rows.append(_json_row(path, line) if jsonl else dict(zip(columns, _csv_fields(path, line, columns))))
        except ResultFileError:
            continue  # one damaged line
    return rows


class WrittenRows(set):
    """The ``(file, key)`` pairs a result file already holds, as written in it.

    ``(file, key) in rows`` takes a file name as the scorer knows it and writes it the way the file
    does (CSV escapes some characters, see :func:`csv_text`), so a name with a line break, an
    undecodable byte or a leading ``=`` is found again on resume.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]] = (), jsonl: bool = False) -> None:
        super().__init__(pairs)
        self.jsonl = jsonl

    def __contains__(self, pair: object) -> bool:
        if not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[0], str):
            return False
        file, key = pair
        return super().__contains__((file if self.jsonl else csv_text(file), key))


def _written_file(cell: str, jsonl: bool) -> str:
    """A ``file`` cell as this version writes it: older versions wrote ``=x.png`` without the leading ``'``."""
    return "'" + cell if not jsonl and cell.startswith(_FORMULA_STARTS) else cell


def _read_done(path: Path, jsonl: bool, columns: Sequence[str], model: str | None) -> tuple[WrittenRows, int]:
    """The rows already in ``path`` and the byte size of its complete lines (where a torn tail starts).

    Raises :class:`ResultFileError` naming the file (and line) when it is not a result file of
    these columns and this model; nothing is changed in it then.
    """
    done = WrittenRows(jsonl=jsonl)
    for line, row in _parsed_rows(path, jsonl, columns):
        if model is not None and row.get("model") not in (None, "", model):
            raise ResultFileError(f"{path}: cannot resume, its rows were scored by model {row.get('model')!r} "
                                  f"(line {line.number}), not {model!r}")
        done.add((_written_file(str(row["file"]), jsonl), str(row.get("key") or "")))
    return done, _complete_size(path, jsonl, columns)


def _complete_size(path: Path, jsonl: bool, columns: Sequence[str]) -> int:
    """Bytes up to the last newline; raises when the torn remainder cannot be the start of one of our lines."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        end = size
        while end > 0:  # walk back to the last newline in blocks
            start = max(0, end - 65536)
            stream.seek(start)
            cut = stream.read(end - start).rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        stream.seek(end)
        torn = stream.read(MAX_LINE_BYTES + 1)
    if torn and end == 0:
        # Nothing but a torn line: our own header (or first row) cut by a kill, or another file entirely.
        header = ",".join(columns).encode()
        ours = torn.startswith(b'{"') if jsonl else header.startswith(torn)
        if not ours:
            raise ResultFileError(f"{path}: not a result file of this tool (no complete line; its start is "
                                  f"neither a row nor the header {header.decode()})")
    return end


def open_results(
    path: str | os.PathLike | None,
    columns: Sequence[str] = SCORE_COLUMNS,
    resume: bool = False,
    model: str | None = None,
) -> tuple[ResultWriter, WrittenRows]:
    """A writer for ``path`` (None = standard output) and the ``(file, key)`` pairs it already holds.

    Without ``resume`` an existing file is replaced. With ``resume`` the whole
    file is checked first: every complete line must be a row of ``columns``
    and, when ``model`` is given, of that model (:class:`ResultFileError`
    naming the file and line otherwise, and the file is left as it is); then
    a torn last line (a kill in the middle of a write) is cut off.
    """
    if path is None:
        if resume:
            raise ValueError("--resume needs an output file (--csv or --jsonl), not standard output")
        writer = ResultWriter(sys.stdout, columns, jsonl=False, owns=False, path=None)
        writer.write_header()
        return writer, WrittenRows()
    path = Path(path)
    jsonl = path.suffix.lower() in _JSONL_SUFFIXES
    done = WrittenRows(jsonl=jsonl)
    existing = resume and path.exists() and path.stat().st_size > 0
    if existing:
        done, complete = _read_done(path, jsonl, columns, model)
        if complete < path.stat().st_size:
            _truncate(path, complete)
        existing = complete > 0
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a" if existing else "w", encoding="utf-8", newline="")
    writer = ResultWriter(stream, columns, jsonl=jsonl, owns=True, path=path)
    if not existing:
        writer.write_header()
    return writer, done


def _truncate(path: Path, size: int) -> None:
    """Cut ``path`` to ``size`` bytes, durably (the torn line is rewritten when its batch is redone)."""
    with open(path, "rb+") as stream:
        stream.truncate(size)
        stream.flush()
        os.fsync(stream.fileno())
