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
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from core.metrics import fpr_at_threshold, threshold_at_fpr

FORMAT_VERSION = 1
_HEADER_KEY = "__header__"


class NotFittedError(RuntimeError):
    """A detector was used before ``fit``."""


class ModelFileError(ValueError):
    """A saved model cannot be loaded (corrupt, wrong kind, incompatible backbone)."""


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

    @classmethod
    def from_header_settings(cls, header: dict[str, Any]) -> "Detector":
        """An unfitted detector with the settings stored in a model header."""
        return cls(settings_from_dict(cls.settings_type, header["settings"]))

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
        if _HEADER_KEY in arrays:
            raise ValueError(f"array name {_HEADER_KEY!r} is reserved")
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        encoded = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
        # Write then rename, so a crash never leaves half a model where a good one was.
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, **{_HEADER_KEY: encoded}, **arrays)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path


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


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read (header, arrays) from a saved model without unpickling anything."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except (ValueError, OSError, EOFError) as error:
        raise ModelFileError(f"{path}: not a model file of this tool ({error})") from error
    if _HEADER_KEY not in arrays:
        raise ModelFileError(f"{path}: not a model file of this tool (no header)")
    try:
        header = json.loads(arrays.pop(_HEADER_KEY).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: corrupt model header ({error})") from error
    if header.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format {header.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    return header, arrays


def settings_from_dict(settings_type: type, values: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen settings dataclass from its ``asdict`` form; lists become tuples."""
    kwargs = {}
    names = {field.name: field for field in dataclasses.fields(settings_type)}
    unknown = set(values) - set(names)
    if unknown:
        raise ModelFileError(f"unknown settings {sorted(unknown)} for {settings_type.__name__}")
    for name, value in values.items():
        default = getattr(settings_type(), name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = settings_from_dict(type(default), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return settings_type(**kwargs)


def restore_common(detector: Detector, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Detector:
    """Set the fields every detector saves (threshold, train scores) and call its ``_restore``."""
    detector.train_scores_ = arrays.pop("train_scores").astype(np.float64)
    detector.threshold_ = header["threshold"]
    held = arrays.pop("holdout_scores", None)
    detector.holdout_scores_ = None if held is None else held.astype(np.float64)
    detector.holdout_fpr_ = header.get("holdout_fpr")
    detector._restore(header, arrays)
    return detector
