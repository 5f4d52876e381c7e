"""What a SPADE model file holds beyond the shared header, and reading it back.

A fitted SPADE model is four values: the :class:`~.index.PixelIndex`
(galleries and pooled features), the :class:`~.training_images.TrainingImages`,
the :class:`~.calibration.Calibration` and, when the settings were chosen by
``core.tuning``, the tuning summary. :func:`fitted_fields` turns them into JSON
fields and arrays (no pickle; :mod:`core.npz_io` writes them), :func:`read_fitted`
is its inverse and names what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.config import SpadeSettings
from core.detectors.base import ModelFileError
from core.detectors.spade.calibration import Calibration
from core.detectors.spade.index import PixelIndex
from core.detectors.spade.training_images import TrainingImages


@dataclass
class FittedSpade:
    """The values a SPADE fit learns (see the module docstring)."""

    index: PixelIndex
    training: TrainingImages
    calibration: Calibration
    tuning: dict[str, Any] | None = None


def fitted_fields(fitted: FittedSpade) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON fields, {name: array}) that save ``fitted`` in a model file."""
    index = fitted.index
    fields: dict[str, Any] = dict(
        stages=list(index.keys),
        stage_shapes={key: list(shape) for key, shape in index.shapes.items()},
        **fitted.training.header(),
        **fitted.calibration.header(),
        gallery_kind=index.kind,
    )
    if fitted.tuning is not None:  # how the settings were chosen (python -m core tune)
        fields["tuning"] = fitted.tuning
    arrays = {**index.arrays(), "train_sizes": fitted.training.sizes, **fitted.calibration.arrays(index.keys)}
    return fields, arrays


def read_fitted(header: dict[str, Any], arrays: dict[str, np.ndarray], settings: SpadeSettings,
                device: torch.device, expected_keys: tuple[str, ...]) -> FittedSpade:
    """Inverse of :func:`fitted_fields`; the galleries go to ``device``.

    Raises :class:`ModelFileError` when a field or an array is missing, an IVF
    index's bytes are unreadable, or the saved stages are not ``expected_keys``
    (the raw-map keys the settings produce).
    """
    try:
        stages = tuple(header["stages"])
        shapes = {key: (int(v[0]), int(v[1])) for key, v in header["stage_shapes"].items()}
        training = TrainingImages.from_header(header, arrays["train_sizes"])
        calibration = Calibration.restore(header, arrays, stages)
        index = PixelIndex.from_arrays(arrays, {key: shapes[key] for key in stages}, device, settings)
    except KeyError as error:
        raise ModelFileError(f"SPADE model file lacks {error}") from error
    except ValueError as error:  # an IVF index whose bytes FAISS cannot read
        raise ModelFileError(f"SPADE model file: {error}") from error
    if expected_keys != stages:
        raise ModelFileError(f"SPADE model stages {stages} do not match its settings ({expected_keys})")
    tuning = header.get("tuning")
    return FittedSpade(index, training, calibration, tuning if isinstance(tuning, dict) else None)
