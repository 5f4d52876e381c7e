"""Image sets and the readers that build them from folders, archives and IDX files.

One job per module:

* ``image_set``: :class:`ImageItem`, :class:`ImageSet` and :class:`Problem`
  (readers skip a bad file and report why, never abort);
* ``folders``: a plain folder of images, and one folder per class;
* ``mvtec``: one MVTec AD category;
* ``fashion_mnist``: Fashion-MNIST IDX files, and stratified subsampling;
* ``archives``: zip archives, read into memory;
* ``uploads``: browser uploads (files, folders, zips) sorted by folder, masks paired, nothing lost;
* ``_scan`` (file-name rules, folder walk) and ``_parallel`` (ordered
  background decoding) are shared helpers.

Import from ``core.datasets``; the names below are its public surface.
"""

from __future__ import annotations

from core.datasets._scan import IMAGE_EXTENSIONS
from core.datasets.archives import MAX_ZIP_MEMBER_BYTES, MAX_ZIP_MEMBERS, MAX_ZIP_TOTAL_BYTES, read_zip
from core.datasets.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    read_fashion_mnist,
    read_idx,
    stratified_positions,
)
from core.datasets.folders import list_classes, read_class_folders, read_folder
from core.datasets.image_set import LABELS, ImageItem, ImageSet, Problem
from core.datasets.mvtec import read_mvtec
from core.datasets.uploads import KINDS, Duplicate, UploadPlan, default_kind, plan_upload

# Cancelled is re-exported so callers of this module can catch it without a second import.
from core.progress import Cancelled

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "LABELS",
    "MAX_ZIP_MEMBERS",
    "MAX_ZIP_MEMBER_BYTES",
    "MAX_ZIP_TOTAL_BYTES",
    "Cancelled",
    "Duplicate",
    "ImageItem",
    "ImageSet",
    "Problem",
    "UploadPlan",
    "default_kind",
    "list_classes",
    "plan_upload",
    "read_class_folders",
    "read_fashion_mnist",
    "read_folder",
    "read_idx",
    "read_mvtec",
    "read_zip",
    "stratified_positions",
]
