"""An annotated set as a zip in the MVTec AD layout, and back.

Layout written by :func:`write_mvtec_zip` (under one top folder, the
category's name, so that unpacking it gives ``<root>/<category>/...`` as
anomalib's MVTec reader expects)::

    train/good/<name>.png                 normal images
    test/good/<name>.png                  test images labelled normal
    test/<defect>/<name>.png              test images labelled anomalous, with a mask
    ground_truth/<defect>/<name>_mask.png their masks (8-bit, 0 and 255)
    extra/anomalous/<defect>/<name>.png   labelled anomalous but not marked (no mask): outside test/, since
                                          MVTec's layout pairs every defect image with a mask
    extra/unlabelled/<name>.png           test images without a label

Images are PNG, as MVTec's are: a PNG file is written as it is stored, any
other format is re-encoded losslessly from its decoded pixels. Masks keep
their bytes. :func:`read_mvtec_zip` reads such a zip back (any top folder)
into the sets a project imports.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from core.datasets.archives import read_zip
from core.datasets.image_set import ImageSet, Problem
from core.datasets.uploads import default_kind, plan_upload

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXTRA_ANOMALOUS = "extra/anomalous"
EXTRA_UNLABELLED = "extra/unlabelled"


@dataclass(frozen=True)
class MvtecEntry:
    """One image of the set: its ``folder`` in the layout (``train/good``, ``test/<defect>``, ...), its file
    ``stem``, its encoded ``image`` bytes and, for a marked defect, its ``mask`` bytes (PNG)."""

    folder: str
    stem: str
    image: bytes
    mask: bytes | None = None


def as_png(data: bytes, name: str) -> bytes:
    """``data`` when it is a PNG file, else the decoded picture (RGB) encoded as PNG: same pixels."""
    if data.startswith(PNG_SIGNATURE):
        return data
    from PIL import Image

    from core.images import decode_image

    buffer = io.BytesIO()
    Image.fromarray(decode_image(data, name=name)).save(buffer, "PNG")
    return buffer.getvalue()


def write_mvtec_zip(entries: Sequence[MvtecEntry], category: str) -> bytes:
    """The entries as a zip under ``<category>/``; stems are made unique per folder (``name_2``...)."""
    buffer = io.BytesIO()
    taken: set[str] = set()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry in entries:
            stem, number = entry.stem, 2
            while f"{entry.folder}/{stem}" in taken:
                stem, number = f"{entry.stem}_{number}", number + 1
            taken.add(f"{entry.folder}/{stem}")
            archive.writestr(f"{category}/{entry.folder}/{stem}.png", entry.image)
            if entry.mask is not None:
                defect = PurePosixPath(entry.folder).name
                archive.writestr(f"{category}/ground_truth/{defect}/{stem}_mask.png", entry.mask)
    return buffer.getvalue()


def _kind(folder: str | None) -> str:
    """What a folder of such a zip holds (a key of ``KINDS``)."""
    if folder is not None and folder.startswith(EXTRA_ANOMALOUS):
        return "test: anomalous"
    if folder is not None and folder.startswith(EXTRA_UNLABELLED):
        return "test: unlabelled"
    return default_kind(folder, loose_role="test")


def read_mvtec_zip(data: bytes, name: str = "annotated.zip") -> tuple[dict[str, ImageSet], list[Problem]]:
    """A zip in the layout above (or any MVTec AD category zipped) -> ``{role: ImageSet}`` and the problems.

    The top folder (the category) is dropped from the names, so the images
    come back as ``train/good/000.png``, ``test/broken/001.png``; ``group`` is
    the defect type (``good`` for normal images), as :func:`~core.datasets.read_mvtec`
    gives it. Raises ValueError when ``data`` is no zip or holds no image.
    """
    archive = read_zip(data, name=name)
    tops = {PurePosixPath(item.name).parts[0] for item in archive.items}
    strip = len(tops) == 1 and all(len(PurePosixPath(item.name).parts) > 1 for item in archive.items)
    files = [("/".join(PurePosixPath(item.name).parts[1:]) if strip else item.name, item.data)
             for item in archive.items if item.data is not None]
    plan = plan_upload(files)
    sets = plan.sets({folder: _kind(folder) for folder in plan.folders})
    problems = list(archive.problems) + list(plan.problems)
    problems += [Problem(duplicate.name, f"same bytes as {duplicate.same_as}; skipped as a duplicate")
                 for duplicate in plan.duplicates]
    named = {}
    for role, images in sets.items():
        items = [replace(item, group=PurePosixPath(item.group).name if item.group else None) for item in images]
        named[role] = ImageSet(items, name=f"{PurePosixPath(name).stem}/{role}")
    return named, problems
