"""Synthetic defects, a letterboxed SPADE on non-square images, image-score rules and the tuner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import FeatureSettings, SpadeSettings
from core.datasets import ImageItem, ImageSet
from core.detectors.spade import SpadeDetector
from core.detectors.spade.image_score import mix_scores, peak_scores
from core.tuning import KINDS, paint, tune_spade
from core.tuning.search import geometry_candidates, synthetic_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stripes(seed: int, height: int, width: int) -> np.ndarray:
    """A striped, slightly noisy (H, W, 3) uint8 texture: normal images all look alike."""
    rng = np.random.default_rng(seed)
    x = np.arange(width)[None, :].repeat(height, 0)
    base = 128 + 60 * np.sin(2 * np.pi * x / 12 + rng.uniform(0, 2 * np.pi))
    return np.clip(base[..., None] + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- synthetic defects


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_mask_is_exactly_what_was_painted(kind):
    rng = np.random.default_rng(3)
    image = stripes(0, 120, 200)
    donor = stripes(1, 90, 90)
    for _ in range(5):
        defect = paint(image, [donor], rng, kind)
        assert defect.kind == kind
        assert defect.mask.shape == image.shape[:2] and defect.mask.dtype == bool
        # Nothing outside the mask changed, and the mask is not mostly untouched pixels.
        assert np.array_equal(defect.image[~defect.mask], image[~defect.mask])
        changed = (defect.image != image).any(axis=2)
        assert changed[defect.mask].mean() > 0.5
        assert 0 < defect.mask.mean() < 0.2  # small, like real defects


def test_synthetic_set_pairs_each_clean_image_with_painted_copies():
    holdout = ImageSet([ImageItem(f"n{i}.png", array=stripes(i, 64, 96)) for i in range(3)])
    images, masks = synthetic_set(holdout, [stripes(9, 64, 96)], seed=0, per_image=2)
    assert len(images) == len(masks) == 9
    assert list(images.labels) == [0, 1, 1] * 3
    for item, mask in zip(images, masks):
        assert mask.shape == item.array.shape[:2]
        assert mask.any() == bool(item.label)


# --------------------------------------------------------------------------- letterbox geometry


def test_non_square_defect_is_found_where_it_is_on_the_original_image():
    """Maps of a letterboxed SPADE line up with the original pixels of a 96x200 image."""
    features = FeatureSettings(weights="random", resize=128, crop=128, aspect="pad", device="cpu", batch_size=8)
    settings = SpadeSettings(features=features, strides=(4, 8), gallery="exact", top_images=4,
                             calibration_images=4, sigma=2.0, image_score="max")
    normal = ImageSet([ImageItem(f"n{i}.png", array=stripes(i, 96, 200)) for i in range(8)])
    damaged = stripes(50, 96, 200)
    damaged[30:50, 140:165] = (250, 30, 30)
    test = ImageSet([ImageItem("good.png", array=stripes(51, 96, 200), label=0),
                     ImageItem("bad.png", array=damaged, label=1)])
    detector = SpadeDetector(settings).fit(normal)
    heat = detector.anomaly_maps(test)
    original = detector.to_original(heat[1], 1)
    assert original.shape == (96, 200)
    y, x = np.unravel_index(np.nanargmax(original), original.shape)
    assert 22 <= y < 58 and 132 <= x < 173, (y, x)
    scores = detector.image_scores("max")
    assert scores[1] > scores[0]


# --------------------------------------------------------------------------- image-score rules


def test_peak_rules_read_only_inside_the_content_box():
    heat = np.zeros((2, 10, 10), np.float32)
    heat[:, 0, 0] = 100.0  # in the letterbox border
    heat[:, 5, 5] = 3.0
    boxes = [(2, 0, 8, 10), (2, 0, 8, 10)]
    assert np.allclose(peak_scores(heat, boxes, "max"), 3.0)
    assert np.allclose(peak_scores(heat, None, "max"), 100.0)
    assert peak_scores(heat, boxes, "topk")[0] <= 3.0


def test_mix_standardises_each_score_on_normal_references():
    dn2_ref, peak_ref = np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])
    mixed = mix_scores(np.array([2.0, 4.0]), np.array([20.0, 20.0]), dn2_ref, peak_ref)
    assert mixed[0] == pytest.approx(0.0)
    assert mixed[1] > mixed[0]


# --------------------------------------------------------------------------- the tuner


def test_geometry_candidates_follow_the_images():
    assert geometry_candidates([(900, 900)] * 3) == [(256, "stretch"), (384, "stretch"), (512, "stretch"), (640, "stretch")]
    # Small images may be enlarged up to twice their long side, never more.
    assert geometry_candidates([(120, 120)] * 3) == [(256, "stretch")]
    assert geometry_candidates([(200, 200)] * 3) == [(256, "stretch"), (384, "stretch")]
    wide = geometry_candidates([(150, 300), (160, 310)])
    assert (256, "pad") in wide and (512, "pad") in wide and (640, "pad") not in wide


def _write_mvtec(root: Path, poisoned: bool) -> Path:
    """A tiny MVTec-layout category; ``poisoned`` fills the test images with different (noise) content."""
    category = root / "part"
    for i in range(10):
        path = category / "train" / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(stripes(i, 48, 48)).save(path)
    rng = np.random.default_rng(99)
    for folder, label in (("good", 0), ("crack", 1)):
        for i in range(3):
            image = stripes(100 + i, 48, 48)
            if label:
                image[10:20, 10:20] = 250
            if poisoned:
                image = rng.integers(0, 255, image.shape, dtype=np.uint8)
            path = category / "test" / folder / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            if label:
                mask = np.zeros((48, 48), np.uint8)
                mask[10:20, 10:20] = 255
                mask_path = category / "ground_truth" / folder / f"{i:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(mask_path)
    return category


def test_tune_never_reads_the_test_set(tmp_path, monkeypatch):
    """The same normal images give the same tuning table whatever the test images hold."""
    from core.bench import BenchOptions, run_bench
    import core.tuning.search

    monkeypatch.setattr(core.tuning.search, "RESOLUTIONS", (64,))  # tiny images: keep the test quick

    params = {"features.device": "cpu", "features.batch_size": "8", "gallery": "exact", "calibration_images": "3",
              "top_images": "3"}
    options = BenchOptions(weights="random", params=params, tune=True)
    reports = [run_bench("spade", f"mvtec:{_write_mvtec(tmp_path / name, poisoned)}", options)
               for name, poisoned in (("clean", False), ("poisoned", True))]
    tables = [[{k: v for k, v in row.items() if k != "seconds_per_image"} for row in report["results"][0]["tuning"]["candidates"]]
              for report in reports]
    assert tables[0] == tables[1]
    assert reports[0]["results"][0]["tuning"]["reason"].split(";")[0] == reports[1]["results"][0]["tuning"]["reason"].split(";")[0]
    # ... while the scores on the two test sets do differ: the test images were read afterwards.
    assert reports[0]["results"][0]["pixel_auroc"] != reports[1]["results"][0]["pixel_auroc"]


def test_tuned_settings_are_saved_in_the_model(tmp_path):
    features = FeatureSettings(weights="random", device="cpu", batch_size=8)
    base = SpadeSettings(features=features, gallery="exact", top_images=3, calibration_images=3)
    normal = ImageSet([ImageItem(f"n{i}.png", array=stripes(i, 48, 64)) for i in range(10)])
    result = tune_spade(normal, base=base, max_fit=8, max_holdout=3, resolutions=(128,))
    assert result.settings.features.resize == 128 and result.settings.features.aspect in ("pad", "stretch")
    # The winner is within the deviation allowance of the best candidate (near-ties keep the base settings).
    from core.tuning.search import DEVIATION_COST

    assert result.chosen.objective >= max(c.objective for c in result.candidates) - 2 * DEVIATION_COST
    assert result.reason
    detector = SpadeDetector(result.settings)
    detector.tuning_ = result.summary()
    detector.fit(normal)
    path = detector.save(tmp_path / "tuned.npz")
    from core.detectors import load_detector

    loaded = load_detector(path)
    assert loaded.settings == result.settings
    assert loaded.tuning_["chosen"] == result.summary()["chosen"]


def test_letterbox_or_squash_is_decided_at_the_smallest_input_and_kept_for_larger_ones():
    features = FeatureSettings(weights="random", device="cpu", batch_size=8)
    base = SpadeSettings(features=features, gallery="exact", top_images=3, calibration_images=3)
    normal = ImageSet([ImageItem(f"n{i}.png", array=stripes(i, 40, 96)) for i in range(10)])
    result = tune_spade(normal, base=base, max_fit=8, max_holdout=3, resolutions=(64, 96))
    at_64 = {c.aspect for c in result.candidates if c.resolution == 64}
    at_96 = {c.aspect for c in result.candidates if c.resolution == 96}
    assert at_64 == {"pad", "stretch"}
    best_at_64 = max((c for c in result.candidates if c.resolution == 64), key=lambda c: c.objective)
    assert at_96 == {best_at_64.aspect}
    assert set(result.geometry_seconds) == {"64/pad", "64/stretch", f"96/{best_at_64.aspect}"}


@pytest.mark.parametrize("objectives, tried", [
    ({256: 0.90, 384: 0.901, 512: 0.902, 640: 0.99}, [256, 384, 512]),  # two larger sizes lost: 640² is skipped
    ({256: 0.90, 384: 0.95, 512: 0.951, 640: 0.952}, [256, 384, 512, 640]),  # 384² won: two more are tried
])
def test_larger_inputs_stop_after_two_in_a_row_do_not_win(monkeypatch, objectives, tried):
    import core.tuning.search as search

    evaluated = []

    def fake_geometry(settings, fit_set, synthetic, masks, eval_side, cancel):
        side = settings.features.resize
        evaluated.append(side)
        value = objectives[side]
        return [search.Candidate(side, "stretch", (4, 8, 16), 4.0, "dn2", value, value, value, side / 1000)], 0.0

    monkeypatch.setattr(search, "_evaluate_geometry", fake_geometry)
    normal = ImageSet([ImageItem(f"n{i}.png", array=stripes(i, 48, 48)) for i in range(10)])
    monkeypatch.setattr(search, "_sizes", lambda images: [(900, 900)] * len(images))
    result = search.tune_spade(normal, base=SpadeSettings(features=FeatureSettings(weights="random")), max_holdout=3)
    assert evaluated == tried
    assert result.chosen.resolution == (256 if tried[-1] == 512 else 384)


def test_the_image_score_may_read_another_sigma_when_that_ranks_images_clearly_better():
    from dataclasses import replace

    from core.tuning.search import Candidate, _choose

    base = SpadeSettings(strides=(4, 16), sigma=4.0)
    # DeepPCB's 640² table, rounded: σ 4 locates best, σ 2 ranks the boards best.
    sigma4 = Candidate(640, "stretch", (4, 16), 4.0, "topk", 0.9035, 0.8662, 0.8342, 0.3)
    sigma2 = Candidate(640, "stretch", (4, 16), 2.0, "topk", 0.8934, 0.8610, 0.8528, 0.3)
    both = replace(sigma4, image_auroc=0.8528, image_sigma=2.0)
    chosen, reason = _choose([sigma4, sigma2, both], base)
    assert chosen == both and "on the σ 2 heatmap" in reason
    # A gain in image AUROC smaller than the cost of one octave keeps the score on the shown heatmap.
    marginal = replace(sigma4, image_auroc=sigma4.image_auroc + 0.002, image_sigma=2.0)
    assert _choose([sigma4, marginal], base)[0] == sigma4


def test_choice_keeps_the_base_settings_on_a_near_tie_and_cheap_geometry_unless_beaten_clearly():
    from core.tuning.search import DEVIATION_COST, GAIN_FOR_COST, Candidate, _choose

    base = SpadeSettings(strides=(4, 8, 16), sigma=4.0)

    def candidate(resolution, strides, sigma, objective, seconds=0.1):
        return Candidate(resolution, "stretch", strides, sigma, "max", objective, objective, objective, seconds)

    default = candidate(256, (4, 8, 16), 4.0, 0.950)
    near_tie = candidate(256, (4, 16), 2.0, 0.950 + DEVIATION_COST)  # two changes, gain below their cost
    assert _choose([default, near_tie], base)[0] == default
    clear_win = candidate(256, (4, 16), 2.0, 0.950 + 3 * DEVIATION_COST)
    assert _choose([default, clear_win], base)[0] == clear_win
    dearer = candidate(512, (4, 8, 16), 4.0, 0.950 + GAIN_FOR_COST / 2, seconds=0.4)
    assert _choose([default, dearer], base)[0] == default
    much_better = candidate(512, (4, 8, 16), 4.0, 0.950 + 2 * GAIN_FOR_COST, seconds=0.4)
    chosen, reason = _choose([default, much_better], base)
    assert chosen == much_better and "512²" in reason


def test_best_candidates_are_the_rows_both_the_cli_and_the_page_show():
    from core.cli.tune import table
    from core.tuning import best_candidates

    def candidate(objective, image_sigma=None):
        return {"resolution": 256, "aspect": "stretch", "strides": [4, 8, 16], "sigma": 4.0, "image_score": "max",
                "image_sigma": image_sigma, "pixel_auroc": 0.981234, "pro": 0.9, "image_auroc": 1.0,
                "objective": objective, "seconds_per_image": 0.0404}

    summary = {"candidates": [candidate(0.5), candidate(0.9, image_sigma=2.0), candidate(0.7)]}
    rows = best_candidates(summary, rows=2)
    assert [row["mean"] for row in rows] == [0.9, 0.7]  # best first, cut at rows
    assert [row["its σ"] for row in rows] == [2.0, 4.0]  # its own σ, else the heatmap's
    assert rows[0]["pixel AUROC"] == 0.9812 and rows[0]["s / image"] == 0.04
    lines = table(summary, rows=2).splitlines()
    assert len(lines) == 3 and lines[0].split()[:2] == ["input", "aspect"]
    assert "0.9812" in lines[1] and lines[1].split()[5] == "2"
    assert best_candidates({}, rows=3) == [] and table({}) == "(no candidates)"
