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
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

SCORE_COLUMNS: tuple[str, ...] = ("file", "score", "anomalous", "threshold", "model", "error", "key")
"""Columns of ``python -m core score``; ``error`` is empty for a scored image, ``key`` is the resume key."""

_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})


class ResultFileError(ValueError):
    """An existing output cannot be resumed (another tool's file, other columns, another model)."""


def _clean(value: Any) -> Any:
    # One row must stay on one line: a newline in an error message would split it.
    if isinstance(value, str):
        return value.replace("\r", " ").replace("\n", " ")
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _csv_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    return str(value)


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline (it is rewritten when that batch is redone)."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as stream:
        stream.seek(size - 1)
        if stream.read(1) == b"\n":
            return
        # Walk back to the previous newline in blocks.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            stream.seek(start)
            block = stream.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                stream.truncate(start + cut + 1)
                break
            end = start
        else:
            stream.truncate(0)
        stream.flush()
        os.fsync(stream.fileno())


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


def read_results(path: str | os.PathLike) -> list[dict[str, str]]:
    """Every complete row of a result file (CSV or JSONL) as dicts of strings/values (tests, dashboard)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as stream:
        text = stream.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a torn last line is not a row
    if path.suffix.lower() in _JSONL_SUFFIXES:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(csv.DictReader(io.StringIO(text)))


def _iter_rows(path: Path, jsonl: bool):
    """Rows of a result file whose torn tail was already cut, read one line at a time (millions of rows fit)."""
    with open(path, encoding="utf-8", newline="") as stream:
        if jsonl:
            for line in stream:
                if line.strip():
                    yield json.loads(line)
        else:
            yield from csv.DictReader(stream)


def open_results(
    path: str | os.PathLike | None,
    columns: Sequence[str] = SCORE_COLUMNS,
    resume: bool = False,
    model: str | None = None,
) -> tuple[ResultWriter, set[tuple[str, str]]]:
    """A writer for ``path`` (None = standard output) and the ``(file, key)`` pairs it already holds.

    Without ``resume`` an existing file is replaced. With ``resume`` its torn
    last line is cut off, its columns must be ``columns`` and, when ``model``
    is given, its rows must come from that model (:class:`ResultFileError` otherwise).
    """
    if path is None:
        if resume:
            raise ValueError("--resume needs an output file (--csv or --jsonl), not standard output")
        writer = ResultWriter(sys.stdout, columns, jsonl=False, owns=False, path=None)
        writer.write_header()
        return writer, set()
    path = Path(path)
    jsonl = path.suffix.lower() in _JSONL_SUFFIXES
    done: set[tuple[str, str]] = set()
    existing = resume and path.exists() and path.stat().st_size > 0
    if existing:
        _drop_torn_tail(path)
        if not jsonl:
            with open(path, encoding="utf-8", newline="") as stream:
                header = next(csv.reader(stream), None)
            if header is not None and tuple(header) != tuple(columns):
                raise ResultFileError(f"{path}: cannot resume, its columns {header} are not {list(columns)}")
        for row in _iter_rows(path, jsonl):
            if model is not None and row.get("model") not in (None, "", model):
                raise ResultFileError(
                    f"{path}: cannot resume, its rows were scored by model {row.get('model')!r}, not {model!r}"
                )
            done.add((str(row.get("file")), str(row.get("key") or "")))
        existing = path.stat().st_size > 0
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a" if existing else "w", encoding="utf-8", newline="")
    writer = ResultWriter(stream, columns, jsonl=jsonl, owns=True, path=path)
    if not existing:
        writer.write_header()
    return writer, done
