"""The nearest-normal explanation's box is the most similar normal patch anywhere in the stage's gallery:
checked by brute force over every pixel of every normal image at the stage the explanation chose."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core import projects


def brute_force_match(detector, normal, test_item, stage: str, y: int, x: int):
    """(image, row, column, squared distance) of the normal pixel of ``stage`` nearest to crop pixel (y, x) of
    ``test_item``, compared with every pixel of every normal image (features as the detector computes them)."""
    context = detector.explain_context()
    h, w = detector.stage_shapes_[stage]
    crop = detector.image_size.crop
    cy, cx = min(h - 1, int(y * h / crop)), min(w - 1, int(x * w / crop))
    query = context.read_image(test_item)[stage][cy, cx].float()
    best = (None, None, None, float("inf"))
    for index, item in enumerate(normal):
        pixels = context.read_image(item)[stage].float()  # (h, w, C)
        distances = ((pixels - query) ** 2).sum(-1)
        flat = int(torch.argmin(distances))
        if float(distances.flatten()[flat]) < best[3]:
            best = (index, *divmod(flat, w), float(distances.flatten()[flat]))
    return best


def expected_box(detector, stage: str, ty: int, tx: int) -> tuple[int, int, int, int]:
    """The matched cell widened by the averaged neighbourhood, in crop pixels (what the page draws)."""
    h, w = detector.stage_shapes_[stage]
    crop = detector.image_size.crop
    reach = detector.featurizer.reach(stage)
    step_y, step_x = crop / h, crop / w
    return (max(0, int(round((ty - reach) * step_y))), max(0, int(round((tx - reach) * step_x))),
            min(crop, int(round((ty + 1 + reach) * step_y))), min(crop, int(round((tx + 1 + reach) * step_x))))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """SPADE (exact gallery, K = 2 nearest images for the heatmap) on 8 normal bottles, scored on 3 defective."""
    from conftest import DEMO_BOTTLE
    from core.config import SpadeSettings, settings_for
    from core.datasets import read_mvtec
    from core.detectors.spade import SpadeDetector

    train, test = read_mvtec(DEMO_BOTTLE)
    normal = train.subset(range(8))
    defective = test.subset([i for i, item in enumerate(test) if item.group != "good"][:3])
    settings = settings_for(SpadeSettings, backbone="efficientnet_lite0",
                            params={"features.resize": "128", "features.crop": "128", "top_images": "2",
                                    "gallery": "exact"})
    detector = SpadeDetector(settings).fit(normal)
    detector.score(defective)
    return detector, normal, defective


@pytest.mark.parametrize("ticked", ["all", "one"])
def test_the_box_is_the_nearest_normal_patch_by_brute_force(fitted, ticked):
    detector, normal, defective = fitted
    stages = list(detector.map_stages) if ticked == "all" else [detector.map_stages[0]]
    for index in range(len(defective)):
        found = projects.explain_pixel(detector, index, *_peak(detector, index, stages), stages, exact=True)
        assert not found.approximate and found.stage in stages
        image, ty, tx, distance = brute_force_match(detector, normal, defective[index], found.stage,
                                                    found.query_y, found.query_x)
        assert found.distance == pytest.approx(distance, rel=2e-2, abs=1e-3)  # float16 gallery
        h, w = detector.stage_shapes_[found.stage]
        crop = detector.image_size.crop
        query_cell = (min(h - 1, int(found.query_y * h / crop)), min(w - 1, int(found.query_x * w / crop)))
        assert found.query_box == expected_box(detector, found.stage, *query_cell)  # the zoomed peak patch
        if (found.train_index, found.box) != (image, expected_box(detector, found.stage, ty, tx)):
            # A tie within float16 rounding may pick another pixel: then its distance must be as small.
            assert found.distance <= distance * 1.02 + 1e-3, (found, image, ty, tx, distance)
        else:
            assert found.train_name == detector.train_names_[image]


def _peak(detector, index: int, stages: list[str]) -> tuple[int, int]:
    heatmap = detector.combined_maps(stages=stages, indices=[index])[0]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(heatmap)), heatmap.shape))
