"""Image-level scores from SPADE's evidence: the pooled-feature kNN, the heatmap, or both.

``SpadeSettings.image_score`` names the rule; :mod:`core.tuning` picks it per
data set from synthetic defects, because which one works depends on the
defects: a large broken part moves the pooled vector (DN2), a thin crack on a
640² board only shows in the heatmap's peak.

* ``"dn2"``: kNN distance of the pooled final features (the PANDA paper's image score);
* ``"max"``: the smoothed heatmap's peak inside the image (a letterbox's grey border excluded);
* ``"topk"``: the mean of the top :data:`TOPK_FRACTION` of the heatmap's pixels inside the
  image (steadier than one pixel when defects are larger than the smoothing);
* ``"mix"``: the sum of the DN2 score and the peak, each standardised by its own
  normal-image statistics (so neither scale dominates);
* ``"fused"``: the same sum with the top-k mean instead of the peak: the pooled
  evidence of the whole image and the heatmap's evidence of a local defect,
  each counted in units of its own spread over normal images.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from core.config import SPADE_IMAGE_SCORES as IMAGE_SCORE_RULES  # the one list of rules

TOPK_FRACTION = 0.005
"""Share of an image's heatmap pixels averaged by the "topk" rule (at least one pixel)."""


def peak_scores(heatmaps: np.ndarray, boxes: Sequence[tuple[int, int, int, int]] | None, rule: str) -> np.ndarray:
    """(N, H, W) heatmaps -> (N,) float64 by ``rule`` "max" or "topk", inside each (top, left, bottom, right) box.

    ``boxes`` None uses the whole map (a squashed image fills its canvas).
    """
    if rule not in ("max", "topk"):
        raise ValueError(f"peak rule must be 'max' or 'topk', got {rule!r}")
    scores = np.empty(len(heatmaps), dtype=np.float64)
    for index, heat in enumerate(heatmaps):
        if boxes is not None:
            top, left, bottom, right = boxes[index]
            heat = heat[top:bottom, left:right]
        values = heat.reshape(-1)
        if rule == "max":
            scores[index] = float(values.max())
        else:
            count = max(1, int(round(values.size * TOPK_FRACTION)))
            scores[index] = float(np.partition(values, values.size - count)[values.size - count :].mean())
    return scores


def standardise(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(values - mean) / std of ``reference`` (normal images' scores); std floored so a flat reference cannot blow up."""
    reference = np.asarray(reference, dtype=np.float64)
    spread = max(float(reference.std()), 1e-6 * max(1.0, abs(float(reference.mean()))))
    return (np.asarray(values, dtype=np.float64) - float(reference.mean())) / spread


def mix_scores(dn2: np.ndarray, peaks: np.ndarray, dn2_reference: np.ndarray, peak_reference: np.ndarray) -> np.ndarray:
    """(N,) DN2 scores and (N,) heatmap peaks (max or top-k) -> (N,) sum of both, each standardised on normal images."""
    return standardise(dn2, dn2_reference) + standardise(peaks, peak_reference)


def rule_scores(kind: str, dn2: np.ndarray, heatmaps: Callable[[], np.ndarray],
                boxes: Sequence[tuple[int, int, int, int]] | None, dn2_reference: Callable[[], np.ndarray],
                peak_reference: Callable[[str], np.ndarray]) -> np.ndarray:
    """(N,) image scores by rule ``kind`` from (N,) DN2 scores and ``heatmaps()`` (N, H, W) (not made for "dn2").

    ``boxes``: where each image lies on its map (see :func:`peak_scores`); ``dn2_reference()``: normal
    images' DN2 scores; ``peak_reference(rule)``: normal images' heatmap peaks by ``rule`` "max" or "topk"
    (both only read by "mix" and "fused", to standardise their two parts).
    """
    if kind not in IMAGE_SCORE_RULES:
        raise ValueError(f"image score kind must be one of {', '.join(IMAGE_SCORE_RULES)}, got {kind!r}")
    if kind == "dn2":
        return np.asarray(dn2, dtype=np.float64)
    heat = heatmaps()
    if kind in ("mix", "fused"):
        peak = "max" if kind == "mix" else "topk"
        return mix_scores(dn2, peak_scores(heat, boxes, peak), dn2_reference(), peak_reference(peak))
    return peak_scores(heat, boxes, kind)

