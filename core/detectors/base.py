"""The contract every detector keeps, and the saved-model format.

``Detector(settings)`` only stores settings. ``fit(normal_set)`` does the work
and sets the fitted attributes (``train_scores_``, ``threshold_``, ...).
``score(image_set)`` returns one anomaly score per image, higher = more
anomalous; calling it before ``fit`` raises :class:`NotFittedError`.

Thresholds need no anomalies: ``train_scores_`` are leave-one-out scores of
the normal set (each image scored without itself), and ``threshold_`` is set
from them at ``settings.target_fpr`` (or from a held-out normal split when the
user gives one).

Saved models are one ``.npz`` file: the arrays a detector needs plus a JSON
header (method, settings, backbone and weights identity, image size, library
version) stored as bytes. Loading uses ``allow_pickle=False``: a model file
can never run code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from core.metrics import fpr_at_threshold, threshold_at_fpr
from core.npz_io import NpzFileError, NpzReader, open_npz, write_npz

FORMAT_VERSION = 1
_HEADER_KEY = "__header__"


class NotFittedError(RuntimeError):
    """A detector was used before ``fit``."""


class ModelFileError(NpzFileError):
    """A saved model cannot be loaded (corrupt, wrong kind, incompatible backbone); the message names the file."""


def library_version() -> str:
    from core import __version__

    return __version__


class Detector(ABC):
    """Base class: settings, fitted state, thresholds and save/load."""

    method: ClassVar[str] = ""
    settings_type: ClassVar[type] = object

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings if settings is not None else self.settings_type()
        self.train_scores_: np.ndarray | None = None
        self.threshold_: float | None = None
        self.holdout_scores_: np.ndarray | None = None
        self.holdout_fpr_: float | None = None
        # The model file this detector was loaded from (None when fitted here): errors name it.
        self.source_: str | None = None

    # ------------------------------------------------------------------ contract
    @abstractmethod
    def fit(self, normal, progress=None, cancel=None, holdout=None) -> "Detector":
        """Fit on an ImageSet of normal images; must set ``train_scores_`` and call ``_set_threshold``."""

    @abstractmethod
    def score(self, images, progress=None, cancel=None) -> np.ndarray:
        """ImageSet of N images -> (N,) float64 anomaly scores."""

    @abstractmethod
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able header fields, numpy arrays) that reproduce the fitted detector."""

    @abstractmethod
    def _restore(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Inverse of ``_state``."""

    # ------------------------------------------------------------------ helpers
    @property
    def is_fitted(self) -> bool:
        return self.train_scores_ is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__}.score called before fit(normal_images)")

    def _set_threshold(self, train_scores: np.ndarray, holdout_scores: np.ndarray | None = None) -> None:
        """Keep both score sets and place the threshold at ``settings.target_fpr`` (see :meth:`set_target_fpr`)."""
        self.train_scores_ = np.asarray(train_scores, dtype=np.float64)
        self.holdout_scores_ = None if holdout_scores is None else np.asarray(holdout_scores, dtype=np.float64)
        self._place_threshold(self.settings.target_fpr)

    def _place_threshold(self, target_fpr: float) -> None:
        """Threshold from held-out normal scores when there are some, else from the leave-one-out ones."""
        reference = self.holdout_scores_ if self.holdout_scores_ is not None else self.train_scores_
        self.threshold_ = threshold_at_fpr(reference, target_fpr)
        self.holdout_fpr_ = None if self.holdout_scores_ is None else fpr_at_threshold(self.holdout_scores_, self.threshold_)

    def set_target_fpr(self, target_fpr: float) -> float:
        """Move the working point without refitting; returns the new threshold."""
        self._require_fitted()
        self.settings = dataclasses.replace(self.settings, target_fpr=target_fpr)
        self._place_threshold(target_fpr)
        return self.threshold_

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """(N,) scores -> (N,) bool, True = anomalous (score strictly above the threshold)."""
        self._require_fitted()
        return np.asarray(scores) > self.threshold_

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted detector to ``path`` (.npz) atomically."""
        self._require_fitted()
        fields, arrays = self._state()
        header = {
            "format_version": FORMAT_VERSION,
            "library_version": library_version(),
            "method": self.method,
            "settings": dataclasses.asdict(self.settings),
            "threshold": self.threshold_,
            "holdout_fpr": self.holdout_fpr_,
            **fields,
        }
        arrays = {**arrays, "train_scores": self.train_scores_}
        if self.holdout_scores_ is not None:
            arrays["holdout_scores"] = self.holdout_scores_
        return write_npz(path, arrays, header, _HEADER_KEY)


class SegmentationDetector(Detector):
    """A detector that also says *where*: per-pixel anomaly maps beside the image scores.

    ``anomaly_maps(images)`` runs the backbone once per image and keeps the raw
    per-stage maps of that set; ``combined_maps(stages, sigma)`` recombines them
    (stage choice, smoothing) without touching the backbone again, so a slider
    in the app redraws from cached numbers. ``map_stages`` names the stages a
    caller may choose from.
    """

    @property
    @abstractmethod
    def map_stages(self) -> tuple[str, ...]:
        """Stage names whose raw maps can be combined (the fitted model's stages)."""

    @abstractmethod
    def anomaly_maps(self, images, progress=None, cancel=None) -> np.ndarray:
        """ImageSet of N images -> float32 (N, H, W) combined maps at the model's map size."""

    @abstractmethod
    def combined_maps(self, stages=None, sigma: float | None = None) -> np.ndarray:
        """float32 (N, H, W) maps of the last ``anomaly_maps`` set for another stage choice / smoothing."""

    def score_and_maps(self, images, progress=None, cancel=None) -> tuple[np.ndarray, np.ndarray]:
        """(N,) image scores and float32 (N, H, W) maps; subclasses that get both from one pass override it."""
        maps = self.anomaly_maps(images, progress, cancel)
        return self.score(images, None, cancel), maps


def read_model_file(path: str | os.PathLike, method: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read (header, arrays) from a saved model without unpickling anything.

    The header is read and checked (format, method, JSON types) before any
    array is loaded; with ``method`` given, a model of another method is
    refused before its arrays are read. Every problem raises
    :class:`ModelFileError` naming the file.
    """
    with open_npz(path, "model file", ModelFileError) as npz:
        header = npz.header(_HEADER_KEY)
        check_header(npz, header, method)
        return header, npz.arrays(exclude=(_HEADER_KEY,))


def check_header(npz: NpzReader, header: dict[str, Any], method: str | None = None) -> None:
    """Refuse a model header with a wrong format, method or JSON types (before its arrays are read)."""
    if header.get("format_version") != FORMAT_VERSION:
        raise npz.fail(f"not a model file of this tool (model format {header.get('format_version')!r}, "
                       f"expected {FORMAT_VERSION})")
    found = header.get("method")
    if not isinstance(found, str) or not found:
        raise npz.fail(f"damaged model header (method {json.dumps(found)}, expected a method name)")
    if method is not None and found != method:
        raise npz.fail(f"this is a {found} model, not a {method} model")
    if not isinstance(header.get("settings"), dict):
        raise npz.fail(f"damaged model header (settings are {_json_type(header.get('settings'))}, expected an object)")
    threshold = header.get("threshold")
    if not _is_number(threshold):
        raise npz.fail(f"damaged model header (threshold {json.dumps(threshold)}, expected a number)")
    holdout_fpr = header.get("holdout_fpr")
    if holdout_fpr is not None and not _is_number(holdout_fpr):
        raise npz.fail(f"damaged model header (holdout_fpr {json.dumps(holdout_fpr)}, expected a number or null)")
    if "train_scores" not in npz:
        raise npz.fail("damaged model file (no train_scores array)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def settings_from_dict(settings_type: type, values: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen settings dataclass from its ``asdict`` form; lists become tuples.

    Raises :class:`SettingsMismatch` for names the dataclass does not have,
    ``TypeError``/``ValueError`` for values its validation refuses.
    """
    if not isinstance(values, dict):
        raise TypeError(f"{settings_type.__name__} must be a JSON object, got {_json_type(values)}")
    kwargs = {}
    names = {field.name: field for field in dataclasses.fields(settings_type)}
    unknown = set(values) - set(names)
    if unknown:
        raise SettingsMismatch(f"unknown settings {sorted(unknown)} for {settings_type.__name__}", sorted(unknown))
    hints = typing.get_type_hints(settings_type)
    for name, value in values.items():
        default = getattr(settings_type(), name)
        if dataclasses.is_dataclass(default):
            value = settings_from_dict(type(default), value)
        else:
            if isinstance(value, list):
                value = tuple(value)
            if not _has_type(value, hints[name]):
                # A hand-edited header would otherwise fail much later, deep inside scoring.
                raise TypeError(f"{settings_type.__name__}.{name} is {json.dumps(value)}, not {_type_name(hints[name])}")
        kwargs[name] = value
    return settings_type(**kwargs)


def _has_type(value: Any, annotation: Any) -> bool:
    """Whether a JSON-decoded value fits a settings field's annotation (int, float, str, bool, tuples, optionals)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(annotation))
    if origin is tuple:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, tuple) and all(_has_type(item, args[0]) for item in value) if args else True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


class SettingsMismatch(ModelFileError):
    """Stored settings name fields that the settings dataclass does not have (another method's, or a newer version's)."""

    def __init__(self, message: str, unknown: list[str]) -> None:
        super().__init__(message)
        self.unknown = unknown


def restore_common(detector: Detector, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Detector:
    """Set the fields every detector saves (threshold, train scores) and call its ``_restore``."""
    detector.train_scores_ = np.asarray(arrays.pop("train_scores"), dtype=np.float64).reshape(-1)
    detector.threshold_ = float(header["threshold"])
    held = arrays.pop("holdout_scores", None)
    detector.holdout_scores_ = None if held is None else np.asarray(held, dtype=np.float64).reshape(-1)
    detector.holdout_fpr_ = header.get("holdout_fpr")
    detector._restore(header, arrays)
    return detector
