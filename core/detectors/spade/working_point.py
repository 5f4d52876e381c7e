"""Where SPADE's image threshold sits: the normal image scores it is placed on.

A fit places the image threshold at ``target_fpr`` of normal images the
galleries did not see: a held-out set, else fitted images each searched without
its own pixels. With ``nuisance_copies``, copies of those images under the
line's plausible normal variation (:mod:`core.nuisance`) join them, so a score
that fires on lighting drift or a slightly shifted part is caught at fit time.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from core.config import SpadeSettings
from core.datasets import ImageItem, ImageSet
from core.detectors.spade.featurizer import PixelFeaturizer
from core.detectors.spade.index import PixelIndex
from core.images import ImageSize
from core.nuisance import nuisance_copies
from core.progress import CancelFn

RuleScorer = Callable[[np.ndarray, dict[str, np.ndarray], ImageSet], np.ndarray]
"""(DN2 scores (N,), {key: (N, h, w)} raw maps, the images) -> (N,) scores under the model's image rule."""


def nuisance_image_scores(images: ImageSet, pixel_owners: list[int | None], pooled_owners: list[int | None],
                          settings: SpadeSettings, index: PixelIndex, featurizer: PixelFeaturizer, extractor,
                          size: ImageSize, score_rule: RuleScorer, cancel: CancelFn | None = None) -> np.ndarray:
    """(N * nuisance_copies,) image scores of ``settings.nuisance_copies`` nuisance copies of each of ``images``.

    A copy is never matched with its own original: ``pixel_owners[i]`` is left out of the pixel galleries'
    search for copies of image ``i``, ``pooled_owners[i]`` out of DN2's (None: nothing to leave out).
    ``extractor``: the backbone (:class:`~core.backbones.FeatureExtractor`).
    """
    made = nuisance_copies([item.load() for item in images], settings.nuisance_copies, settings.seed)
    copies = ImageSet([ImageItem(f"{images[owner].name}#nuisance{number % settings.nuisance_copies}", array=copy)
                       for number, (owner, copy) in enumerate(made)])
    owners = [owner for owner, _ in made]
    pixels, pooled = featurizer.extract(extractor, copies, size, settings.features.batch_size, None, cancel)
    found = [index.search({key: value[j] for key, value in pixels.items()}, pooled[j], settings,
                          pixel_owners[owners[j]])[0] for j in range(len(copies))]
    raw = {key: np.stack([maps[key] for maps in found]) for key in index.keys}
    dn2 = index.image_scores_without(pooled, [pooled_owners[owner] for owner in owners])
    return score_rule(dn2, raw, copies)


def threshold_evidence(kind: str, dn2_fitted: np.ndarray, dn2_held: np.ndarray | None,
                       calibration_scores: Callable[[], np.ndarray],
                       nuisance_scores: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The normal scores the image threshold is set on: (fitted images' scores, held-out images' or None).

    ``"dn2"``: the (n,) DN2 scores of the fitted images (each without itself) and, with a hold-out set,
    its (m,) scores; nuisance copies' scores join the held-out side when there is one, else the fitted
    side. Other rules: ``calibration_scores()``, the calibration images' own scores under the rule (held
    out, or fitted images searched without themselves), with the nuisance copies' scores, on both sides
    when the calibration images were held out.
    """
    held_out = dn2_held is not None
    if kind != "dn2":
        reference = calibration_scores()
        if nuisance_scores is not None:
            reference = np.concatenate([reference, nuisance_scores])
        return reference, (reference if held_out else None)
    if nuisance_scores is None:
        return dn2_fitted, dn2_held
    if held_out:
        return dn2_fitted, np.concatenate([dn2_held, nuisance_scores])
    return np.concatenate([dn2_fitted, nuisance_scores]), None
