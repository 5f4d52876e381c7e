"""Reading the Table 6 JSON files that ``adapt --compare --table`` writes, for ``adapt --merge``.

Such files are often copied between machines and edited by hand, so every
field the merge uses is checked here, and a file that does not have the
shape the writer gives it is refused with a :class:`TableFileError` naming
the file and the field, never a traceback further on.

Shape (the fields read; others are kept as they are)::

    {"settings": {...},
     "per_class": {"<class>": {"rows": [{"method": "<name>", "auroc": 0.93 | null, ...}, ...], ...}, ...},
     "command": [...], "wall_seconds": 12.3}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_TABLE_BYTES = 64 * 1024 * 1024
"""A Table 6 file with curves for ten classes is a few MB; a larger file is not one."""


class TableFileError(ValueError):
    """A file given to ``adapt --merge`` is not a Table 6 file of ``adapt --compare --table``."""


@dataclass(frozen=True)
class TablePart:
    """One file's share of a merged table: its classes (as written) and the settings they were run with."""

    path: str
    per_class: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    command: Any = None
    wall_seconds: float | None = None


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "text", bool: "true/false"}.get(
        type(value), "a number")


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise TableFileError(f"{where} is {_kind(row)}, not an object with a method and its auroc")
    if not isinstance(row.get("method"), str) or not row["method"]:
        raise TableFileError(f"{where}.method is {_kind(row.get('method'))}, not a method name")
    auroc = row.get("auroc")
    if auroc is None:
        return
    if isinstance(auroc, bool) or not isinstance(auroc, (int, float)) or not (math.isfinite(auroc) and 0 <= auroc <= 1):
        raise TableFileError(f"{where}.auroc is {json.dumps(auroc)}, not a ROC AUC between 0 and 1 (or null)")


def _check_class(name: str, entry: Any) -> None:
    where = f"per_class[{json.dumps(name)}]"
    if not isinstance(entry, dict):
        raise TableFileError(f"{where} is {_kind(entry)}, not an object with rows")
    rows = entry.get("rows")
    if not isinstance(rows, list) or not rows:
        raise TableFileError(f"{where}.rows is {_kind(rows) if rows != [] else 'empty'}, not a list of methods")
    for position, row in enumerate(rows):
        _check_row(row, f"{where}.rows[{position}]")


def read_table_part(path: str | os.PathLike) -> TablePart:
    """The classes and settings of one Table 6 file; :class:`TableFileError` (message starting with the path)
    when it cannot be read or does not have the writer's shape."""
    shown = os.fspath(path)
    try:
        if Path(path).stat().st_size > MAX_TABLE_BYTES:
            raise TableFileError(f"larger than {MAX_TABLE_BYTES // 2**20} MB")
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(document, dict):
            raise TableFileError(f"the file holds {_kind(document)}, not an object")
        settings, per_class = document.get("settings"), document.get("per_class")
        if not isinstance(settings, dict):
            raise TableFileError(f"settings is {_kind(settings)}, not an object")
        if not isinstance(per_class, dict) or not per_class:
            raise TableFileError(f"per_class is {_kind(per_class) if per_class != {} else 'empty'}, "
                                 f"not an object of classes")
        for name, entry in per_class.items():
            _check_class(name, entry)
        wall = document.get("wall_seconds")
        wall = float(wall) if isinstance(wall, (int, float)) and not isinstance(wall, bool) else None
    except (OSError, ValueError, RecursionError) as error:  # JSON errors and TableFileError are ValueErrors
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise TableFileError(f"{shown}: not a table written by adapt --compare --table ({reason})") from None
    return TablePart(shown, per_class, settings, document.get("command"), wall)
