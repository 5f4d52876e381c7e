"""Images into a project: a folder in a known layout, Fashion-MNIST, a browser upload.

The Data page, the one-click demos and any script import through these, so
each layout is read one way. Every call returns the store's
:class:`~core.store.ImportReport` (what was added, skipped as a duplicate,
renamed or refused, and why).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from core.datasets import (
    UploadPlan,
    read_class_folders,
    read_fashion_mnist,
    read_folder,
    read_mvtec,
)
from core.store import ImportReport, Workspace

LAYOUTS = {
    "mvtec": "MVTec AD category (train/good, test/<type>, ground_truth/)",
    "classes": "One folder per class (one class is normal, the others anomalies)",
    "plain": "Plain folder of images",
}
"""Folder layouts :func:`import_folder` reads, name -> what it looks like."""


def import_folder(workspace: Workspace, project_id: int, folder: str | os.PathLike, layout: str,
                  normal_class: str | None = None, role: str = "normal",
                  roots: Sequence[Path] | None = None) -> ImportReport:
    """Import a folder: an MVTec category or class folders (normal and test sets), or a plain folder as ``role``.

    ``normal_class``: with ``layout="classes"``, the class that is normal
    (the others are anomalies). A plain folder's images are labelled normal
    when ``role`` is "normal", else unlabelled. ``roots``: the folders the
    app may read (``core.paths.folder_roots``): a file inside ``folder``
    that links outside them is skipped and reported, not imported.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if layout == "plain":
        return workspace.import_images(
            project_id, read_folder(folder, label=0 if role == "normal" else None, roots=roots), role)
    if layout == "mvtec":
        train, test = read_mvtec(folder, roots=roots)
    else:
        if normal_class is None:
            raise ValueError("pick the normal class first")
        train, test = read_class_folders(folder, normal_class, roots=roots)
    return workspace.import_sets(project_id, {"normal": train, "test": test})


def import_fashion_mnist(workspace: Workspace, project_id: int, normal_class: str, max_train: int,
                         max_test: int) -> ImportReport:
    """Fashion-MNIST's one-class protocol: ``max_train`` images of ``normal_class``, ``max_test`` of all ten."""
    train, test = read_fashion_mnist(normal_class=normal_class, max_train=max_train, max_test=max_test)
    return workspace.import_sets(project_id, {"normal": train, "test": test})


def import_upload(workspace: Workspace, project_id: int, plan: UploadPlan,
                  kinds: dict[str | None, str]) -> ImportReport:
    """Import an upload once each folder has a kind (``{folder: kind}``, see ``core.datasets.KINDS``).

    The report also lists what the plan itself left out: unusable files,
    files with the same bytes as another in the upload, names given anew.
    """
    sets = plan.sets(kinds)
    report = workspace.import_sets(project_id, sets) if sets else ImportReport()
    report.problems[:0] = plan.problems
    for duplicate in plan.duplicates:
        report.duplicates.append(duplicate.name)
        report.duplicate_of[duplicate.name] = f"{duplicate.same_as} (same upload)"
    report.renamed.update(dict(plan.renamed))
    return report
