"""A project's annotated set out as an MVTec AD zip (anomalib reads it), and such a zip in.

What goes out: the normal images, the test images with their labels, and
every mask (imported or drawn) in the layout :mod:`core.datasets.mvtec_zip`
describes; outlier images stay behind. What comes in: the same images,
labels and masks, pixel for pixel (a mask's PNG keeps its bytes).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from core.datasets.mvtec_zip import EXTRA_ANOMALOUS, EXTRA_UNLABELLED, MvtecEntry, as_png, read_mvtec_zip, write_mvtec_zip
from core.store import ImportReport, StoredImage, Workspace

MARKED_FOLDER = "marked"
"""Defect folder of an image marked anomalous that has no defect type of its own (e.g. a drawn region)."""


def _defect(image: StoredImage) -> str:
    """The defect-type folder of an anomalous test image: its group's last part, unless that says "good"."""
    group = PurePosixPath(image.group).name if image.group else ""
    return group if group and group != "good" else MARKED_FOLDER


def _folder(image: StoredImage) -> str:
    if image.role == "normal":
        return "train/good"
    if image.label == 0:
        return "test/good"
    if image.label == 1:
        return f"test/{_defect(image)}" if image.mask_path is not None else f"{EXTRA_ANOMALOUS}/{_defect(image)}"
    return EXTRA_UNLABELLED


def category_name(project_name: str) -> str:
    """A folder name for the zip's top folder: the project's name with anything unusual made an underscore."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", project_name).strip("._") or "project"


def export_annotated(workspace: Workspace, project_id: int) -> bytes:
    """The project's normal and test images, labels and masks as an MVTec AD zip (``<category>/train/good``...)."""
    entries = []
    for role in ("normal", "test"):
        for image in workspace.images(project_id, role):
            data = image.path.read_bytes()
            mask = image.mask_path.read_bytes() if image.mask_path is not None and image.label == 1 else None
            entries.append(MvtecEntry(_folder(image), PurePosixPath(image.name).stem, as_png(data, image.name),
                                      as_png(mask, f"{image.name} (mask)") if mask is not None else None))
    return write_mvtec_zip(entries, category_name(workspace.project(project_id).name))


def import_annotated(workspace: Workspace, project_id: int, data: bytes, name: str = "annotated.zip") -> ImportReport:
    """Import an MVTec AD zip (as :func:`export_annotated` writes it, or a category zipped): normal images,
    test images with their labels and masks. The report lists what was refused and why."""
    sets, problems = read_mvtec_zip(data, name)
    report = workspace.import_sets(project_id, sets) if sets else ImportReport()
    report.problems[:0] = problems
    return report
