"""The workspace on disk: projects, their images, models, training runs and annotations.

Layout of a workspace folder (default ``~/.anomaly-workspace``, or the
``ANOMALY_WORKSPACE`` environment variable)::

    workspace.sqlite3        SQLite database (WAL mode, foreign keys on)
    objects/ab/abcdef...     image and mask files, named by the sha256 of their bytes
    models/<uuid>.npz        fitted detectors written by ``Detector.save``

Why content addressing: the same picture imported twice (into two projects,
or promoted from the test set to the normal set) is stored once, and a file
name can never collide with another file's.

Atomicity: an import first validates every image (full decode) and writes the
object files (temp file + ``os.replace``), then inserts all rows in one
transaction. A failure anywhere leaves the database as it was; object files
that no row points to are harmless and :meth:`Workspace.collect_garbage`
removes them.

Every method opens its own short-lived connection, so one ``Workspace`` can be
used from several threads (a Streamlit session and its training thread).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.paths import WORKSPACE_ENV, default_workspace  # noqa: F401  (where the workspace lives)
from core.datasets import ImageItem, ImageSet, Problem
from core.datasets.uploads import plan_upload
from core.images import ImageError, decode_image, decode_mask
from core.npz_io import atomic_write
from core.progress import CancelFn, ProgressFn, check_cancel, report_progress

ROLE_DESCRIPTIONS = {
    "normal": "normal: what a good product looks like — the model learns from these",
    "test": "test: images to check (labels optional: they let the app measure accuracy)",
    "outlier": "outlier: unrelated images, only used by PANDA-OE",
}
"""Each role an image can have in a project, with the sentence the import form shows for it."""
ROLES = tuple(ROLE_DESCRIPTIONS)
VERDICTS = ("normal", "anomalous", "unsure")
RUN_STATUSES = ("running", "finished", "stopped", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('normal', 'test', 'outlier')),
    name TEXT NOT NULL,
    sha TEXT NOT NULL,
    label INTEGER CHECK (label IN (0, 1)),
    mask_sha TEXT,
    grp TEXT,
    height INTEGER NOT NULL,
    width INTEGER NOT NULL,
    added REAL NOT NULL,
    UNIQUE (project_id, role, name)
);
CREATE INDEX IF NOT EXISTS images_by_project ON images (project_id, role);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    method TEXT NOT NULL,
    settings TEXT NOT NULL,
    path TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    strategy TEXT NOT NULL,
    settings TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'stopped', 'failed')),
    curves TEXT NOT NULL DEFAULT '[]',
    stop_epoch INTEGER,
    model_id INTEGER REFERENCES models(id) ON DELETE SET NULL,
    message TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS annotations (
    image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    verdict TEXT NOT NULL CHECK (verdict IN ('normal', 'anomalous', 'unsure')),
    note TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS scores (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    score REAL NOT NULL,
    PRIMARY KEY (model_id, image_id)
);
CREATE TABLE IF NOT EXISTS preferences (
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (project_id, key)
);
CREATE TABLE IF NOT EXISTS regions (
    image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    drawing TEXT NOT NULL,
    base_mask_sha TEXT,
    base_label INTEGER,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    created: float


@dataclass(frozen=True)
class StoredImage:
    """One image row. ``path``/``mask_path`` point at the content-addressed files."""

    id: int
    project_id: int
    role: str
    name: str
    sha: str
    label: int | None
    mask_sha: str | None
    group: str | None
    height: int
    width: int
    path: Path
    mask_path: Path | None

    def item(self) -> ImageItem:
        """The image as an :class:`ImageItem` reading its workspace files (what detectors take)."""
        return ImageItem(name=self.name, path=str(self.path), label=self.label,
                         mask_path=str(self.mask_path) if self.mask_path else None, group=self.group)


@dataclass(frozen=True)
class StoredModel:
    id: int
    project_id: int
    method: str
    settings: dict[str, Any]
    path: Path
    summary: dict[str, Any]
    created: float

    @property
    def maps_path(self) -> Path:
        """Where a segmentation model's raw test maps are kept (a cache beside the model file)."""
        return self.path.with_name(self.path.stem + ".maps.npz")

    @property
    def title(self) -> str:
        backbone = self.settings.get("features", {}).get("backbone", "")
        return f"#{self.id} {self.method} {backbone}".strip()


