"""Evaluation metrics for image- and pixel-level anomaly detection.

Conventions used throughout the project:

* a higher score means "more anomalous";
* label / mask value 1 (``True``) means anomalous, 0 (``False``) normal;
* a sample is declared anomalous iff ``score > threshold`` (strict).

Contents
--------
``image_auroc``, ``roc_curve_points``
    Image-level ROC analysis.
``pixel_auroc``
    AUROC over all pixels of all images pooled together.  Computed exactly as
    the Mann-Whitney U statistic: both classes are sorted once and, for every
    element of the smaller class, the number of elements of the other class
    that are smaller / equal is found with ``np.searchsorted``; ties count
    one half.  Integer counts are accumulated exactly, so the result equals
    ``sklearn.metrics.roc_auc_score`` (which handles ties by trapezoids) up to
    the final division, without materialising a ROC curve over every pixel.
``pro_score``, ``pro_curve``
    Per-Region Overlap curve (Bergmann et al., "MVTec AD", CVPR 2019),
    computed exactly: every distinct normal-pixel score is a threshold (see
    ``pro_curve`` for the algorithm), no fixed threshold grid.
``threshold_at_fpr``, ``fpr_at_threshold``
    Calibrating a decision threshold on normal data.
``SegmentationMetrics``, ``segmentation_metrics``
    Pixel AUROC and PRO together, sharing the expensive sort.

Maps whose resolution differs from the masks are *not* resized here; callers
resize first, a shape mismatch raises ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "SegmentationMetrics",
    "fpr_at_threshold",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "pro_score",
    "roc_curve_points",
    "segmentation_metrics",
    "threshold_at_fpr",
]

# Keys are fed to np.searchsorted in chunks of this many elements so that the
# two int64 index arrays stay small (2 x 32 MiB) even for ~10^8 pixels.
_SEARCH_CHUNK = 1 << 22


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------
def _as_scores(scores: object, name: str) -> np.ndarray:
    """Return ``scores`` as a real-valued ndarray without NaN (dtype kept)."""
    arr = np.asarray(scores)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _as_binary(values: object, name: str) -> np.ndarray:
    """Return ``values`` as a bool ndarray; only {0, 1} / {False, True} accepted.

    Masks read from PNG files are often {0, 255}; guessing what a value like
    255 means is left to the caller, hence the explicit error.
    """
    arr = np.asarray(values)
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or 0/1 numbers, got dtype {arr.dtype}")
    if not ((arr == 0) | (arr == 1)).all():
        raise ValueError(
            f"{name} must contain only 0 and 1 (convert e.g. a 0/255 mask with `mask > 0`)"
        )
    return arr.astype(bool)


def _check_labels_scores(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs: (N,) labels in {0, 1}, (N,) scores."""
    lab = np.asarray(labels)
    sc = np.asarray(scores)
    if lab.ndim != 1 or sc.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D, got shapes {lab.shape} and {sc.shape}"
        )
    if lab.shape != sc.shape:
        raise ValueError(f"labels shape {lab.shape} differs from scores shape {sc.shape}")
    lab = _as_binary(lab, "labels")
    sc = _as_scores(sc, "scores")
    n_pos = int(np.count_nonzero(lab))
    if n_pos == 0 or n_pos == lab.size:
        raise ValueError(
            "labels contain only one class "
            f"({'anomalous' if n_pos else 'normal'}); AUROC needs both"
        )
    return lab, sc


