"""Synthetic defects, a letterboxed SPADE on non-square images, image-score rules and the tuner."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import FeatureSettings, SpadeSettings
from core.datasets import ImageItem, ImageSet
from core.detectors.spade import SpadeDetector
from core.detectors.spade.image_score import mix_scores, peak_scores
from core.tuning import KINDS, paint, tune_spade
from core.nuisance import Variation
from core.tuning.proxy import CLEAN, NUISANCE, PAINTED, proxy_set
from core.tuning.search import geometry_candidates

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


def test_proxy_set_pairs_each_clean_image_with_painted_and_nuisance_copies():
    holdout = ImageSet([ImageItem(f"n{i}.png", array=stripes(i, 64, 96)) for i in range(3)])
    variation = Variation(brightness=0.05, contrast=0.05, sharpness=0.0)
    proxy = proxy_set(holdout, [stripes(9, 64, 96)], variation, seed=0, eval_side=48, per_image=2)
    assert len(proxy.images) == len(proxy.masks) == 12
    assert list(proxy.roles) == [CLEAN, PAINTED, PAINTED, NUISANCE] * 3
    assert list(proxy.labels) == [0, 1, 1, 0] * 3
    for item, mask, role in zip(proxy.images, proxy.masks, proxy.roles):
        assert mask.shape == (32, 48)  # the evaluation size keeps the aspect ratio
        assert mask.any() == (role == PAINTED) == bool(item.label)
    # Without a variation there are no nuisance copies.
    assert NUISANCE not in proxy_set(holdout, [stripes(9, 64, 96)], None, seed=0, eval_side=48).roles


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

    # The defaults the tuner starts from at the same tiny size, so its reference candidate is quick too.
    params = {"features.device": "cpu", "features.batch_size": "8", "gallery": "exact", "calibration_images": "3",
              "top_images": "3", "features.resize": "64", "features.crop": "64"}
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
    from core.tuning.search import IMAGE_RULE, POOLED

    features = FeatureSettings(weights="random", device="cpu", batch_size=8)
    base = SpadeSettings(features=dataclasses.replace(features, resize=128, crop=128), gallery="exact", top_images=3,
                         calibration_images=3)
    normal = ImageSet([ImageItem(f"n{i}.png", array=stripes(i, 48, 64)) for i in range(10)])
    result = tune_spade(normal, base=base, max_fit=8, max_holdout=3, resolutions=(128,))
    assert result.settings.features.resize == 128 and result.settings.features.aspect in ("pad", "stretch")
    # Whatever the synthetic defects say, the image score is the fixed rule, read at DN2's geometry.
    assert result.settings.image_score == IMAGE_RULE and result.settings.pooled == POOLED
    assert result.settings.nuisance_copies > 0  # the working point saw the line's normal variation
    assert result.reason and result.reference.resolution == 128
    assert result.kept_base == (result.chosen == result.reference)
    detector = SpadeDetector(result.settings)
    detector.tuning_ = result.summary()
    detector.fit(normal)
    path = detector.save(tmp_path / "tuned.npz")
    from core.detectors import load_detector

    loaded = load_detector(path)
    assert loaded.settings == result.settings
    assert loaded.tuning_["chosen"] == result.summary()["chosen"]
    assert loaded.tuning_["kept_base"] == result.kept_base


def test_letterbox_or_squash_is_decided_at_the_smallest_input_and_kept_for_larger_ones():
    features = FeatureSettings(weights="random", device="cpu", batch_size=8, resize=64, crop=64)
    base = SpadeSettings(features=features, gallery="exact", top_images=3, calibration_images=3)
    normal = ImageSet([ImageItem(f"n{i}.png", array=stripes(i, 40, 96)) for i in range(10)])
    result = tune_spade(normal, base=base, max_fit=8, max_holdout=3, resolutions=(64, 96))
    at_64 = {c.aspect for c in result.candidates if c.resolution == 64}
    at_96 = {c.aspect for c in result.candidates if c.resolution == 96}
    assert at_64 == {"pad", "stretch"}
    from core.tuning.search import _merit

    best_at_64 = max((c for c in result.candidates if c.resolution == 64), key=lambda c: _merit(c, base))
    assert at_96 == {best_at_64.aspect}
    assert {k for k in result.geometry_seconds if not k.endswith("/gaussian")} == {"64/pad", "64/stretch",
                                                                                   f"96/{best_at_64.aspect}"}
    # The per-cell Gaussian is tried once, at the best geometry, and its candidates compete with the rest.
    gaussian = [c for c in result.candidates if c.gallery == "gaussian"]
    assert gaussian and len({c.geometry for c in gaussian}) == 1
    assert sum(k.endswith("/gaussian") for k in result.geometry_seconds) == 1


def _candidate(resolution, strides=(4, 8, 16), sigma=4.0, objective=0.9, seconds=0.1, aspect="stretch"):
    from core.tuning.proxy import Candidate

    return Candidate(resolution, aspect, tuple(strides), sigma, "fused", objective, objective, 0.9, seconds)


@pytest.mark.parametrize("objectives, tried", [
    ({256: 0.90, 384: 0.901, 512: 0.902, 640: 0.99}, [256, 384, 512]),  # two larger sizes lost: 640² is skipped
    ({256: 0.90, 384: 0.95, 512: 0.951, 640: 0.952}, [256, 384, 512, 640]),  # 384² won: two more are tried
])
def test_larger_inputs_stop_after_two_in_a_row_do_not_win(monkeypatch, objectives, tried):
    import core.tuning.search as search

    evaluated = []

    def fake(settings, fit_set, proxy, cancel):
        side = settings.features.resize
        if settings.gallery != "kmeans":  # the second gallery, tried at the winner: not a new size
            return None, []
        evaluated.append(side)
        return None, [(_candidate(side, objective=objectives[side], seconds=side / 1000), None)]

    monkeypatch.setattr(search, "_fit_and_evaluate", fake)
    monkeypatch.setattr(search, "paired_margin", lambda *args: search.Margin(0.05, 0.001, 1.0))
    normal = ImageSet([ImageItem(f"n{i}.png", array=stripes(i, 48, 48)) for i in range(10)])
    monkeypatch.setattr(search, "_sizes", lambda images: [(900, 900)] * len(images))
    features = FeatureSettings(weights="random", resize=256, crop=256)
    result = search.tune_spade(normal, base=SpadeSettings(features=features), max_holdout=3)
    assert evaluated == tried
    assert result.chosen.resolution == (256 if tried[-1] == 512 else 384)


def _counts(gain: float, noise: float, seed: int):
    """PixelCounts of 40 images, 20 with a defect region whose pixels sit ``gain`` above the normal ones."""
    from core.tuning.pixel_counts import pixel_counts

    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for image in range(40):
        mask = np.zeros((16, 16), bool)
        if image >= 20:
            mask[4:8, 4:8] = True
        masks.append(mask)
        maps.append((rng.normal(0, 1, (16, 16)) + mask * (1.0 + gain + rng.normal(0, noise))).astype(np.float32))
    return pixel_counts(masks, maps)


def test_a_departure_must_beat_the_base_settings_by_more_than_the_bootstrap_noise():
    from core.tuning.proxy import PAINTED as P, Evidence, ProxySet
    from core.tuning.search import MARGIN_Z, choose

    base = SpadeSettings(features=FeatureSettings(resize=256, crop=256))
    reference = _candidate(256, objective=0.90)
    challenger = _candidate(512, objective=0.95, seconds=0.4)
    roles = np.array([CLEAN] * 20 + [P] * 20)
    proxy = ProxySet(ImageSet([ImageItem(f"i{i}", array=np.zeros((4, 4, 3), np.uint8)) for i in range(40)]), roles, [])
    same = _counts(0.0, 0.5, seed=1)
    evidence = {reference: Evidence(same, np.zeros(40)), challenger: Evidence(_counts(0.0, 0.5, seed=2), np.zeros(40))}
    chosen, ref, margin, reason = choose([reference, challenger], base, evidence, proxy)
    # Two equally good maps: whatever the point estimates say, the gain is within the noise.
    assert chosen == reference == ref and margin.z < MARGIN_Z and "kept the base settings" in reason
    evidence[challenger] = Evidence(_counts(3.0, 0.1, seed=2), np.zeros(40))
    chosen, _, margin, reason = choose([reference, challenger], base, evidence, proxy)
    assert chosen == challenger and margin.z > MARGIN_Z and margin.wins > 0.95 and reason.startswith("chose 512²")


def test_near_ties_keep_the_base_settings_and_a_dearer_geometry_must_win_clearly():
    from core.tuning.search import DEVIATION_COST, GAIN_FOR_COST, best_by_merit

    base = SpadeSettings(features=FeatureSettings(resize=256, crop=256))
    default = _candidate(256, objective=0.950)
    near_tie = _candidate(256, (4, 16), 2.0, 0.950 + DEVIATION_COST)  # two changes, gain below their cost
    assert best_by_merit([default, near_tie], base) == default
    clear_win = _candidate(256, (4, 16), 2.0, 0.950 + 3 * DEVIATION_COST)
    assert best_by_merit([default, clear_win], base) == clear_win
    dearer = _candidate(512, objective=0.950 + GAIN_FOR_COST / 2, seconds=0.4)
    assert best_by_merit([default, dearer], base) == default
    much_better = _candidate(512, objective=0.950 + 2 * GAIN_FOR_COST, seconds=0.4)
    assert best_by_merit([default, much_better], base) == much_better


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