@dataclass(frozen=True)
class Run:
    id: int
    project_id: int
    strategy: str
    settings: dict[str, Any]
    status: str
    curves: list[dict[str, Any]]
    stop_epoch: int | None
    model_id: int | None
    message: str
    created: float
    updated: float


@dataclass(frozen=True)
class Annotation:
    image_id: int
    verdict: str
    note: str
    updated: float


@dataclass(frozen=True)
class Region:
    """Regions drawn on one image: ``drawing`` (the editor's shapes, JSON, to edit them later) and
    ``base_mask_sha``: the mask the image had before anything was drawn (imported), which the drawn shapes
    add to (None: there was none); ``base_label``: its label then (restored when the drawing is removed)."""

    image_id: int
    drawing: dict[str, Any]
    base_mask_sha: str | None
    base_label: int | None
    updated: float


@dataclass
class ImportReport:
    """What an import did: rows added, images skipped as duplicates, files refused and why."""

    added: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    duplicate_of: dict[str, str] = field(default_factory=dict)  # skipped name -> the stored image with its bytes
    renamed: dict[str, str] = field(default_factory=dict)  # name asked for -> name given (a different picture had it)


@dataclass(frozen=True)
class ProjectSet:
    """Images of one role as an :class:`ImageSet`, with the row id of each item (same order)."""

    ids: list[int]
    images: ImageSet
    rows: list[StoredImage]

    def __len__(self) -> int:
        return len(self.ids)


class StoreError(RuntimeError):
    """A workspace operation that cannot be done (unknown project, bad verdict, ...)."""


class WorkspaceDatabaseError(StoreError):
    """The workspace database cannot be used: damaged, not a database, read-only, or missing beside
    the images and models of an existing workspace. The message names the file and what to do."""


_SQLITE_HEADER = b"SQLite format 3\x00"
_WHAT_TO_DO = "restore it from a backup, or choose another workspace folder"


def _holds_workspace_files(*folders: Path) -> bool:
    """Whether any of ``folders`` holds a file (stops at the first one: cheap on a large workspace)."""
    for folder in folders:
        for _, _, files in os.walk(folder):
            if files:
                return True
    return False


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either nothing or the whole file (flushed to disk:
    an object file is named by its content and never rewritten, so a torn one would stay torn)."""
    atomic_write(path, lambda stream: stream.write(data))


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels)).save(buffer, "PNG")
    return buffer.getvalue()


def _item_bytes(item: ImageItem) -> bytes:
    """The encoded bytes of an item's image; array items (Fashion-MNIST) are encoded as PNG."""
    if item.data is not None:
        return item.data
    if item.path is not None:
        try:
            return Path(item.path).read_bytes()
        except OSError as error:
            raise ImageError(item.name, f"cannot read file ({error.strerror or error})") from error
    return _png_bytes(item.array)


def _mask_bytes(item: ImageItem) -> bytes | None:
    if item.mask_data is not None:
        return item.mask_data
    if item.mask_path is not None:
        try:
            return Path(item.mask_path).read_bytes()
        except OSError as error:
            raise ImageError(f"{item.name} (mask)", f"cannot read file ({error.strerror or error})") from error
    return None


@dataclass(frozen=True)
class _Prepared:
    item: ImageItem
    sha: str
    height: int
    width: int
    mask_sha: str | None


