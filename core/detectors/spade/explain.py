"""Explanations: the normal training patch nearest to one pixel of a scored image, found exactly.

How "exactly" is achieved per gallery kind (:attr:`PixelIndex.kind <core.detectors.spade.index.PixelIndex>`):

* ``exact``: the query pixel's feature (one backbone pass over the scored
  image) is compared with every normal pixel of the stage (float16 features,
  float32 distances) — not only the ``top_images`` the heatmap searched;
* ``ivf-flat``: an exhaustive probe of every IVF list (real float32 vectors);
* ``kmeans`` / ``ivf-pq``: the gallery holds centres or compressed codes, not
  real pixels. In the process that fitted the model, the real pixels (float16)
  are kept for this when they fit ``max_gallery_bytes``: an exhaustive search.
  Otherwise (a loaded model) the training images themselves are read again
  (the ``normal`` set a caller passes, or the saved paths when the files are
  unchanged) and their real pixel features recomputed by the backbone, in the
  order of a proven lower bound on their distance
  (:class:`~core.detectors.spade.gallery.CellBounds`); the search stops when
  no unread image can hold a nearer pixel. At most ``MAX_IMAGES`` images are
  read: beyond that, or without the training images, the answer is marked
  ``approximate``. (Measured on bottle: pixels that look normal are proven
  within a few images; a defect's peak is far from every normal pixel, the
  bounds prune little, and the answer stays approximate.)

``approximate=False`` therefore means: no normal training pixel of that stage
is nearer to the query pixel than the one reported (up to float16 rounding of
the stored features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from core import maps
from core.datasets import ImageItem, ImageSet
from core.backbones import FeatureExtractor
from core.config import SpadeSettings
from core.detectors.spade.featurizer import PixelCache, PixelFeaturizer
from core.detectors.spade.index import PixelIndex
from core.detectors.spade.raw_cache import ScoredSet, item_key
from core.detectors.spade.training_images import TrainingImages
from core.images import ImageError, ImageSize, content_box

MAX_IMAGES = 16
"""Training images an exact K-means / IVF-PQ explanation may re-read before it settles for approximate."""
_BATCH = 8  # training images read per backbone batch

Pixels = dict[str, torch.Tensor]
"""{key: (h, w, C) float32} pixel features of one image."""


@dataclass(frozen=True)
class ExplainContext:
    """What an explanation reads: the fitted ``index`` and ``training`` images, the ``featurizer`` (for the
    averaged patch's reach), the input ``size``, the search's ``k`` and ``top_images``, and two readers of
    real pixel features: ``read_image(item)`` for a scored image and ``read_training(indices, items)`` for
    training images (backbone passes, cached by the detector)."""

    index: PixelIndex
    training: TrainingImages
    featurizer: PixelFeaturizer
    size: ImageSize
    k: int
    top_images: int
    read_image: Callable[[ImageItem], Pixels]
    read_training: Callable[[Sequence[int], Sequence[ImageItem]], list[Pixels]]

    @classmethod
    def reading_through(cls, cache: PixelCache, extractor: Callable[[], FeatureExtractor], index: PixelIndex,
                        training: TrainingImages, featurizer: PixelFeaturizer, size: ImageSize,
                        settings: SpadeSettings) -> "ExplainContext":
        """A context whose readers pass images through the backbone (``extractor()``), kept in ``cache``."""

        def read_image(item: ImageItem) -> Pixels:
            return cache.one(("image", item_key(item)), item, featurizer, extractor, size)

        def read_training(indices: Sequence[int], items: Sequence[ImageItem]) -> list[Pixels]:
            return cache.training(indices, items, featurizer, extractor, size, settings.features.batch_size)

        return cls(index, training, featurizer, size, settings.k, settings.top_images, read_image, read_training)


@dataclass(frozen=True)
class Explanation:
    """The normal training patch closest to one pixel of a scored image.

    ``train_index``/``train_name``: the training image; ``stage``: the stage
    whose neighbour is reported (of the stages asked for, the one that flags
    the pixel most); ``y``, ``x``: centre of the matched cell in that training
    image's crop pixels; ``box``: (top, left, bottom, right) crop pixels of the
    matched cell, widened by the averaged neighbourhood (``patch_pixels``);
    ``original_y``, ``original_x``, ``original_box``: the same in the training
    image's original pixels; ``distance``: squared L2 distance between the
    query pixel's and the matched pixel's features; ``pixel_score``: the
    pixel's raw heatmap score on that stage; ``query_y``, ``query_x``: the
    explained pixel (crop pixels of the scored image); ``stages``: the stages
    the explanation was asked for; ``approximate``: False only when no normal
    pixel is nearer (see the module docstring); ``searched_images``: training
    images whose real pixel features were compared (all of them for exact and
    IVF-Flat galleries, which store the real features; 0: only the gallery's
    own match was used); ``query_box``: the explained pixel's patch, as ``box`` is the match's (crop pixels).
    """

    train_index: int
    train_name: str
    stage: str
    y: int
    x: int
    original_y: int
    original_x: int
    box: tuple[int, int, int, int]
    original_box: tuple[int, int, int, int]
    distance: float
    pixel_score: float
    query_y: int
    query_x: int
    stages: tuple[str, ...]
    approximate: bool
    searched_images: int
    query_box: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class _Match:
    row: int
    distance: float
    approximate: bool
    searched_images: int


def strongest_stage(scored: ScoredSet, image_index: int, y: int, x: int, stages: Sequence[str],
                    normalisation: dict[str, maps.StageNormalisation], crop: int) -> str:
    """Of ``stages``, the one whose raw score at crop pixel (y, x) stands out most from its normal spread."""

    def strength(key: str) -> float:
        h, w = scored.raw[key].shape[1:]
        cy, cx = min(h - 1, int(y * h / crop)), min(w - 1, int(x * w / crop))
        norm = normalisation[key]
        return (float(scored.raw[key][image_index, cy, cx]) - norm.mean) / norm.std

    return max(stages, key=strength)


def explain_pixel(context: ExplainContext, scored: ScoredSet, image_index: int, y: int | None, x: int | None,
                  stages: tuple[str, ...], normalisation: dict[str, maps.StageNormalisation],
                  heatmap: Callable[[], np.ndarray], normal: ImageSet | None = None, exact: bool = True) -> Explanation:
    """:func:`explain` at crop pixel (y, x) of image ``image_index`` of ``scored``, on the stage of ``stages`` that
    flags it most; without (y, x), at the peak of ``heatmap()`` ((crop, crop), those stages combined).
    IndexError when the image or the pixel is outside the scored set or the crop."""
    n = len(scored.dn2)
    if not 0 <= image_index < n:
        raise IndexError(f"image_index {image_index} outside the last scored set of {n} images")
    crop = context.size.crop
    if y is None or x is None:
        y, x = maps.peak(heatmap())
    y, x = int(y), int(x)
    if not (0 <= y < crop and 0 <= x < crop):
        raise IndexError(f"pixel ({y}, {x}) outside the {crop}x{crop} crop")
    stage = strongest_stage(scored, image_index, y, x, stages, normalisation, crop)
    return explain(context, scored, image_index, stage, y, x, stages, normal, exact)


def explain(context: ExplainContext, scored: ScoredSet, image_index: int, stage: str, y: int, x: int,
            stages: tuple[str, ...], normal: ImageSet | None = None, exact: bool = True) -> Explanation:
    """The normal training patch nearest to crop pixel (y, x) of image ``image_index`` of ``scored``, on ``stage``.

    ``stages``: the stages the caller asked for (recorded in the answer);
    ``exact``: search real normal pixels (see the module docstring); False:
    the heatmap's own match, no backbone pass.
    """
    crop = context.size.crop
    h, w = context.index.shapes[stage]
    cy, cx = min(h - 1, int(y * h / crop)), min(w - 1, int(x * w / crop))
    pixel_score = float(scored.raw[stage][image_index, cy, cx])
    if exact:
        match = _nearest(context, scored, image_index, stage, cy, cx, normal)
    else:
        match = _cached(context, scored, image_index, stage, cy, cx)

    train_index, within = divmod(match.row, h * w)
    ty, tx = divmod(within, w)
    step_y, step_x = crop / h, crop / w
    reach = context.featurizer.reach(stage)

    def cell_box(row: int, column: int) -> tuple[int, int, int, int]:
        # The cell widened by the averaged neighbourhood: the patch its feature describes, in crop pixels.
        return (max(0, int(round((row - reach) * step_y))), max(0, int(round((column - reach) * step_x))),
                min(crop, int(round((row + 1 + reach) * step_y))), min(crop, int(round((column + 1 + reach) * step_x))))

    box = cell_box(ty, tx)
    centre_y, centre_x = (ty + 0.5) * step_y, (tx + 0.5) * step_x
    hw = tuple(int(v) for v in context.training.sizes[train_index])
    original_y, original_x = crop_point_to_original(centre_y, centre_x, hw, context.size)
    top, left = crop_point_to_original(box[0], box[1], hw, context.size, inclusive=False)
    bottom, right = crop_point_to_original(box[2], box[3], hw, context.size, inclusive=False)
    return Explanation(
        train_index=int(train_index),
        train_name=context.training.names[train_index],
        stage=stage,
        y=int(centre_y),
        x=int(centre_x),
        original_y=original_y,
        original_x=original_x,
        box=box,
        original_box=(top, left, max(bottom, top + 1), max(right, left + 1)),
        distance=match.distance,
        pixel_score=pixel_score,
        query_y=y,
        query_x=x,
        stages=stages,
        approximate=match.approximate,
        searched_images=match.searched_images,
        query_box=cell_box(cy, cx),
    )


def crop_point_to_original(
    y: float, x: float, original_hw: tuple[int, int], size: ImageSize, inclusive: bool = True
) -> tuple[int, int]:
    """A point in crop pixels -> (row, column) in the original image (clipped to it).

    Undoes the centre crop and the resize (or, with ``size.pad``, the letterbox).
    ``inclusive`` clips to the last pixel (a point); otherwise to the size (a box edge).
    """
    height, width = original_hw
    if size.pad:
        top, left, bottom, right = content_box(original_hw, size)
        oy, ox = (y - top) * height / (bottom - top), (x - left) * width / (right - left)
    else:
        oy = (y + size.crop_offset) * height / size.resize
        ox = (x + size.crop_offset) * width / size.resize
    if inclusive:
        return min(height - 1, max(0, int(oy))), min(width - 1, max(0, int(ox)))
    return min(height, max(0, int(round(oy)))), min(width, max(0, int(round(ox))))


# --------------------------------------------------------------------------- the search


def _cached(context: ExplainContext, scored: ScoredSet, image_index: int, stage: str, cy: int, cx: int) -> _Match:
    """The heatmap's own match (no backbone, no search): exact only for an exact gallery searching every image."""
    n = len(context.training)
    whole = context.index.kind == "exact" and (context.top_images == 0 or context.top_images >= n)
    return _Match(int(scored.nearest[stage][image_index, cy, cx]),
                  float(scored.raw[stage][image_index, cy, cx]) / context.k,
                  approximate=not (whole and context.k == 1), searched_images=n if whole else 0)


def _nearest(context: ExplainContext, scored: ScoredSet, image_index: int, stage: str, cy: int, cx: int,
             normal: ImageSet | None) -> _Match:
    """The nearest real normal pixel of ``stage`` to cell (cy, cx) of a scored image."""
    gallery = context.index.galleries[stage]
    kind = context.index.kind
    n = len(context.training)
    fallback = _cached(context, scored, image_index, stage, cy, cx)
    try:
        query = context.read_image(scored.images[image_index])[stage][cy, cx].float()
    except ImageError:
        return fallback  # the scored image is gone: the map's own match, not proven nearest
    if kind == "exact":
        distances, rows = gallery.search(query[None], 1)
        return _Match(int(rows[0, 0]), float(distances[0, 0]), approximate=False, searched_images=n)
    if kind == "ivf-flat":
        found = gallery.index.search(query[None].numpy(), 1, probe=gallery.index.lists)
        return _Match(int(found.indices[0, 0]), float(found.sq_distances[0, 0]), approximate=False, searched_images=n)
    real = context.index.real_pixels
    if real is not None:  # fitted in this process: every real pixel is still in memory
        distances, rows = real[stage].search(query[None], 1)
        return _Match(int(rows[0, 0]), float(distances[0, 0]), approximate=False, searched_images=n)
    if gallery.bounds is None:
        return fallback  # a model saved before exact explanations
    return _bounded_search(context, gallery, stage, query, normal, fallback)


def _bounded_search(context: ExplainContext, gallery, stage: str, query: torch.Tensor,
                    normal: ImageSet | None, fallback: _Match) -> _Match:
    """Read training images in order of their lower bound until none can hold a nearer pixel.

    Images are read ``_BATCH`` at a time (one backbone batch); an image is read
    only while its bound is below the best real distance found so far.
    """
    bounds = gallery.bounds.lower_bounds(query.numpy()).astype(np.float64) ** 2  # squared, like the distances
    order = [int(i) for i in np.argsort(bounds, kind="stable")]
    per = gallery.pixels_per_image
    sources = context.training.sources(normal)
    best_row, best = fallback.row, float("inf")
    searched, position = 0, 0
    while position < len(order) and bounds[order[position]] < best:
        chunk = []
        while position < len(order) and len(chunk) < _BATCH and bounds[order[position]] < best:
            chunk.append(order[position])
            position += 1
        if any(sources[i] is None for i in chunk) or searched + len(chunk) > MAX_IMAGES:
            # An image that could hold a nearer pixel cannot be read (or too many were): not proven.
            return fallback if searched == 0 else _Match(best_row, best, approximate=True, searched_images=searched)
        try:
            features = context.read_training(chunk, [sources[i] for i in chunk])
        except ImageError:
            return fallback if searched == 0 else _Match(best_row, best, approximate=True, searched_images=searched)
        for image, pixels in zip(chunk, features):
            distances = ((pixels[stage].reshape(per, -1) - query[None]) ** 2).sum(1)
            within = int(torch.argmin(distances))
            if float(distances[within]) < best:
                best_row, best = image * per + within, float(distances[within])
        searched += len(chunk)
    # Every image whose bound is below the best distance was read: none can hold a nearer pixel.
    return _Match(best_row, best, approximate=False, searched_images=searched)
