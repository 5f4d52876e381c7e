"""Explanations: the normal training patch nearest to one pixel of a scored image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from core import maps

if TYPE_CHECKING:  # the detector calls in here; importing it at run time would be a loop
    from core.detectors.spade.detector import SpadeDetector


@dataclass(frozen=True)
class Explanation:
    """The normal training patch closest to one pixel of a scored image.

    ``train_index``/``train_name``: the training image; ``stage``: the stage whose
    neighbour is reported; ``y``, ``x``: centre of the matched cell in that
    training image's crop pixels, ``original_y``, ``original_x`` the same point
    in its original pixels; ``box``: (top, left, bottom, right) crop pixels of
    the matched cell (widened by the averaged neighbourhood, ``patch_pixels``);
    ``distance``: the pixel's raw score on that stage (sum of squared L2 over k);
    ``query_y``, ``query_x``: the explained pixel (crop pixels of the scored
    image); ``approximate``: True with a K-means gallery, where the match is the
    real pixel that represents the nearest centre.
    """

    train_index: int
    train_name: str
    stage: str
    y: int
    x: int
    original_y: int
    original_x: int
    box: tuple[int, int, int, int]
    distance: float
    query_y: int
    query_x: int
    approximate: bool


def explain(
    detector: "SpadeDetector", image_index: int, y: int | None = None, x: int | None = None, stage: str | None = None
) -> Explanation:
    """See :meth:`SpadeDetector.explain`."""
    last = detector._require_last()
    n = len(last.dn2)
    if not 0 <= image_index < n:
        raise IndexError(f"image_index {image_index} outside the last scored set of {n} images")
    crop = detector.image_size.crop
    if y is None or x is None:
        y, x = maps.peak(detector.combined_maps(indices=[image_index])[0])
    if not (0 <= y < crop and 0 <= x < crop):
        raise IndexError(f"pixel ({y}, {x}) outside the {crop}x{crop} crop")

    def cell(key: str) -> tuple[int, int]:
        h, w = detector.stage_shapes_[key]
        return min(h - 1, int(y * h / crop)), min(w - 1, int(x * w / crop))

    if stage is None:
        def strength(key: str) -> float:
            norm = detector.normalisation_[key]
            return (float(last.raw[key][(image_index, *cell(key))]) - norm.mean) / norm.std

        stage = max(detector.stages_, key=strength)
    elif stage not in detector.stages_:
        raise KeyError(f"stage {stage!r} not available; this model has {list(detector.stages_)}")
    cy, cx = cell(stage)
    h, w = detector.stage_shapes_[stage]
    row = int(last.nearest[stage][image_index, cy, cx])
    train_index, within = divmod(row, h * w)
    ty, tx = divmod(within, w)
    step_y, step_x = crop / h, crop / w
    reach = max(detector.patch_cells(name) for name in detector.backbone_stages() if name in stage.split("+")) // 2
    box = (
        max(0, int(round((ty - reach) * step_y))), max(0, int(round((tx - reach) * step_x))),
        min(crop, int(round((ty + 1 + reach) * step_y))), min(crop, int(round((tx + 1 + reach) * step_x))),
    )
    centre_y, centre_x = (ty + 0.5) * step_y, (tx + 0.5) * step_x
    size = detector.image_size
    height, width = (int(v) for v in detector.train_sizes_[train_index])
    original_y = min(height - 1, int((centre_y + size.crop_offset) * height / size.resize))
    original_x = min(width - 1, int((centre_x + size.crop_offset) * width / size.resize))
    return Explanation(
        train_index=int(train_index),
        train_name=detector.train_names_[train_index],
        stage=stage,
        y=int(centre_y),
        x=int(centre_x),
        original_y=original_y,
        original_x=original_x,
        box=box,
        distance=float(last.raw[stage][image_index, cy, cx]),
        query_y=int(y),
        query_x=int(x),
        approximate=detector.settings.gallery == "kmeans",
    )