class Workspace:
    """A workspace folder. Cheap to construct; creates the folder and schema on first use."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_workspace()
        self.objects = self.root / "objects"
        self.models_dir = self.root / "models"
        self.database = self.root / "workspace.sqlite3"
        self.root.mkdir(parents=True, exist_ok=True)
        self.objects.mkdir(exist_ok=True)
        self.models_dir.mkdir(exist_ok=True)
        self._check_database_file()
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)
        self.check()

    def _check_database_file(self) -> None:
        """Refuse a database file that is not SQLite, or an empty/missing one beside an existing workspace's
        files: opening it would start an empty workspace over them, their images and models unreferenced."""
        try:
            with open(self.database, "rb") as stream:
                start = stream.read(len(_SQLITE_HEADER))
        except FileNotFoundError:
            start = b""
        except OSError as error:
            raise WorkspaceDatabaseError(f"{self.database}: the workspace database cannot be read "
                                         f"({error.strerror or error}); {_WHAT_TO_DO}") from None
        if not start and _holds_workspace_files(self.objects, self.models_dir):
            state = "is empty (0 bytes)" if self.database.exists() else "is missing"
            raise WorkspaceDatabaseError(
                f"{self.database}: the workspace database {state}, but {self.root} holds the images and models of "
                f"a workspace; a new database would leave them unlisted: {_WHAT_TO_DO} (an empty folder starts a "
                f"new workspace)")
        if start and start != _SQLITE_HEADER:
            raise WorkspaceDatabaseError(f"{self.database}: not an SQLite database (damaged or replaced); {_WHAT_TO_DO}")

    def check(self, writable: bool = True) -> None:
        """Raise :class:`WorkspaceDatabaseError` unless the database can be read (and, with ``writable``,
        written: that waits for another process's write transaction to end). Cheap: nothing is scanned."""
        with self._connect() as connection:
            connection.execute("SELECT count(*) FROM projects").fetchone()
            if not writable:
                return
            connection.execute("BEGIN IMMEDIATE")
            try:  # a write that changes nothing: refused by a read-only file or folder
                connection.execute("DELETE FROM preferences WHERE 0")
            finally:
                connection.execute("ROLLBACK")

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # Autocommit mode plus explicit BEGIN in _transaction: reads never hold a lock.
        connection = None
        try:
            connection = sqlite3.connect(self.database, timeout=30, isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA foreign_keys=ON")
            yield connection
        except sqlite3.IntegrityError:
            raise  # a constraint: the callers turn it into their own message
        except (sqlite3.DatabaseError, UnicodeDecodeError) as error:
            # Damaged (text that is not UTF-8 included), read-only, locked for too long...: name the file,
            # never a bare sqlite3 traceback.
            raise WorkspaceDatabaseError(f"{self.database}: the workspace database cannot be used ({error}); "
                                         f"{_WHAT_TO_DO}") from error
        finally:
            if connection is not None:
                connection.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it (on any exception)."""
        with self._connect() as connection:
            # IMMEDIATE takes the write lock up front, so two sessions writing at
            # once wait for each other instead of failing half-way.
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def object_path(self, sha: str) -> Path:
        return self.objects / sha[:2] / sha

    def _store_object(self, data: bytes) -> str:
        sha = _sha256(data)
        path = self.object_path(sha)
        if not path.exists():
            _write_atomically(path, data)
        return sha

    # ------------------------------------------------------------------ projects
    def create_project(self, name: str) -> Project:
        name = name.strip()
        if not name:
            raise StoreError("a project needs a name")
        try:
            with self._transaction() as connection:
                cursor = connection.execute("INSERT INTO projects (name, created) VALUES (?, ?)", (name, time.time()))
        except sqlite3.IntegrityError:
            raise StoreError(f"a project named {name!r} already exists") from None
        return Project(cursor.lastrowid, name, time.time())

    def get_or_create_project(self, name: str) -> Project:
        """The project called ``name``, created if missing; safe when two processes ask at once
        (one write transaction: the second finds the first's row instead of failing on the name)."""
        name = name.strip()
        if not name:
            raise StoreError("a project needs a name")
        with self._transaction() as connection:
            connection.execute("INSERT OR IGNORE INTO projects (name, created) VALUES (?, ?)", (name, time.time()))
            row = connection.execute("SELECT id, name, created FROM projects WHERE name = ?", (name,)).fetchone()
        return Project(row["id"], row["name"], row["created"])

    def projects(self) -> list[Project]:
        with self._connect() as connection:
            rows = connection.execute("SELECT id, name, created FROM projects ORDER BY name").fetchall()
        return [Project(row["id"], row["name"], row["created"]) for row in rows]

    def project(self, project_id: int) -> Project:
        with self._connect() as connection:
            row = connection.execute("SELECT id, name, created FROM projects WHERE id = ?", (project_id,)).fetchone()
        if row is None:
            raise StoreError(f"no project with id {project_id}")
        return Project(row["id"], row["name"], row["created"])

    def delete_project(self, project_id: int) -> None:
        model_paths = [model.path for model in self.models(project_id)]
        with self._transaction() as connection:
            connection.execute("DELETE FROM projects WHERE id = ?", (project_id,))
        for path in model_paths:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ images
    def _prepare(self, item: ImageItem) -> _Prepared:
        """Validate one item with a full decode and store its files; raises ImageError."""
        data = _item_bytes(item)
        pixels = decode_image(data, name=item.name)
        mask_sha = None
        mask_data = _mask_bytes(item)
        if mask_data is not None:
            mask = decode_mask(mask_data, name=f"{item.name} (mask)")
            if mask.shape != pixels.shape[:2]:
                raise ImageError(
                    f"{item.name} (mask)",
                    f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {pixels.shape[1]}x{pixels.shape[0]}",
                )
            mask_sha = self._store_object(mask_data)
        sha = self._store_object(data)
        return _Prepared(item, sha, pixels.shape[0], pixels.shape[1], mask_sha)

    def import_images(
        self,
        project_id: int,
        images: ImageSet,
        role: str,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> ImportReport:
        """Add the usable images of ``images`` to a project under ``role`` (see :meth:`import_sets`)."""
        return self.import_sets(project_id, {role: images}, progress, cancel)

    def import_sets(
        self,
        project_id: int,
        sets: dict[str, ImageSet],
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> ImportReport:
        """Add image sets to a project, ``{role: ImageSet}`` (e.g. a data set's normal and test parts), at once.

        Every image is decoded once; the ones that fail are reported in
        ``problems`` (with the readers' own problems) and the rest imported.
        Images whose bytes are already in this project under the same role are
        skipped as duplicates; a different picture under a name already taken
        gets a numbered name. The rows of all sets are inserted in one
        transaction, after all files are written, so a failure or a cancel
        leaves the project as it was: never a normal set without its test set.
        """
        unknown = [role for role in sets if role not in ROLES]
        if unknown:
            raise StoreError(f"role must be one of {ROLES}, not {unknown[0]!r}")
        self.project(project_id)  # fails early for an unknown project
        report = ImportReport(problems=[problem for images in sets.values() for problem in images.problems])
        total = sum(len(images) for images in sets.values())
        prepared: list[tuple[str, _Prepared]] = []
        done = 0
        for role, images in sets.items():
            for item in images.items:
                check_cancel(cancel)
                try:
                    prepared.append((role, self._prepare(item)))
                except ImageError as error:
                    report.problems.append(Problem(error.source, error.reason))
                done += 1
                report_progress(progress, done, total)

        with self._transaction() as connection:
            known: dict[str, tuple[dict[str, str], set[str]]] = {}
            for role in sets:
                existing = connection.execute(
                    "SELECT name, sha FROM images WHERE project_id = ? AND role = ?", (project_id, role)
                ).fetchall()
                known[role] = ({row["sha"]: row["name"] for row in existing}, {row["name"] for row in existing})
            now = time.time()
            for role, entry in prepared:
                known_shas, taken_names = known[role]
                if entry.sha in known_shas:
                    report.duplicates.append(entry.item.name)
                    report.duplicate_of[entry.item.name] = known_shas[entry.sha]
                    continue
                name = _free_name(entry.item.name, taken_names)
                if name != entry.item.name:
                    report.renamed[entry.item.name] = name
                cursor = connection.execute(
                    "INSERT INTO images (project_id, role, name, sha, label, mask_sha, grp, height, width, added)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        project_id, role, name, entry.sha, entry.item.label, entry.mask_sha,
                        entry.item.group, entry.height, entry.width, now,
                    ),
                )
                known_shas[entry.sha] = name
                taken_names.add(name)
                report.added.append(cursor.lastrowid)
        return report

    def _image_from_row(self, row: sqlite3.Row) -> StoredImage:
        return StoredImage(
            id=row["id"],
            project_id=row["project_id"],
            role=row["role"],
            name=row["name"],
            sha=row["sha"],
            label=row["label"],
            mask_sha=row["mask_sha"],
            group=row["grp"],
            height=row["height"],
            width=row["width"],
            path=self.object_path(row["sha"]),
            mask_path=self.object_path(row["mask_sha"]) if row["mask_sha"] else None,
        )

    def images(self, project_id: int, role: str | None = None) -> list[StoredImage]:
        """Image rows of a project (one role, or all), in import order."""
        query = "SELECT * FROM images WHERE project_id = ?"
        params: tuple[Any, ...] = (project_id,)
        if role is not None:
            query += " AND role = ?"
            params += (role,)
        with self._connect() as connection:
            rows = connection.execute(query + " ORDER BY id", params).fetchall()
        return [self._image_from_row(row) for row in rows]

    def image(self, image_id: int) -> StoredImage:
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            raise StoreError(f"no image with id {image_id}")
        return self._image_from_row(row)

    def counts(self, project_id: int) -> dict[str, int]:
        """Number of images per role (every role present, 0 when empty)."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT role, COUNT(*) AS n FROM images WHERE project_id = ? GROUP BY role", (project_id,)
            ).fetchall()
        found = {row["role"]: row["n"] for row in rows}
        return {role: found.get(role, 0) for role in ROLES}

    def image_set(self, project_id: int, role: str) -> ProjectSet:
        """A role's images as an ImageSet reading the workspace files (what detectors take)."""
        rows = self.images(project_id, role)
        items = [row.item() for row in rows]
        project = self.project(project_id)
        return ProjectSet([row.id for row in rows], ImageSet(items, name=f"{project.name}/{role}"), rows)

    def remove_images(self, image_ids: Sequence[int]) -> int:
        """Delete image rows (their annotations and scores go with them); returns how many."""
        ids = [int(i) for i in image_ids]
        if not ids:
            return 0
        with self._transaction() as connection:
            cursor = connection.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids])
        return cursor.rowcount if cursor.rowcount >= 0 else len(ids)

    def add_to_normal_set(self, image_ids: Sequence[int]) -> list[int]:
        """Copy images (e.g. test images confirmed normal) into their project's normal set.

        The files are shared (same sha); images already in the normal set are
        skipped. Returns the new row ids.
        """
        added: list[int] = []
        with self._transaction() as connection:
            for image_id in image_ids:
                row = connection.execute("SELECT * FROM images WHERE id = ?", (int(image_id),)).fetchone()
                if row is None:
                    raise StoreError(f"no image with id {image_id}")
                existing = connection.execute(
                    "SELECT name FROM images WHERE project_id = ? AND role = 'normal'", (row["project_id"],)
                ).fetchall()
                shas = connection.execute(
                    "SELECT 1 FROM images WHERE project_id = ? AND role = 'normal' AND sha = ?",
                    (row["project_id"], row["sha"]),
                ).fetchone()
                if shas is not None:
                    continue
                name = _free_name(f"confirmed/{row['name']}", {r["name"] for r in existing})
                cursor = connection.execute(
                    "INSERT INTO images (project_id, role, name, sha, label, mask_sha, grp, height, width, added)"
                    " VALUES (?, 'normal', ?, ?, 0, NULL, ?, ?, ?, ?)",
                    (row["project_id"], name, row["sha"], row["grp"], row["height"], row["width"], time.time()),
                )
                added.append(cursor.lastrowid)
        return added

    def collect_garbage(self) -> int:
        """Delete object files no image row refers to (left by failed imports or removals)."""
        with self._connect() as connection:
            used = {row[0] for row in connection.execute(
                "SELECT sha FROM images UNION SELECT mask_sha FROM images UNION SELECT base_mask_sha FROM regions")}
        removed = 0
        for path in self.objects.glob("*/*"):
            if path.name.startswith(".tmp-") or path.name not in used:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # ------------------------------------------------------------------ models and scores
    def add_model(self, project_id: int, method: str, settings: dict[str, Any], detector: Any,
                  summary: dict[str, Any] | None = None) -> StoredModel:
        """Save a fitted detector (``detector.save``) and record it; the file is written first."""
        path = self.models_dir / f"{uuid.uuid4().hex}.npz"
        path = Path(detector.save(path))
        try:
            with self._transaction() as connection:
                cursor = connection.execute(
                    "INSERT INTO models (project_id, method, settings, path, summary, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (project_id, method, json.dumps(settings), path.name, json.dumps(summary or {}), time.time()),
                )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return self.model(cursor.lastrowid)

    def _model_from_row(self, row: sqlite3.Row) -> StoredModel:
        return StoredModel(
            id=row["id"],
            project_id=row["project_id"],
            method=row["method"],
            settings=json.loads(row["settings"]),
            path=self.models_dir / row["path"],
            summary=json.loads(row["summary"]),
            created=row["created"],
        )

    def model(self, model_id: int) -> StoredModel:
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
        if row is None:
            raise StoreError(f"no model with id {model_id}")
        return self._model_from_row(row)

    def models(self, project_id: int, method: str | None = None) -> list[StoredModel]:
        """A project's models, newest first."""
        query, params = "SELECT * FROM models WHERE project_id = ?", [project_id]
        if method is not None:
            query += " AND method = ?"
            params.append(method)
        with self._connect() as connection:
            rows = connection.execute(query + " ORDER BY id DESC", params).fetchall()
        return [self._model_from_row(row) for row in rows]

    def update_model_summary(self, model_id: int, **values: Any) -> None:
        with self._transaction() as connection:
            row = connection.execute("SELECT summary FROM models WHERE id = ?", (model_id,)).fetchone()
            if row is None:
                raise StoreError(f"no model with id {model_id}")
            summary = {**json.loads(row["summary"]), **values}
            connection.execute("UPDATE models SET summary = ? WHERE id = ?", (json.dumps(summary), model_id))

    def delete_model(self, model_id: int) -> None:
        model = self.model(model_id)
        with self._transaction() as connection:
            connection.execute("DELETE FROM models WHERE id = ?", (model_id,))
        model.path.unlink(missing_ok=True)
        model.maps_path.unlink(missing_ok=True)

    def save_scores(self, model_id: int, image_ids: Sequence[int], scores: Sequence[float]) -> None:
        if len(image_ids) != len(scores):
            raise ValueError(f"{len(image_ids)} image ids but {len(scores)} scores")
        with self._transaction() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO scores (model_id, image_id, score) VALUES (?, ?, ?)",
                [(model_id, int(i), float(s)) for i, s in zip(image_ids, scores)],
            )

    def scores(self, model_id: int) -> dict[int, float]:
        """image id -> score of one model."""
        with self._connect() as connection:
            rows = connection.execute("SELECT image_id, score FROM scores WHERE model_id = ?", (model_id,)).fetchall()
        return {row["image_id"]: row["score"] for row in rows}

    # ------------------------------------------------------------------ training runs
    def create_run(self, project_id: int, strategy: str, settings: dict[str, Any]) -> int:
        now = time.time()
        with self._transaction() as connection:
            cursor = connection.execute(
                "INSERT INTO runs (project_id, strategy, settings, status, created, updated) VALUES (?, ?, ?, 'running', ?, ?)",
                (project_id, strategy, json.dumps(settings), now, now),
            )
        return cursor.lastrowid

    def append_epoch(self, run_id: int, record: dict[str, Any]) -> None:
        """Add one epoch's numbers to a run's curves (called as each epoch ends)."""
        with self._transaction() as connection:
            row = connection.execute("SELECT curves FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise StoreError(f"no run with id {run_id}")
            curves = json.loads(row["curves"]) + [record]
            connection.execute(
                "UPDATE runs SET curves = ?, updated = ? WHERE id = ?", (json.dumps(curves), time.time(), run_id)
            )

    def finish_run(self, run_id: int, status: str, stop_epoch: int | None = None,
                   model_id: int | None = None, message: str = "") -> None:
        if status not in RUN_STATUSES:
            raise StoreError(f"run status must be one of {RUN_STATUSES}, not {status!r}")
        with self._transaction() as connection:
            connection.execute(
                "UPDATE runs SET status = ?, stop_epoch = ?, model_id = ?, message = ?, updated = ? WHERE id = ?",
                (status, stop_epoch, model_id, message, time.time(), run_id),
            )

    def _run_from_row(self, row: sqlite3.Row) -> Run:
        return Run(
            id=row["id"],
            project_id=row["project_id"],
            strategy=row["strategy"],
            settings=json.loads(row["settings"]),
            status=row["status"],
            curves=json.loads(row["curves"]),
            stop_epoch=row["stop_epoch"],
            model_id=row["model_id"],
            message=row["message"],
            created=row["created"],
            updated=row["updated"],
        )

    def run(self, run_id: int) -> Run:
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run with id {run_id}")
        return self._run_from_row(row)

    def runs(self, project_id: int) -> list[Run]:
        """A project's training runs, newest first."""
        with self._connect() as connection:
            rows = connection.execute("SELECT * FROM runs WHERE project_id = ? ORDER BY id DESC", (project_id,)).fetchall()
        return [self._run_from_row(row) for row in rows]

    def mark_abandoned_runs(self, started_before: float) -> int:
        """Runs still 'running' that began before ``started_before`` (this process's start) become 'stopped'.

        Only a process that was stopped can leave such runs; runs started by
        the current process are left alone, whichever session started them.
        """
        with self._transaction() as connection:
            cursor = connection.execute(
                "UPDATE runs SET status = 'stopped', message = 'interrupted: the app stopped during training'"
                " WHERE status = 'running' AND created < ?",
                (started_before,),
            )
        return cursor.rowcount

    # ------------------------------------------------------------------ annotations
    def annotate(self, image_id: int, verdict: str, note: str = "") -> Annotation:
        """Record (or replace) the reviewer's verdict on one image, committed at once."""
        if verdict not in VERDICTS:
            raise StoreError(f"verdict must be one of {VERDICTS}, not {verdict!r}")
        now = time.time()
        try:
            with self._transaction() as connection:
                connection.execute(
                    "INSERT INTO annotations (image_id, verdict, note, updated) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (image_id) DO UPDATE SET verdict = excluded.verdict, note = excluded.note,"
                    " updated = excluded.updated",
                    (image_id, verdict, note, now),
                )
        except sqlite3.IntegrityError:
            raise StoreError(f"no image with id {image_id}") from None
        return Annotation(image_id, verdict, note, now)

    def clear_annotation(self, image_id: int) -> None:
        with self._transaction() as connection:
            connection.execute("DELETE FROM annotations WHERE image_id = ?", (image_id,))

    def annotations(self, project_id: int) -> dict[int, Annotation]:
        """image id -> annotation, for every annotated image of a project."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT a.* FROM annotations a JOIN images i ON i.id = a.image_id WHERE i.project_id = ?",
                (project_id,),
            ).fetchall()
        return {row["image_id"]: Annotation(row["image_id"], row["verdict"], row["note"], row["updated"]) for row in rows}

    def _annotation_records(self, project_id: int) -> list[dict[str, Any]]:
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT i.id, i.name, i.role, i.label, i.grp, i.sha, a.verdict, a.note, a.updated"
                " FROM annotations a JOIN images i ON i.id = a.image_id WHERE i.project_id = ? ORDER BY i.id",
                (project_id,),
            ).fetchall()
        return [
            {
                "image_id": row["id"],
                "name": row["name"],
                "role": row["role"],
                "label": row["label"],
                "group": row["grp"],
                "sha256": row["sha"],
                "verdict": row["verdict"],
                "note": row["note"],
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["updated"])),
            }
            for row in rows
        ]

    def export_annotations_json(self, project_id: int) -> str:
        project = self.project(project_id)
        return json.dumps({"project": project.name, "annotations": self._annotation_records(project_id)}, indent=2)

    def export_annotations_csv(self, project_id: int) -> str:
        columns = ["image_id", "name", "role", "label", "group", "sha256", "verdict", "note", "updated"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for record in self._annotation_records(project_id):
            writer.writerow({key: "" if value is None else value for key, value in record.items()})
        return buffer.getvalue()

    # ------------------------------------------------------------------ regions drawn on test images
    def set_drawn_mask(self, image_id: int, mask_png: bytes, drawing: dict[str, Any]) -> StoredImage:
        """Store the mask drawn on a test image (PNG bytes, content-addressed like imported masks) and the shapes
        it was drawn from (``drawing``, kept to edit them later); the image becomes anomalous.

        Marking a region is a verdict: the label becomes 1 and the annotation "anomalous" (its note kept). The
        first drawing on an image records the mask and label it had (an imported mask, say) as its base, which
        :meth:`remove_drawn_mask` restores. The mask must have the image's own size. One transaction.
        """
        image = self.image(image_id)
        if image.role != "test":
            raise StoreError(f"{image.name}: only test images can be marked (this one is in the {image.role} set)")
        mask = decode_mask(mask_png, name=f"{image.name} (drawn mask)")
        if mask.shape != (image.height, image.width):
            raise StoreError(f"{image.name}: the drawn mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                             f"{image.width}x{image.height}")
        sha = self._store_object(mask_png)
        now = time.time()
        with self._transaction() as connection:
            connection.execute(
                "INSERT INTO regions (image_id, drawing, base_mask_sha, base_label, updated) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (image_id) DO UPDATE SET drawing = excluded.drawing, updated = excluded.updated",
                (image_id, json.dumps(drawing), image.mask_sha, image.label, now),
            )
            connection.execute("UPDATE images SET mask_sha = ?, label = 1 WHERE id = ?", (sha, image_id))
            connection.execute(
                "INSERT INTO annotations (image_id, verdict, note, updated) VALUES (?, 'anomalous', '', ?)"
                " ON CONFLICT (image_id) DO UPDATE SET verdict = 'anomalous', updated = excluded.updated",
                (image_id, now),
            )
        return self.image(image_id)

    def remove_drawn_mask(self, image_id: int) -> StoredImage:
        """Forget what was drawn on an image: its mask and label become what they were before (the base)."""
        with self._transaction() as connection:
            row = connection.execute("SELECT * FROM regions WHERE image_id = ?", (image_id,)).fetchone()
            if row is not None:
                connection.execute("UPDATE images SET mask_sha = ?, label = ? WHERE id = ?",
                                   (row["base_mask_sha"], row["base_label"], image_id))
                connection.execute("DELETE FROM regions WHERE image_id = ?", (image_id,))
        return self.image(image_id)

    def region(self, image_id: int) -> Region | None:
        """What was drawn on an image (None: nothing)."""
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM regions WHERE image_id = ?", (image_id,)).fetchone()
        if row is None:
            return None
        return Region(row["image_id"], json.loads(row["drawing"]), row["base_mask_sha"], row["base_label"],
                      row["updated"])

    def drawn_images(self, project_id: int) -> set[int]:
        """Ids of a project's images that carry a drawn region."""
        with self._connect() as connection:
            rows = connection.execute("SELECT r.image_id FROM regions r JOIN images i ON i.id = r.image_id"
                                      " WHERE i.project_id = ?", (project_id,)).fetchall()
        return {row["image_id"] for row in rows}

    # ------------------------------------------------------------------ workspace settings
    def set_setting(self, key: str, value: Any) -> None:
        """Remember a small JSON-able value for the whole workspace (e.g. the folders the user allowed)."""
        with self._transaction() as connection:
            connection.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def setting(self, key: str, default: Any = None) -> Any:
        with self._connect() as connection:
            row = connection.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    # ------------------------------------------------------------------ per-project preferences
    def set_preference(self, project_id: int, key: str, value: Any) -> None:
        """Remember a small JSON-able value (e.g. the review position) across restarts."""
        with self._transaction() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO preferences (project_id, key, value) VALUES (?, ?, ?)",
                (project_id, key, json.dumps(value)),
            )

    def preference(self, project_id: int, key: str, default: Any = None) -> Any:
        with self._connect() as connection:
            row = connection.execute(
                "SELECT value FROM preferences WHERE project_id = ? AND key = ?", (project_id, key)
            ).fetchone()
        return default if row is None else json.loads(row["value"])


def image_set_from_uploads(files: Sequence[tuple[str, bytes]], label: int | None = None,
                           name: str = "upload") -> ImageSet:
    """Uploaded files (name, bytes) as one ImageSet, every image with ``label``: zips opened, paths kept.

    See :func:`core.datasets.uploads.plan_upload` (the Data page uses it
    directly, to label per folder): nothing is decoded here; a file with the
    same bytes as an earlier one is reported as a duplicate; a different
    picture under a name already used gets a numbered name, never dropped.
    """
    plan = plan_upload(files)
    problems = list(plan.problems)
    problems.extend(Problem(duplicate.name, f"same bytes as {duplicate.same_as}; skipped as a duplicate")
                    for duplicate in plan.duplicates)
    items = [replace(item, label=label) for item in plan.items]
    return ImageSet(items, problems, name=name)


def _free_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name (2)``, ``name (3)``... whichever is not taken yet."""
    if name not in taken:
        return name
    stem, dot, extension = name.rpartition(".")
    if not dot or "/" in extension:
        stem, extension = name, ""
    number = 2
    while True:
        candidate = f"{stem} ({number}).{extension}" if extension else f"{stem} ({number})"
        if candidate not in taken:
            return candidate
        number += 1
