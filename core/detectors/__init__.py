"""Detectors: one module per method, one contract (see ``base.py``), one registry (here).

:data:`METHODS` is the only list of methods in the project: the CLI, the
benchmarks and the dashboard read names, labels, settings types, capabilities
and benchmark presets from it. Adding a method is one entry here (plus its
module). ``make_detector("dn2", settings)`` builds one by name;
``load_detector(path)`` reads a saved model of any method.

Capabilities are declared, not probed (``tests/test_contract.py`` checks each
declaration against the class):

* ``segmentation``: a :class:`~core.detectors.base.SegmentationDetector`
  (``anomaly_maps``, ``combined_maps``, ``map_stages``); otherwise the method
  gives image scores only (``image_only``).
* ``adaptation``: trains a private copy of the backbone (PANDA); its ``fit``
  also takes ``test=``, ``outliers=`` and ``on_epoch=`` and it keeps per-epoch
  ``curves_``. Fitted through ``python -m core adapt``, not ``fit``.
* ``features``: a :class:`~core.detectors.mixins.FeatureDetector` that can
  be fitted from extracted pooled features, so a benchmark extracts a data set
  once for every class.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from core.config import PANDA_STRATEGIES, DN2Settings, GaussianSettings, PandaSettings, SpadeSettings
from core.detectors.base import (
    Detector, ModelFileError, NotFittedError, SegmentationDetector, SettingsMismatch, read_model_file,
    restore_common, settings_from_dict,
)


@dataclass(frozen=True)
class Preset:
    """A named variant of a method for benchmarks: ``overrides`` replace fields of the default settings."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodInfo:
    """What the rest of the project needs to know about one method, without importing it."""

    name: str
    label: str
    summary: str
    settings_type: type
    module: str
    class_name: str
    segmentation: bool = False
    adaptation: bool = False
    features: bool = False
    presets: tuple[Preset, ...] = ()

    @property
    def image_only(self) -> bool:
        """Image scores only, no anomaly maps."""
        return not self.segmentation

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(name for name in ("segmentation", "adaptation", "features") if getattr(self, name))

    @property
    def bench_presets(self) -> tuple[Preset, ...]:
        """The benchmark variants; a method without presets runs under its own name with default settings."""
        return self.presets or (Preset(self.name),)

    def detector_class(self) -> type[Detector]:
        # Imported on use, so that a method's heavy dependencies load only when it is asked for.
        return getattr(importlib.import_module(self.module), self.class_name)

    def make(self, settings: Any = None) -> Detector:
        return self.detector_class()(settings)


METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("dn2", "DN2", "kNN on pooled features", DN2Settings, "core.detectors.dn2", "DN2Detector",
                   features=True, presets=(Preset("dn2"), Preset("dn2-kmeans", {"gallery": "kmeans"}))),
        MethodInfo("gaussian", "Gaussian", "Mahalanobis distance", GaussianSettings, "core.detectors.gaussian",
                   "GaussianDetector", features=True),
        MethodInfo("spade", "SPADE", "pixel kNN: heatmaps and defect masks", SpadeSettings, "core.detectors.spade",
                   "SpadeDetector", segmentation=True,
                   presets=(Preset("spade"), Preset("spade-exact", {"gallery": "exact"}))),
        MethodInfo("panda", "PANDA", "fine-tuned features (Early, SES, EWC, OE)", PandaSettings,
                   "core.detectors.panda", "PandaDetector", adaptation=True,
                   presets=tuple(Preset(f"panda-{strategy}", {"strategy": strategy})
                                 for strategy in PANDA_STRATEGIES)),
    )
}
"""Method name -> :class:`MethodInfo`; the one list of methods."""


def method_info(method: str) -> MethodInfo:
    try:
        return METHODS[method]
    except KeyError:
        raise KeyError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}") from None


def methods_with(*, segmentation: bool | None = None, adaptation: bool | None = None,
                 features: bool | None = None) -> tuple[str, ...]:
    """Names of the methods whose capabilities match every flag given (None = either)."""
    wanted = {"segmentation": segmentation, "adaptation": adaptation, "features": features}
    return tuple(name for name, info in METHODS.items()
                 if all(value is None or getattr(info, flag) == value for flag, value in wanted.items()))


def detector_class(method: str) -> type[Detector]:
    return method_info(method).detector_class()


def make_detector(method: str, settings=None) -> Detector:
    return method_info(method).make(settings)


def preset_settings(preset: Preset, info: MethodInfo) -> Any:
    """The method's default settings with the preset's overrides."""
    return dataclasses.replace(info.settings_type(), **preset.overrides)


def load_detector(path: str | os.PathLike, method: str | None = None, segmentation: bool = False) -> Detector:
    """Load a model saved by ``Detector.save``; never unpickles.

    ``method`` / ``segmentation=True`` refuse, before any array is read, a
    model of another method / one without maps. Every problem with the file
    (missing, damaged, foreign, hand-edited) raises :class:`ModelFileError`
    whose message starts with the path.
    """
    header, arrays = read_model_file(path, method)
    name = header["method"]
    if name not in METHODS:
        raise ModelFileError(f"{path}: a model of an unknown method {name!r} (this tool knows {', '.join(METHODS)})")
    info = METHODS[name]
    if segmentation and not info.segmentation:
        raise ModelFileError(f"{path}: this is a {info.label} model, which gives no heatmaps; "
                             f"use a model of {', '.join(METHODS[m].label for m in methods_with(segmentation=True))}")
    try:
        settings = settings_from_dict(info.settings_type, header["settings"])
    except SettingsMismatch as error:
        raise ModelFileError(f"{path}: {_mismatch(info, header['settings'], error)}") from None
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: damaged {info.label} model settings ({error})") from None
    try:
        detector = info.make(settings)
        detector.source_ = str(path)
        return restore_common(detector, header, arrays)
    except ModelFileError as error:
        message = str(error)
        raise ModelFileError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
        # The header and arrays passed the format checks but do not make a model (hand-edited or
        # written by another version): the file is at fault, not the program.
        raise ModelFileError(f"{path}: damaged {info.label} model ({type(error).__name__}: {error})") from None


def _mismatch(info: MethodInfo, settings: dict[str, Any], error: SettingsMismatch) -> str:
    """Why stored settings do not fit ``info``'s, naming the method they do fit when there is one."""
    for other in METHODS.values():
        names = {f.name for f in dataclasses.fields(other.settings_type)}
        if other is not info and set(settings) <= names:
            return f"the header says {info.label} but the settings are {other.label}'s: this is a {other.label} model"
    return f"{error} (written by another version of this tool?)"


__all__ = [
    "Detector", "SegmentationDetector", "ModelFileError", "NotFittedError", "METHODS", "MethodInfo", "Preset",
    "method_info", "methods_with", "detector_class", "make_detector", "preset_settings", "load_detector",
]
