"""Make ``import torchvision`` (and ``timm``) work on a CPU-only torch.

The only torchvision wheel for torch 2.13 is a CUDA build. On a CPU torch its
compiled extension fails to load, and torchvision's Python side then registers
fake kernels for ``torchvision::nms``/``qnms`` whose *schemas* do not exist,
which raises at import time. Defining the two schemas first lets the import go
through; the ops themselves stay unusable (this project never calls them).

On a normal install, where the extension loads, this module does nothing.
"""

from __future__ import annotations

import importlib.util

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# Kept at module level: a torch.library.Library drops its definitions when collected.
_library: torch.library.Library | None = None


def _schema_exists(op_name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{op_name}", "")
        return True
    except RuntimeError:
        return False


def ensure_torchvision_importable() -> None:
    """Define the missing ``torchvision::nms``/``qnms`` schemas when needed. Idempotent."""
    global _library
    if _library is not None or importlib.util.find_spec("torchvision") is None:
        return
    missing = {name: schema for name, schema in _SCHEMAS.items() if not _schema_exists(name)}
    if not missing:
        return
    # Loading the real extension registers the schemas; only when it fails do we step in.
    try:
        spec = importlib.util.find_spec("torchvision")
        import glob
        import os

        libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
        if libs:
            torch.ops.load_library(libs[0])
            missing = {n: s for n, s in missing.items() if not _schema_exists(n)}
    except (OSError, RuntimeError):
        pass
    if not missing:
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in missing.values():
        _library.define(schema)


ensure_torchvision_importable()