def _check_masks_maps(masks: object, maps: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate pixel-level inputs; a single (H, W) pair is promoted to (1, H, W)."""
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.shape != a.shape:
        raise ValueError(
            f"masks shape {m.shape} differs from maps shape {a.shape}; "
            "resize the anomaly maps to the mask resolution before evaluating"
        )
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.ndim != 3:
        raise ValueError(f"masks/maps must have shape (N, H, W), got {m.shape}")
    return _as_binary(m, "masks"), _as_scores(a, "maps")


def _check_max_fpr(max_fpr: float) -> float:
    value = float(max_fpr)
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr!r}")
    return value


# --------------------------------------------------------------------------
# AUROC (Mann-Whitney U)
# --------------------------------------------------------------------------
def _twice_rank_sum(keys_sorted: np.ndarray, arr_sorted: np.ndarray) -> int:
    """Sum over keys of ``2 * #(arr < key) + #(arr == key)`` as an exact int.

    Both inputs are 1-D and ascending; sorted keys make searchsorted fast
    (random-order keys were ~50x slower in a benchmark with 67M keys).
    """
    total = 0
    for start in range(0, keys_sorted.size, _SEARCH_CHUNK):
        chunk = keys_sorted[start : start + _SEARCH_CHUNK]
        left = np.searchsorted(arr_sorted, chunk, side="left")
        right = np.searchsorted(arr_sorted, chunk, side="right")
        # int64 cannot overflow: a chunk sums 2^22 indices, each <= arr_sorted.size.
        total += int(left.sum(dtype=np.int64)) + int(right.sum(dtype=np.int64))
    return total


def _auc_from_sorted(pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> float:
    """AUROC = P(pos > neg) + 0.5 P(pos == neg) from two ascending 1-D arrays."""
    n_pos, n_neg = pos_sorted.size, neg_sorted.size
    # Use the smaller class as the search keys: fewer binary searches.
    if n_pos <= n_neg:
        twice_u = _twice_rank_sum(pos_sorted, neg_sorted)
    else:
        # For a normal score x: 2*#(pos<x) + #(pos==x) + 2U_x = 2*n_pos,
        # where U_x = #(pos>x) + 0.5*#(pos==x) is its contribution to U.
        twice_u = 2 * n_pos * n_neg - _twice_rank_sum(neg_sorted, pos_sorted)
    # Python ints are exact; one correctly rounded division at the end.
    return twice_u / (2 * n_pos * n_neg)


def image_auroc(labels: object, scores: object) -> float:
    """Area under the ROC curve for image-level scores.

    Args:
        labels: (N,) int or bool, 1 = anomalous, 0 = normal.
        scores: (N,) float, higher = more anomalous. NaN is rejected.

    Returns:
        AUROC in [0, 1]; ties between a normal and an anomalous score count
        one half (identical to ``sklearn.metrics.roc_auc_score``).

    Raises:
        ValueError: shapes differ, not 1-D, labels not in {0, 1}, only one
            class present, or NaN in scores.
    """
    lab, sc = _check_labels_scores(labels, scores)
    return _auc_from_sorted(np.sort(sc[lab]), np.sort(sc[~lab]))


def roc_curve_points(
    labels: object, scores: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with one point per distinct score (no points dropped).

    Args:
        labels: (N,) int or bool, 1 = anomalous.
        scores: (N,) float, higher = more anomalous.

    Returns:
        ``(fpr, tpr, thresholds)``, three float64 arrays of shape (M + 1,)
        where M is the number of distinct scores.  Point ``i`` is obtained by
        declaring anomalous every sample with ``score > thresholds[i]``
        (the project's strict rule).  ``thresholds`` is decreasing: it starts
        at the maximum score (point (0, 0)) and ends at ``-inf`` (point (1, 1)).
        ``fpr``/``tpr`` equal sklearn's ``roc_curve(..., drop_intermediate=False)``;
        sklearn's thresholds use ``>=`` and are therefore shifted by one point.
    """
    lab, sc = _check_labels_scores(labels, scores)
    order = np.argsort(sc, kind="stable")[::-1]
    s_desc = sc[order].astype(np.float64)
    y_desc = lab[order]
    # Last index of each run of equal scores in descending order.
    ends = np.append(np.flatnonzero(s_desc[1:] != s_desc[:-1]), s_desc.size - 1)
    tps = np.cumsum(y_desc, dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    n_pos = int(tps[-1])
    n_neg = int(fps[-1])
    fpr = np.concatenate([[0.0], fps / n_neg])
    tpr = np.concatenate([[0.0], tps / n_pos])
    # "score >= u_k" equals "score > u_{k+1}", so the threshold of point k is
    # the next lower distinct score, and -inf after the lowest one.
    thresholds = np.concatenate([s_desc[ends], [-np.inf]])
    return fpr, tpr, thresholds


def pixel_auroc(masks: object, maps: object) -> float:
    """Pixel-level AUROC with the pixels of all images pooled.

    Args:
        masks: (N, H, W) bool (or 0/1 ints), True = anomalous pixel.
        maps: (N, H, W) float anomaly maps at the same resolution as ``masks``.
            The dtype is kept (float32 stays float32), so memory is about
            one extra copy of ``maps``.

    Returns:
        AUROC in [0, 1], exact Mann-Whitney statistic with ties counted one
        half (matches ``sklearn.metrics.roc_auc_score`` on the flattened
        arrays).  Cost: sorting both pixel classes once.

    Raises:
        ValueError: shape mismatch (both shapes named), NaN in maps, or the
            masks contain only normal / only anomalous pixels.
    """
    m, a = _check_masks_maps(masks, maps)
    pos = a[m]  # boolean indexing copies, so sorting in place is safe
    neg = a[~m]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("masks contain only one class of pixels; pixel AUROC needs both")
    pos.sort()
    neg.sort()
    return _auc_from_sorted(pos, neg)


# --------------------------------------------------------------------------
# Per-Region Overlap
# --------------------------------------------------------------------------
def _region_tail_weights(m: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Sorted region-pixel scores and the PRO reached above each of them.

    Every pixel p of region r gets weight 1 / (R * |r|); PRO at a threshold t
    is then the summed weight of region pixels with score > t.

    Args:
        m: (N, H, W) bool masks.  a: (N, H, W) maps.

    Returns:
        ``(scores_sorted, tail, n_regions)``: ``scores_sorted`` (P,) ascending
        scores of all region pixels (dtype of ``a``); ``tail`` (P + 1,) float64
        with ``tail[i]`` = summed weight of ``scores_sorted[i:]`` (tail[P] = 0).
    """
    scores_parts: list[np.ndarray] = []
    ids_parts: list[np.ndarray] = []
    n_regions = 0
    for mask, amap in zip(m, a):
        if not mask.any():
            continue
        # 8-connectivity: diagonally touching defect pixels are one region.
        n_lab, lab = cv2.connectedComponents(
            np.ascontiguousarray(mask, dtype=np.uint8), connectivity=8, ltype=cv2.CV_32S
        )
        # Both selections walk `mask` in C order, so scores and ids stay aligned.
        scores_parts.append(amap[mask])
        ids_parts.append(lab[mask] - 1 + n_regions)  # offset: regions of different images stay distinct
        n_regions += n_lab - 1
    if n_regions == 0:
        raise ValueError("masks contain no defect regions; PRO is undefined")
    scores = np.concatenate(scores_parts)
    ids = np.concatenate(ids_parts)
    sizes = np.bincount(ids, minlength=n_regions)
    weights = 1.0 / (n_regions * sizes[ids].astype(np.float64))
    order = np.argsort(scores)
    # Reverse cumsum: accumulates from the high-score end, where the small
    # PRO values near FPR = 0 live, so they carry little rounding error.
    tail = np.zeros(scores.size + 1, dtype=np.float64)
    tail[:-1] = np.cumsum(weights[order][::-1])[::-1]
    return scores[order], tail, n_regions


def _top_normal_groups(
    neg: np.ndarray, max_fpr: float, *, is_sorted: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct normal scores, descending, as far as needed to reach ``max_fpr``.

    Args:
        neg: (n,) normal-pixel scores.  Modified in place (partitioned) when
            ``is_sorted`` is False; must be ascending when it is True.
        max_fpr: in (0, 1].

    Returns:
        ``(u, cum)``: ``u`` (G,) distinct normal scores, descending;
        ``cum`` (G,) int64 with ``cum[k]`` = #(normal scores >= u[k]).
        Always ``cum[-1] / n >= max_fpr``.
    """
    n = neg.size
    # Keep the K highest scores; +1 absorbs rounding of max_fpr * n.
    k_keep = min(n, math.ceil(max_fpr * n) + 1)
    if is_sorted:
        top = neg[n - k_keep :]
    else:
        if k_keep < n:
            # O(n) selection instead of an O(n log n) full sort.
            neg.partition(n - k_keep)
        top = np.sort(neg[n - k_keep :])
    desc = top[::-1]
    starts = np.flatnonzero(np.concatenate([[True], desc[1:] != desc[:-1]]))
    u = desc[starts]
    counts = np.diff(np.append(starts, desc.size)).astype(np.int64)
    if k_keep < n:
        # Copies of the lowest kept value may lie outside the kept part; all
        # higher values are complete.  Recount it over the whole array.
        if is_sorted:
            counts[-1] = np.searchsorted(neg, u[-1], "right") - np.searchsorted(neg, u[-1], "left")
        else:
            counts[-1] = np.count_nonzero(neg == u[-1])
    return u, np.cumsum(counts)


def _pro_curve_from(
    neg: np.ndarray,
    region_scores: np.ndarray,
    tail: np.ndarray,
    max_fpr: float,
    *,
    neg_sorted: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve truncated at ``max_fpr`` (see ``pro_curve``)."""
    n = neg.size
    u, cum = _top_normal_groups(neg, max_fpr, is_sorted=neg_sorted)
    fpr_ge = cum / n  # FPR with threshold just below u[k]  (score >= u[k])
    fpr_gt = np.concatenate([[0.0], fpr_ge[:-1]])  # threshold at u[k]  (score > u[k])
    # searchsorted wants ascending keys; u is descending.
    u_asc = u[::-1]
    pro_gt = tail[np.searchsorted(region_scores, u_asc, side="right")][::-1]
    pro_ge = tail[np.searchsorted(region_scores, u_asc, side="left")][::-1]

    # Curve: (0,0), then per distinct normal value a segment
    # (fpr_gt, pro_gt) -> (fpr_ge, pro_ge); it is diagonal when region pixels
    # tie with that normal value.  Consecutive segments are joined by vertical
    # steps (region pixels strictly between two normal values).
    g = u.size
    fpr = np.empty(2 * g + 1, dtype=np.float64)
    pro = np.empty(2 * g + 1, dtype=np.float64)
    fpr[0] = pro[0] = 0.0
    fpr[1::2], fpr[2::2] = fpr_gt, fpr_ge
    pro[1::2], pro[2::2] = pro_gt, pro_ge

    # Cut at max_fpr; the end point carries the PRO at which the FPR first
    # reaches max_fpr (linear interpolation inside the crossing segment).
    j = int(np.searchsorted(fpr, max_fpr, side="left"))  # fpr[j] >= max_fpr > fpr[j-1]
    x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
    y_end = y1 if x1 == max_fpr else y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
    fpr_out = np.append(fpr[:j], max_fpr)
    pro_out = np.append(pro[:j], y_end)
    return fpr_out, pro_out


def pro_curve(
    masks: object, maps: object, max_fpr: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Per-Region Overlap curve, PRO as a function of the pixel FPR.

    Definitions (decision rule ``map > t``):

    * regions: 8-connected components of each image's ground-truth mask;
      regions of different images are distinct;
    * PRO(t) = mean over all regions r of |r ∩ {map > t}| / |r|;
    * FPR(t) = fraction of normal pixels (outside every mask, defect-free
      images included) with map > t.

    Algorithm (exact, no threshold grid): FPR only changes at distinct
    normal-pixel scores u, so the curve is fully described by the points
    (FPR, PRO) at ``score > u`` and ``score >= u`` for every such u.
    Normal scores are reduced to the top ~max_fpr fraction with
    ``np.partition`` and sorted; FPR comes from their cumulative counts.
    Each region pixel carries weight 1 / (n_regions * |region|), so PRO(t)
    is the summed weight of region pixels above t: one sort of the region
    pixels plus a cumulative sum, queried with ``np.searchsorted``.

    Args:
        masks: (N, H, W) bool (or 0/1), True = defect pixel.
        maps: (N, H, W) float, same shape as ``masks``.
        max_fpr: in (0, 1]; the curve stops at this FPR.

    Returns:
        ``(fpr, pro)``: float64 arrays of equal length, both non-decreasing,
        starting at (0, 0) and ending at ``fpr == max_fpr`` with the PRO
        reached when the FPR first attains ``max_fpr`` (interpolated along
        the crossing segment).  Repeated fpr values mark vertical steps.
        One or two points per distinct normal score below the cut, so the
        arrays can be large; thin them out before plotting if needed.

    Raises:
        ValueError: shape mismatch, NaN, no defect regions, no normal pixels,
            or max_fpr outside (0, 1].
    """
    max_fpr = _check_max_fpr(max_fpr)
    m, a = _check_masks_maps(masks, maps)
    region_scores, tail, _ = _region_tail_weights(m, a)
    neg = a[~m]
    if neg.size == 0:
        raise ValueError("masks leave no normal pixels; the FPR axis of PRO is undefined")
    return _pro_curve_from(neg, region_scores, tail, max_fpr, neg_sorted=False)


def _normalized_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    area = float(np.trapezoid(pro, fpr)) / max_fpr
    # Guard against round-off pushing a perfect score to 1 + 1e-16.
    return min(1.0, max(0.0, area))


def pro_score(masks: object, maps: object, max_fpr: float = 0.3) -> float:
    """Normalized area under the PRO curve up to ``max_fpr``.

    The exact curve of ``pro_curve`` is integrated with the trapezoid rule
    over FPR in [0, max_fpr] and divided by ``max_fpr``, so the result is in
    [0, 1]: 1 for a perfect map, about ``max_fpr / 2`` for an uninformative
    (random or constant) map.  Invariant to strictly increasing transforms of
    the maps.  There is no threshold-count parameter: every distinct
    normal-pixel score is used as a threshold.

    Args:
        masks: (N, H, W) bool (or 0/1), True = defect pixel.
        maps: (N, H, W) float, same shape as ``masks``.
        max_fpr: in (0, 1], upper end of the integration range (MVTec AD uses 0.3).

    Returns:
        float in [0, 1].

    Raises:
        ValueError: as ``pro_curve``.
    """
    fpr, pro = pro_curve(masks, maps, max_fpr)
    return _normalized_area(fpr, pro, float(max_fpr))


# --------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------
def _flat_scores(normal_scores: object) -> np.ndarray:
    return _as_scores(normal_scores, "normal_scores").ravel()


def fpr_at_threshold(normal_scores: object, threshold: float) -> float:
    """Fraction of normal scores strictly above ``threshold``.

    Args:
        normal_scores: float array of any shape (e.g. (N,) image scores or
            (N, H, W) maps of normal images); flattened.
        threshold: decision threshold; anomalous iff ``score > threshold``.

    Returns:
        False positive rate in [0, 1].
    """
    s = _flat_scores(normal_scores)
    t = float(threshold)
    if math.isnan(t):
        raise ValueError("threshold is NaN")
    return int(np.count_nonzero(s > t)) / s.size


def threshold_at_fpr(normal_scores: object, target_fpr: float) -> float:
    """Smallest threshold whose false positive rate does not exceed ``target_fpr``.

    Decision rule: a sample is anomalous iff ``score > threshold``.  The
    returned t is the smallest value with
    ``fpr_at_threshold(normal_scores, t) <= target_fpr``; it is always one of
    the normal scores (the (k+1)-th largest, k = floor(target_fpr * n)).
    With few normal samples or tied scores the achieved FPR can be lower
    than the target: check it with ``fpr_at_threshold``.

    Args:
        normal_scores: float array of any shape, scores of normal samples;
            flattened. NaN is rejected.
        target_fpr: strictly between 0 and 1.

    Returns:
        The threshold as a Python float (exact copy of a normal score).

    Example:
        Scores 0, 1, ..., 99 and target 0.05 give threshold 94: exactly the
        five scores 95..99 exceed it.
    """
    target = float(target_fpr)
    if not 0.0 < target < 1.0:  # also rejects NaN
        raise ValueError(f"target_fpr must be strictly between 0 and 1, got {target_fpr!r}")
    s = _flat_scores(normal_scores)
    n = s.size
    # k = largest count of exceedances with k / n <= target, evaluated with the
    # same float division fpr_at_threshold uses, so "achieved <= target"
    # holds in floating point too (floor(0.29 * 100) alone would give 28).
    k = min(max(int(math.floor(target * n)), 0), n - 1)
    while k + 1 <= n - 1 and (k + 1) / n <= target:
        k += 1
    while k > 0 and k / n > target:
        k -= 1
    # The (k+1)-th largest score: at most k scores lie strictly above it, and
    # any smaller threshold would let at least k + 1 scores through.
    idx = n - 1 - k
    return float(np.partition(s, idx)[idx])


# --------------------------------------------------------------------------
# combined
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentationMetrics:
    """Pixel-level results for one evaluation.

    Attributes:
        pixel_auroc: pooled pixel AUROC in [0, 1].
        pro: normalized PRO area up to ``max_fpr``, in [0, 1].
        max_fpr: integration limit used for ``pro``.
    """

    pixel_auroc: float
    pro: float
    max_fpr: float


def segmentation_metrics(masks: object, maps: object, max_fpr: float = 0.3) -> SegmentationMetrics:
    """Pixel AUROC and PRO score in one pass, sorting the normal pixels once.

    Args:
        masks: (N, H, W) bool (or 0/1), True = defect pixel; or a list of
            (H_i, W_i) masks of images of different sizes.
        maps: (N, H, W) float, same shape; or a list matching ``masks``.
        max_fpr: in (0, 1], PRO integration limit.

    Raises:
        ValueError: as ``pixel_auroc`` and ``pro_curve``.
    """
    max_fpr = _check_max_fpr(max_fpr)
    if isinstance(masks, (list, tuple)):
        # Images of different sizes (each map at its own mask's resolution).
        pairs = [_check_masks_maps(mask, amap) for mask, amap in zip(masks, maps, strict=True)]
        m, a = [p[0][0] for p in pairs], [p[1][0] for p in pairs]
        region_scores, tail, _ = _region_tail_weights(m, a)
        neg = np.concatenate([amap[~mask] for mask, amap in zip(m, a)])
    else:
        m, a = _check_masks_maps(masks, maps)
        region_scores, tail, _ = _region_tail_weights(m, a)  # raises if no regions
        neg = a[~m]
    if neg.size == 0:
        raise ValueError("masks contain only one class of pixels; pixel AUROC needs both")
    neg.sort()
    # The anomalous pixels are exactly the region pixels, already sorted.
    auroc = _auc_from_sorted(region_scores, neg)
    fpr, pro = _pro_curve_from(neg, region_scores, tail, max_fpr, neg_sorted=True)
    return SegmentationMetrics(
        pixel_auroc=auroc, pro=_normalized_area(fpr, pro, max_fpr), max_fpr=max_fpr
    )
