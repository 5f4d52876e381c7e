"""What SPADE computes on the demo bottle set, as a flat dict of arrays: the reference a refactor must reproduce.

``python -m tests.spade_reference OUT.npz`` writes it; ``tests/test_spade_reference.py`` recomputes it and
compares with the committed ``tests/data/spade_reference.npz``. Float32 extraction with the offline Lite0
weights, small inputs (96²) so it runs in seconds; every gallery kind, both aspects, both combinations,
every image-score rule, the scores the image threshold is set on (nuisance copies of a held-out set
included), pixel thresholds, explanations, and a save/load round trip.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from core.config import FeatureSettings, SpadeSettings
from core.datasets import read_mvtec
from core.detectors import load_detector
from core.detectors.spade import SpadeDetector

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo" / "bottle"
FEATURES = FeatureSettings(resize=96, crop=96, precision="float32", batch_size=8)

CASES = {
    "kmeans": SpadeSettings(features=FEATURES, n_means=64, calibration_images=4),
    "exact": SpadeSettings(features=FEATURES, gallery="exact", top_images=4, calibration_images=4, image_score="topk",
                           image_sigma=2.0),
    "ivfpq": SpadeSettings(features=FEATURES, gallery="ivf-pq", ivf_lists=8, pq_dims=8, calibration_images=4,
                           image_score="mix"),
    "pad-concat": SpadeSettings(features=dataclasses.replace(FEATURES, aspect="pad"), gallery="exact", top_images=0,
                                combine="concat", strides=(8, 16), calibration_images=4, image_score="max"),
    # The image threshold's evidence: nuisance copies of held-out normal images under the fused rule.
    "fused-nuisance-holdout": SpadeSettings(features=FEATURES, gallery="exact", calibration_images=4,
                                            image_score="fused", nuisance_copies=2),
}
HOLDOUT = {"fused-nuisance-holdout": range(16, 20)}
"""Cases fitted with a held-out normal set (indices of the demo's training images); the others calibrate on
fitted images."""


def compute() -> dict[str, np.ndarray]:
    """{name: array} of every case's outputs on the demo bottle set (16 normal images fit, every third test image)."""
    every_train, test = read_mvtec(DEMO)
    train = every_train.subset(range(16))
    test = test.subset(range(0, len(test), 3))
    out: dict[str, np.ndarray] = {}
    for name, settings in CASES.items():
        holdout = every_train.subset(HOLDOUT[name]) if name in HOLDOUT else None
        detector = SpadeDetector(settings).fit(train, holdout=holdout)
        out[f"{name}/train_scores"] = detector.train_scores_
        if detector.holdout_scores_ is not None:
            out[f"{name}/holdout_scores"] = detector.holdout_scores_
        for key, values in detector.raw_maps(test).items():
            out[f"{name}/raw/{key}"] = values
        # Every third pixel of the heatmaps: enough to catch any change, small enough to commit.
        out[f"{name}/heat"] = detector.combined_maps()[:, ::3, ::3]
        out[f"{name}/heat_sigma1_first"] = detector.combined_maps(stages=detector.map_stages[:1], sigma=1.0)[:, ::3, ::3]
        for rule in ("dn2", "max", "topk", "mix"):
            out[f"{name}/score/{rule}"] = detector.image_scores(rule)
        out[f"{name}/score"] = detector.score(test)
        out[f"{name}/threshold"] = np.array([detector.threshold_, detector.pixel_threshold(),
                                              detector.typical_pixel_score(),
                                              detector.pixel_threshold(detector.map_stages[-1:], 1.0)])
        for exact in (False, True):
            found = detector.explain(1, exact=exact)
            out[f"{name}/explain/{exact}"] = np.array(
                [found.train_index, *found.box, found.original_y, found.original_x, found.distance,
                 found.pixel_score, found.query_y, found.query_x, found.approximate, found.searched_images],
                dtype=np.float64)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.npz"
            detector.save(path)
            loaded = load_detector(path)
            out[f"{name}/loaded_heat"] = loaded.anomaly_maps(test)[:, ::3, ::3]
            out[f"{name}/loaded_score"] = loaded.score(test)
    return out


if __name__ == "__main__":
    np.savez_compressed(sys.argv[1], **compute())
