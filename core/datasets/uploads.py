"""Uploaded files (from a browser: single files, whole folders, zips) as image sets, without losing any.

A browser sends single files by base name only but folders with their
relative paths (``bottle/test/broken_large/000.png``), and zips carry their
member paths. :func:`plan_upload` keeps those paths, so MVTec's many
``000.png`` stay apart; it groups the images by folder so the user can say
per folder what they are (``good`` defaults to normal, any other folder to
anomalous); pairs MVTec masks (``ground_truth/<defect>/<name>_mask.png`` with
``test/<defect>/<name>.*``); reports files with the same bytes as a
duplicate of the first; and gives a file whose name is taken by a different
picture a numbered name instead of dropping it.

Nothing is decoded here (``Workspace.import_sets`` does a full decode).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath

from core.datasets._scan import IMAGE_EXTENSIONS, _is_ignored
from core.datasets.archives import read_zip
from core.datasets.image_set import LABELS, ImageItem, ImageSet, Problem

# What a folder's images become: (role, label). "skip" leaves them out.
KINDS: dict[str, tuple[str, int | None] | None] = {
    "normal": ("normal", 0),
    "test: normal": ("test", 0),
    "test: anomalous": ("test", 1),
    "test: unlabelled": ("test", None),
    "outlier": ("outlier", None),
    "skip": None,
}
MASK_FOLDER = "ground_truth"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class Duplicate:
    """``name`` has the same bytes as ``same_as`` (earlier in the upload) and was left out."""

    name: str
    same_as: str


@dataclass
class UploadPlan:
    """What an upload holds, before the user says what each folder is.

    Attributes:
        items: one item per distinct image, ``name`` = its relative path (or a
            numbered name after a collision), ``group`` = its folder (None for
            loose files), masks paired; labels are set by :meth:`sets`.
        problems: files that cannot be used, and why.
        duplicates: files whose bytes equal an earlier file's.
        renamed: ``(original name, name given)`` for names already taken by a different picture.
        masks: how many masks were paired with an image.
    """

    items: list[ImageItem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    masks: int = 0

    @property
    def folders(self) -> dict[str | None, int]:
        """folder -> number of images in it (None: loose files), in first-seen order."""
        counts: dict[str | None, int] = {}
        for item in self.items:
            counts[item.group] = counts.get(item.group, 0) + 1
        return counts

    def sets(self, kinds: dict[str | None, str]) -> dict[str, ImageSet]:
        """``{role: ImageSet}`` once every folder has a kind (a key of :data:`KINDS`)."""
        by_role: dict[str, list[ImageItem]] = {}
        for item in self.items:
            kind = kinds.get(item.group)
            if kind not in KINDS:
                raise ValueError(f"folder {item.group or '(no folder)'}: unknown kind {kind!r}")
            target = KINDS[kind]
            if target is None:
                continue
            role, label = target
            # Masks only mean something on test images; a normal image's mask would be a contradiction.
            chosen = replace(item, label=label)
            by_role.setdefault(role, []).append(chosen if role == "test" else chosen.without_mask())
        return {role: ImageSet(items, name=f"upload/{role}") for role, items in by_role.items()}


def default_kind(folder: str | None, loose_role: str = "normal", loose_label: int | None = None) -> str:
    """The kind a folder's images get unless the user changes it.

    MVTec layout first: under ``train/`` -> normal; under ``test/`` -> test,
    normal when the folder is ``good``, else anomalous. Other folders keep
    the role the user picked for the upload, labelled from the folder name
    when that role is test. Loose files (no folder) take the role and label
    the user picked.
    """
    if folder is None:
        if loose_role == "test":
            return f"test: {LABELS.get(loose_label, 'unlabelled')}"
        return loose_role
    parts = PurePosixPath(folder).parts
    if "train" in parts:
        return "normal"
    if "test" in parts or loose_role == "test":
        return "test: normal" if parts[-1] == "good" else "test: anomalous"
    return loose_role


def _mask_key(relative: str) -> tuple[str, str, str] | None:
    """``(root, defect, stem)`` of ``<root>/ground_truth/<defect>/<stem>_mask.png``, else None."""
    parts = PurePosixPath(relative).parts
    if len(parts) < 3 or parts[-3] != MASK_FOLDER:
        return None
    stem = PurePosixPath(parts[-1]).stem
    if not stem.endswith(MASK_SUFFIX):
        return None
    return "/".join(parts[:-3]), parts[-2], stem[: -len(MASK_SUFFIX)]


def _image_key(relative: str) -> tuple[str, str, str] | None:
    """``(root, defect, stem)`` of ``<root>/test/<defect>/<stem>.<ext>``, else None."""
    parts = PurePosixPath(relative).parts
    if len(parts) < 3 or parts[-3] != "test":
        return None
    return "/".join(parts[:-3]), parts[-2], PurePosixPath(parts[-1]).stem


def _free_name(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    path = PurePosixPath(name)
    number = 2
    while True:
        candidate = str(path.with_name(f"{path.stem} ({number}){path.suffix}"))
        if candidate not in taken:
            return candidate
        number += 1


def _flatten(files: Sequence[tuple[str, bytes]], problems: list[Problem]) -> list[tuple[str, bytes]]:
    """Every image file of the upload as (relative path, bytes): zips opened, paths normalised."""
    found: list[tuple[str, bytes]] = []
    for file_name, data in files:
        relative = "/".join(part for part in file_name.replace("\\", "/").split("/") if part not in ("", "."))
        parts = relative.split("/")
        if not relative or any(_is_ignored(part) for part in parts):
            continue  # .DS_Store, __MACOSX and the like: never worth a word
        if ".." in parts:
            problems.append(Problem(file_name, "unsafe path (contains '..'); skipped"))
            continue
        extension = PurePosixPath(relative).suffix.lower()
        if extension == ".zip":
            try:
                archive = read_zip(data, name=relative)
            except ValueError as error:
                problems.append(Problem(relative, str(error).removeprefix(f"{relative}: ")))
                continue
            # Problems name the archive itself, so the user knows which upload to fix.
            problems.extend(Problem(f"{relative}/{problem.source}", problem.reason) for problem in archive.problems)
            stem = str(PurePosixPath(relative).with_suffix(""))
            found.extend((f"{stem}/{item.name}", item.data) for item in archive.items if item.data is not None)
        elif extension in IMAGE_EXTENSIONS:
            found.append((relative, data))
        else:
            problems.append(Problem(relative, f"not an image or zip file ({extension or 'no extension'}); skipped"))
    return found


def plan_upload(files: Sequence[tuple[str, bytes]]) -> UploadPlan:
    """Sort uploaded ``(name, bytes)`` files into images (with paired masks), duplicates and problems.

    ``name`` may hold a relative path (folder uploads) and may be a zip,
    whose members are named ``<zip name without .zip>/<member path>``.
    """
    plan = UploadPlan()
    entries = _flatten(files, plan.problems)
    masks: dict[tuple[str, str, str], tuple[str, bytes]] = {}
    images: list[tuple[str, bytes]] = []
    for relative, data in entries:
        key = _mask_key(relative)
        if key is not None:
            masks[key] = (relative, data)
        else:
            images.append((relative, data))

    # Of files with equal bytes the first by name is kept: a browser sends a folder's files in no fixed
    # order, and which one counts as the duplicate must not depend on it.
    shas = [hashlib.sha256(data).hexdigest() for _, data in images]
    keeper: dict[str, int] = {}
    for index, ((relative, _), sha) in enumerate(zip(images, shas)):
        if sha not in keeper or relative < images[keeper[sha]][0]:
            keeper[sha] = index
    taken: set[str] = set()
    used_masks: set[tuple[str, str, str]] = set()
    for index, ((relative, data), sha) in enumerate(zip(images, shas)):
        if keeper[sha] != index:
            plan.duplicates.append(Duplicate(relative, images[keeper[sha]][0]))
            continue
        name = _free_name(relative, taken)
        if name != relative:
            plan.renamed.append((relative, name))
        taken.add(name)
        key = _image_key(relative)
        mask = masks.get(key) if key is not None and key[1] != "good" else None
        if mask is not None:
            used_masks.add(key)
            plan.masks += 1
        parent = PurePosixPath(relative).parent.as_posix()
        plan.items.append(ImageItem(name=name, data=data, mask_data=mask[1] if mask else None,
                                    group=None if parent == "." else parent))
    for key, (relative, _) in masks.items():
        if key not in used_masks:
            plan.problems.append(Problem(relative, "mask without a matching test/<defect>/<name> image; skipped"))
    return plan
