"""Detectors: one module per method, one contract (see ``base.py``).

``make_detector("dn2", settings)`` builds one by name; ``load_detector(path)``
reads a saved model of any method.
"""

from __future__ import annotations

import importlib
import os

from core.detectors.base import Detector, ModelFileError, NotFittedError, read_model_file, restore_common

# method name -> (module, class). Imported on use so that a method's heavy
# dependencies load only when it is asked for.
METHODS: dict[str, tuple[str, str]] = {
    "dn2": ("core.detectors.dn2", "DN2Detector"),
    "gaussian": ("core.detectors.gaussian", "GaussianDetector"),
    "spade": ("core.detectors.spade", "SpadeDetector"),
    "panda": ("core.detectors.panda", "PandaDetector"),
}


def detector_class(method: str) -> type[Detector]:
    try:
        module_name, class_name = METHODS[method]
    except KeyError:
        raise KeyError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def make_detector(method: str, settings=None) -> Detector:
    return detector_class(method)(settings)


def load_detector(path: str | os.PathLike) -> Detector:
    """Load a model saved by ``Detector.save``; never unpickles."""
    header, arrays = read_model_file(path)
    method = header.get("method")
    if method not in METHODS:
        raise ModelFileError(f"{path}: unknown method {method!r} in model header")
    cls = detector_class(method)
    return restore_common(cls.from_header_settings(header), header, arrays)


__all__ = ["Detector", "ModelFileError", "NotFittedError", "METHODS", "detector_class", "make_detector", "load_detector"]
