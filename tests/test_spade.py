"""SPADE detector: shapes, a synthetic defect, cached recombination, explanations, persistence, limits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import FeatureSettings, SpadeSettings
from core.backbones import WeightsUnavailableError
from core.datasets import ImageItem, ImageSet, read_mvtec
from core.detectors import ModelFileError, NotFittedError, load_detector, make_detector
from core.detectors.spade import GalleryTooLargeError, SpadeDetector
from core.detectors.spade.raw_cache import CacheEntry, RawCache
from core.images import preprocess_mask
from core.metrics import pixel_auroc
from core.progress import Cancelled

FEATURES = FeatureSettings(weights="random", resize=64, crop=64, device="cpu", batch_size=8)
BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def texture(seed: int, size: int = 96) -> np.ndarray:
    """A striped, slightly noisy (size, size, 3) uint8 image: every normal image looks alike."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi)
    base = 128 + 60 * np.sin(2 * np.pi * x / 12 + phase)
    image = base[..., None] + rng.normal(0, 6, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


DEFECT = (slice(36, 60), slice(48, 72))  # rows, columns in the 96-pixel image


def with_defect(image: np.ndarray) -> np.ndarray:
    damaged = image.copy()
    damaged[DEFECT] = (250, 30, 30)
    return damaged


def normal_set(n: int = 10) -> ImageSet:
    return ImageSet([ImageItem(f"normal/{i}.png", array=texture(i)) for i in range(n)], name="normal")


def probe_set() -> ImageSet:
    items = [ImageItem("test/good.png", array=texture(100), label=0),
             ImageItem("test/bad.png", array=with_defect(texture(101)), label=1)]
    return ImageSet(items, name="test")


def settings(**changes) -> SpadeSettings:
    base = SpadeSettings(features=FEATURES, strides=(4, 8, 16), gallery="exact", top_images=4, calibration_images=4, sigma=4.0)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def fitted() -> SpadeDetector:
    return SpadeDetector(settings()).fit(normal_set())


# --------------------------------------------------------------------------- contract and shapes


def test_settings_are_validated():
    with pytest.raises(ValueError, match="gallery"):
        SpadeSettings(gallery="nope")
    with pytest.raises(ValueError, match="patch_pixels"):
        SpadeSettings(patch_pixels=-1)
    with pytest.raises(ValueError, match="top_images"):
        SpadeSettings(top_images=-1)
    with pytest.raises(ValueError, match="strides"):
        SpadeSettings(strides=())


def test_scoring_before_fit_raises():
    detector = make_detector("spade", settings())
    with pytest.raises(NotFittedError):
        detector.anomaly_maps(probe_set())
    with pytest.raises(NotFittedError):
        detector.score(probe_set())


def test_shapes_and_fitted_attributes(fitted):
    assert fitted.stages_ == ("block1", "block2", "block4")  # strides 4, 8, 16 on Lite
    assert fitted.stage_shapes_ == {"block1": (16, 16), "block2": (8, 8), "block4": (4, 4)}
    images = probe_set()
    heat = fitted.anomaly_maps(images)
    assert heat.shape == (2, 64, 64) and heat.dtype == np.float32
    raw = fitted.raw_maps(images)
    assert {key: value.shape for key, value in raw.items()} == {"block1": (2, 16, 16), "block2": (2, 8, 8), "block4": (2, 4, 4)}
    scores = fitted.score(images)
    assert scores.shape == (2,) and scores.dtype == np.float64
    np.testing.assert_array_equal(fitted.image_scores("dn2"), scores)  # the default image score
    np.testing.assert_allclose(fitted.image_scores("max"), heat.reshape(2, -1).max(axis=1))
    assert fitted.train_scores_.shape == (10,) and fitted.threshold_ is not None
    assert set(fitted.calibration_) == set(fitted.stages_)
    assert all(value.shape[0] == 4 for value in fitted.calibration_.values())


def test_other_resolution_and_concat():
    features = dataclasses.replace(FEATURES, resize=48, crop=40)
    detector = SpadeDetector(settings(features=features, strides=(8, 16), combine="concat")).fit(normal_set(6))
    assert detector.stages_ == ("block2+block4",)
    assert detector.stage_shapes_ == {"block2+block4": (5, 5)}
    assert detector.anomaly_maps(probe_set()).shape == (2, 40, 40)


def test_synthetic_defect_lights_up_its_region():
    # Pretrained Lite0 weights: random ones spread a defect over the whole 64-pixel crop.
    try:
        detector = SpadeDetector(settings(features=dataclasses.replace(FEATURES, weights=None))).fit(normal_set())
    except WeightsUnavailableError as error:
        pytest.skip(f"pretrained Lite0 weights unavailable: {error}")
    heat = detector.anomaly_maps(probe_set())
    mask = np.zeros((96, 96), bool)
    mask[DEFECT] = True
    mask = preprocess_mask(mask, detector.image_size)
    bad = heat[1]
    assert mask[np.unravel_index(np.argmax(bad), bad.shape)], "the hottest pixel lies outside the defect"
    assert bad[mask].mean() > 2 * bad[~mask].mean()
    assert bad.max() > 3 * heat[0].max()
    assert pixel_auroc(mask[None], bad[None]) > 0.9
    scores = detector.score(probe_set())
    assert scores[1] > scores[0]


def test_pixel_threshold_is_calibrated_on_normal_pixels(fitted):
    threshold = fitted.pixel_threshold()
    calibration = fitted.combine(fitted.calibration_)
    share = float((calibration > threshold).mean())
    assert share <= fitted.settings.pixel_fpr + 1e-9
    heat = fitted.anomaly_maps(probe_set())
    mask = fitted.threshold_mask(heat)
    assert mask.dtype == bool and mask[1].sum() > mask[0].sum()
    # Other σ / stage choices get their own threshold.
    assert fitted.pixel_threshold(stages=("block4",), sigma=0) != threshold
    scale = fitted.colour_scale()
    assert scale.vmin < threshold < scale.vmax


# --------------------------------------------------------------------------- cached recombination


def test_recombination_from_cache_equals_a_full_recompute(fitted, monkeypatch):
    images = probe_set()
    fitted.anomaly_maps(images)
    recombined = fitted.combined_maps(stages=("block2", "block4"), sigma=2.0)
    # A model fitted with only those stages and that σ computes the same maps from scratch.
    fresh = SpadeDetector(settings(strides=(8, 16), sigma=2.0)).fit(normal_set())
    np.testing.assert_allclose(fresh.anomaly_maps(images), recombined, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitted.combined_maps(indices=[1]), fitted.combined_maps()[1:2])

    # Scoring the same images again never touches the backbone.
    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran for cached images")

    monkeypatch.setattr(fitted, "extractor", no_backbone)
    again = fitted.raw_maps(images)
    assert set(again) == set(fitted.stages_)


def test_raw_cache_is_bounded_and_least_recently_used():
    cache = RawCache(max_bytes=100)
    for key in "abc":
        cache.put(key, CacheEntry({}, {}, 0.0, 40))
    assert len(cache) == 2 and cache.get("a") is None and cache.used == 80
    cache.get("b")
    cache.put("d", CacheEntry({}, {}, 0.0, 40))
    assert cache.get("b") is not None and cache.get("c") is None


# --------------------------------------------------------------------------- explanations


def test_explanation_points_at_the_matching_training_image():
    normal = normal_set(8)
    detector = SpadeDetector(settings(top_images=0)).fit(normal)
    # A test image that is training image 5 plus a defect: its undamaged pixels match image 5 exactly.
    probe = ImageSet([ImageItem("probe.png", array=with_defect(texture(5)))])
    heat = detector.anomaly_maps(probe)
    explanation = detector.explain(0, y=8, x=8, stages=("block1",))
    assert explanation.train_index == 5 and explanation.train_name == "normal/5.png"
    assert abs(explanation.y - 8) <= 4 and abs(explanation.x - 8) <= 4
    assert explanation.distance < 1e-3 and not explanation.approximate and explanation.stage == "block1"
    assert 0 <= explanation.original_y < 96 and 0 <= explanation.original_x < 96
    top, left, bottom, right = explanation.box
    assert top <= explanation.y < bottom and left <= explanation.x < right
    # Without a pixel, the heatmap's peak is explained, by the stage that flags it most.
    peak = detector.explain(0)
    assert heat[0, peak.query_y, peak.query_x] == heat[0].max()
    assert peak.stage in detector.stages_ and 0 <= peak.train_index < 8
    assert not peak.approximate
    with pytest.raises(IndexError):
        detector.explain(3)


MARK_COLOURS = [(230, 40, 40), (40, 200, 60), (40, 60, 230), (230, 200, 30), (200, 40, 200), (30, 200, 200),
                (250, 250, 250), (10, 10, 10)]
MARK_SPOTS = [(10, 10), (10, 60), (60, 10), (60, 60), (35, 35), (10, 35), (60, 35), (35, 10)]


def marked(i: int) -> np.ndarray:
    """Normal image i: the striped texture with a 12-pixel square of its own colour at its own place."""
    image = texture(i)
    top, left = MARK_SPOTS[i]
    image[top + 8 : top + 20, left + 8 : left + 20] = MARK_COLOURS[i]
    return image


def boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("gallery", ["exact", "kmeans", "ivf-pq"])
def test_a_patch_pasted_from_a_normal_image_is_explained_by_that_image_at_its_place(gallery):
    # Pretrained Lite0: random weights do not tell the coloured marks apart.
    features = dataclasses.replace(FEATURES, weights=None)
    normal = ImageSet([ImageItem(f"normal/{i}.png", array=marked(i)) for i in range(8)], name="normal")
    try:
        detector = SpadeDetector(settings(features=features, gallery=gallery, n_means=32, calibration_images=2,
                                          top_images=0)).fit(normal)
    except WeightsUnavailableError as error:
        pytest.skip(f"pretrained Lite0 weights unavailable: {error}")
    source = 3  # a 28-pixel patch around image 3's mark, pasted elsewhere into an unmarked image
    top, left = MARK_SPOTS[source]
    probe = texture(100)
    probe[34:62, 4:32] = marked(source)[top : top + 28, left : left + 28]
    detector.anomaly_maps(ImageSet([ImageItem("probe.png", array=probe)]))
    scale = 64 / 96  # the 96-pixel images are resized to the 64-pixel crop
    mark_original = (top + 8, left + 8, top + 20, left + 20)
    mark_crop = tuple(int(v * scale) for v in mark_original)
    pasted_crop = (int(34 * scale), int(4 * scale), int(62 * scale), int(32 * scale))
    for stages in (("block1",), ("block2",)):
        found = detector.explain(0, y=int(48 * scale), x=int(18 * scale), stages=stages)
        assert found.stage == stages[0] and found.stages == stages
        assert found.train_index == source and found.train_name == "normal/3.png", (gallery, stages, found)
        assert not found.approximate
        assert boxes_overlap(found.box, mark_crop), (found.box, mark_crop)
        assert not boxes_overlap(found.box, pasted_crop)  # the source's place, not where it was pasted
        assert boxes_overlap(found.original_box, mark_original), (found.original_box, mark_original)
        assert found.box[0] <= found.y < found.box[2] and found.box[1] <= found.x < found.box[3]
    bounds = detector.index_.galleries["block1"].bounds
    if gallery != "exact":
        # A loaded model has no real pixels in memory: it re-reads the images the bounds cannot rule out.
        detector.index_.real_pixels = None
        detector.pixel_cache_.clear()
        reread = detector.explain(0, y=int(48 * scale), x=int(18 * scale), stages=("block1",))
        assert reread.train_index == source and not reread.approximate and 1 <= reread.searched_images <= 8
        # The bounds the exact search prunes with never exceed an image's true nearest distance.
        context = detector.explain_context()
        query = context.read_image(detector._last.images[0])["block1"][8, 3]
        lower = bounds.lower_bounds(query.numpy())
        true = [float(((context.read_training([i], [normal[i]])[0]["block1"].reshape(-1, 24) - query) ** 2).sum(1).min().sqrt())
                for i in range(8)]
        assert (lower <= np.array(true) + 1e-5).all(), (lower, true)
    else:
        assert bounds is None
    # Without a pixel, the peak of the ticked stages' combined map is explained.
    peak = detector.explain(0, stages=("block2",))
    heat = detector.combined_maps(stages=("block2",))[0]
    assert heat[peak.query_y, peak.query_x] == heat.max() and peak.stage == "block2"


def test_kmeans_gallery_and_its_explanations():
    detector = SpadeDetector(settings(gallery="kmeans", n_means=32, calibration_images=2)).fit(normal_set(10))
    heat = detector.anomaly_maps(probe_set())
    assert heat.shape == (2, 64, 64) and heat[1].max() > heat[0].max()
    explanation = detector.explain(1)
    # Re-ranked against the real pixels of the training images (kept from the fit): exact.
    assert not explanation.approximate and 1 <= explanation.searched_images <= 10
    assert 0 <= explanation.train_index < 10
    # The heatmap's own match (no backbone pass) is the pixel a centre stands for: approximate.
    assert detector.explain(1, exact=False).approximate
    # The calibration images were kept out of the K-means sample, so their maps are honest.
    assert len(detector.calibration_names_) == 2


# --------------------------------------------------------------------------- persistence and limits


def test_save_load_round_trip(fitted, tmp_path):
    images = probe_set()
    heat = fitted.anomaly_maps(images)
    scores = fitted.score(images)
    path = fitted.save(tmp_path / "spade.npz")
    loaded = load_detector(path)
    assert isinstance(loaded, SpadeDetector)
    assert loaded.stages_ == fitted.stages_ and loaded.train_names_ == fitted.train_names_
    np.testing.assert_array_equal(loaded.anomaly_maps(images), heat)
    np.testing.assert_array_equal(loaded.score(images), scores)
    assert loaded.pixel_threshold() == fitted.pixel_threshold()
    assert loaded.threshold_ == fitted.threshold_
    assert loaded.explain(1) == fitted.explain(1)


def test_saved_raw_maps_redraw_heatmaps_without_the_backbone(fitted, tmp_path, monkeypatch):
    images = probe_set()
    heat = fitted.anomaly_maps(images)
    model = fitted.save(tmp_path / "spade.npz")
    maps = fitted.save_raw_maps(tmp_path / "spade.maps.npz", images)

    restarted = load_detector(model)  # a new process: empty cache
    assert restarted.load_raw_maps(maps) == len(images)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran although the maps were loaded")

    monkeypatch.setattr(restarted, "extractor", no_backbone)
    np.testing.assert_array_equal(restarted.anomaly_maps(images), heat)
    np.testing.assert_array_equal(restarted.combined_maps(sigma=0.0), fitted.combined_maps(sigma=0.0))
    assert restarted.explain(1, exact=False) == fitted.explain(1, exact=False)  # no backbone for exact ones

    # A file for another model's stages is refused by name; a broken file too.
    other = SpadeDetector(settings(strides=(8,))).fit(normal_set(4))
    with pytest.raises(ModelFileError, match="spade.maps.npz"):
        other.load_raw_maps(maps)
    broken = tmp_path / "broken.maps.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="broken.maps.npz"):
        restarted.load_raw_maps(broken)


def test_gallery_memory_cap_fails_early_with_advice():
    detector = SpadeDetector(settings(max_gallery_bytes=1000))
    # The check runs before any image is decoded: this set's pixels do not exist.
    missing = ImageSet([ImageItem(f"{i}.png", path=f"/nonexistent/{i}.png") for i in range(5)])
    with pytest.raises(GalleryTooLargeError, match="kmeans") as caught:
        detector.fit(missing)
    assert "max_gallery_bytes" in str(caught.value)
    assert detector.gallery_bytes(5) > 1000


def test_exact_gallery_is_float16(fitted):
    gallery = fitted.index_.galleries["block1"]
    assert gallery.features.dtype == torch.float16
    # 10 images x 16 x 16 pixels x (24 float16 channels + one float32 norm).
    assert gallery.nbytes == 10 * 16 * 16 * (2 * 24 + 4) == fitted.gallery_bytes(10) - 10 * (8 * 8 * 84 + 4 * 4 * 228)


def test_ivf_galleries_agree_with_the_exact_search():
    normal, images = normal_set(), probe_set()
    exact = SpadeDetector(settings(top_images=0)).fit(normal)
    reference = exact.raw_maps(images)
    # IVF-Flat probing every list is an exhaustive search over the same float16-rounded pixels.
    flat = SpadeDetector(settings(gallery="ivf-flat", ivf_probe=10_000)).fit(normal)
    assert flat.gallery_kind_ == "ivf-flat"
    for key, values in flat.raw_maps(images).items():
        np.testing.assert_allclose(values, reference[key], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(flat.calibration_["block1"], exact.calibration_["block1"], rtol=1e-3, atol=1e-3)
    # IVF-PQ (default probe) approximates it: same hot spots, distances close.
    pq = SpadeDetector(settings(gallery="ivf-pq", pq_dims=2)).fit(normal)
    approximate = pq.raw_maps(images)
    for key in exact.stages_:
        correlation = np.corrcoef(approximate[key].ravel(), reference[key].ravel())[0, 1]
        assert correlation > 0.9, (key, correlation)
    heat = pq.anomaly_maps(images)
    assert heat[1].max() > heat[0].max()


def test_ivf_pq_model_round_trip(tmp_path):
    detector = SpadeDetector(settings(gallery="ivf-pq")).fit(normal_set())
    images = probe_set()
    heat = detector.anomaly_maps(images)
    loaded = load_detector(detector.save(tmp_path / "ivf.npz"))
    assert loaded.gallery_kind_ == "ivf-pq"
    np.testing.assert_array_equal(loaded.anomaly_maps(images), heat)
    # The loaded model has no file paths for these in-memory images: given the normal set, it is exact again.
    assert loaded.explain(1).approximate and not detector.explain(1).approximate
    # Given the normal set, the loaded model re-reads the images (bounded search) and proves the same match.
    again, first = loaded.explain(1, normal=normal_set()), detector.explain(1)
    assert not again.approximate and (again.train_index, again.box) == (first.train_index, first.box)
    assert again.distance == pytest.approx(first.distance, rel=1e-2)  # fresh float32 vs stored float16 features


def test_auto_gallery_picks_by_size_and_names_the_sizes_when_nothing_fits():
    detector = SpadeDetector(settings(gallery="auto"))
    # 1000 images: per-pixel costs dominate (a 10-image gallery is mostly IVF centres and codebooks).
    exact, pq = detector.gallery_bytes(1000, "exact"), detector.gallery_bytes(1000, "ivf-pq")
    assert pq < exact < detector.gallery_bytes(1000, "ivf-flat")
    assert detector.resolve_gallery(1000) == "exact"
    assert detector.fit(normal_set()).gallery_kind_ == "exact"
    small = SpadeDetector(settings(gallery="auto", max_gallery_bytes=(exact + pq) // 2))
    assert small.resolve_gallery(1000) == "ivf-pq"
    tiny = SpadeDetector(settings(gallery="auto", max_gallery_bytes=pq - 1))
    with pytest.raises(GalleryTooLargeError) as caught:
        tiny.resolve_gallery(1000)
    message = str(caught.value)
    assert f"ivf-pq {pq / 2**20:,.0f} MiB" in message and "exact" in message and "max_gallery_bytes" in message


def test_fit_can_be_cancelled():
    with pytest.raises(Cancelled):
        SpadeDetector(settings()).fit(normal_set(), cancel=lambda: True)


def test_image_score_max_and_holdout_calibration():
    detector = SpadeDetector(settings(image_score="max")).fit(normal_set(8), holdout=normal_set(12).subset(range(8, 12)))
    assert detector.calibration_names_ == [f"holdout #{i}" for i in range(4)]
    scores = detector.score(probe_set())
    np.testing.assert_allclose(scores, detector.combined_maps().reshape(2, -1).max(axis=1))
    assert scores[1] > scores[0]


def test_the_image_score_reads_its_own_sigma_and_its_threshold_is_set_on_that_heatmap(tmp_path):
    detector = SpadeDetector(settings(image_score="max", sigma=4.0, image_sigma=1.0)).fit(normal_set(8))
    scores = detector.score(probe_set())
    np.testing.assert_allclose(scores, detector.combined_maps(sigma=1.0).reshape(2, -1).max(axis=1))
    assert not np.allclose(scores, detector.combined_maps().reshape(2, -1).max(axis=1))  # the shown map is σ 4
    calibration_peaks = detector.combine(detector.calibration_, None, 1.0).reshape(len(detector.calibration_names_), -1)
    assert detector.threshold_ <= calibration_peaks.max(axis=1).max()  # the working point is on σ-1 peaks
    assert detector.threshold_ >= calibration_peaks.max(axis=1).min()
    from core.detectors import load_detector

    loaded = load_detector(detector.save(tmp_path / "own-sigma.npz"))
    assert loaded.settings.image_sigma == 1.0
    np.testing.assert_allclose(loaded.score(probe_set()), scores, rtol=1e-5)
    with pytest.raises(ValueError, match="image_sigma"):
        settings(image_sigma=-1.0)


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_bottle_pixel_auroc_floor():
    if not BOTTLE.is_dir():
        pytest.skip(f"MVTec AD bottle not found at {BOTTLE}")
    train, test = read_mvtec(BOTTLE)
    good = [i for i, item in enumerate(test) if item.label == 0][:5]
    bad = [i for i, item in enumerate(test) if item.label == 1][:15]
    test = test.subset(good + bad)
    detector = SpadeDetector(SpadeSettings(calibration_images=8)).fit(train.sample(30, seed=0))
    heat = detector.anomaly_maps(test)
    masks = test.masks(detector.image_size)
    assert pixel_auroc(masks, heat) >= 0.9


# --------------------------------------------------------------------------- command line


def _write_pngs(folder: Path, images: dict[str, np.ndarray]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, pixels in images.items():
        Image.fromarray(pixels).save(folder / name)


def test_segment_command_fits_saves_and_reuses_a_model(tmp_path, capsys):
    import csv

    from core.__main__ import main

    _write_pngs(tmp_path / "normal", {f"{i}.png": texture(i) for i in range(6)})
    _write_pngs(tmp_path / "test", {"good.png": texture(50), "bad.png": with_defect(texture(51))})
    model = tmp_path / "spade.npz"
    common = ["--param", "features.resize=64", "--param", "features.crop=64", "--param", "calibration_images=3"]
    code = main(["segment", "--fit-normal", str(tmp_path / "normal"), str(tmp_path / "test"), "--out", str(tmp_path / "out"),
                 "--save-model", str(model), "--weights", "random", "--quiet", *common])
    assert code == 0 and model.is_file()
    with open(tmp_path / "out" / "segment.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [Path(row["file"]).name for row in rows] == ["bad.png", "good.png"]
    for row in rows:
        overlay = tmp_path / "out" / row["overlay"]
        mask = tmp_path / "out" / row["mask"]
        from PIL import Image

        assert Image.open(overlay).size == (96, 96) and Image.open(mask).size == (96, 96)
        assert row["nearest_normal"].endswith(".png")
    # The saved model segments again, with another σ and one stage; bad options fail with one line.
    code = main(["segment", "--model", str(model), str(tmp_path / "test" / "bad.png"), "--out", str(tmp_path / "again"),
                 "--sigma", "2", "--stages", "block2", "--scale", "image", "--quiet"])
    assert code == 0 and (tmp_path / "again" / "0000_bad_overlay.png").is_file()
    assert main(["segment", "--model", str(model), str(tmp_path / "test"), "--out", str(tmp_path / "x"),
                 "--stages", "block9", "--quiet"]) == 2
    assert "block9" in capsys.readouterr().err


def test_nuisance_copies_keep_the_false_positive_rate_of_normal_variation_at_its_target():
    """Normal images under their line's own variation (brightness, contrast, a small shift and turn) are not
    flagged more often than the target FPR promises, when the working point saw such copies."""
    from core.datasets import read_mvtec
    from core.nuisance import measure_variation, nuisance
    from core.projects.working_point import clopper_pearson
    from tests.conftest import DEMO_BOTTLE

    train, _ = read_mvtec(DEMO_BOTTLE)
    fit, held = train.subset(range(24)), train.subset(range(24, 40))
    features = FeatureSettings(resize=96, crop=96, precision="float32", batch_size=8)
    settings = SpadeSettings(features=features, n_means=64, calibration_images=6, image_score="fused", pooled="dn2",
                             nuisance_copies=3, target_fpr=0.1)
    detector = SpadeDetector(settings).fit(fit)
    originals = [item.load() for item in held]
    variation = measure_variation(originals)
    rng = np.random.default_rng(7)
    copies = ImageSet([ImageItem(f"copy{i}-{j}", array=nuisance(image, variation, rng))
                       for i, image in enumerate(originals) for j in range(3)])
    flagged = int(detector.decide(detector.score(copies)).sum())
    low, _ = clopper_pearson(flagged, len(copies))
    assert low <= settings.target_fpr, f"{flagged} of {len(copies)} nuisance copies flagged at a {settings.target_fpr:.0%} target"
    # The calibration images and their copies are what the threshold was placed on.
    assert len(detector.train_scores_) == 6 * (1 + 3)


def test_per_cell_gaussian_gallery_scores_each_pixel_against_its_own_cell_and_round_trips(tmp_path):
    """gallery='gaussian' (PaDiM's model): a Mahalanobis distance per cell, no search; saved and loaded alike."""
    from core.detectors.spade.gallery import GaussianGallery

    rng = np.random.default_rng(0)
    normal = rng.normal(0, 1, (50, 4, 3)).astype(np.float16)  # 50 images, 4 cells, 3 channels
    normal[:, 1] += 5.0  # cell 1's normal pixels sit elsewhere
    gallery = GaussianGallery.fit(normal, (2, 2), torch.device("cpu"))
    at_cell_one = torch.tensor([[0.0, 0, 0], [5.0, 5, 5], [0, 0, 0], [0, 0, 0]])
    distances, rows = gallery.search(at_cell_one, 1)
    # The same feature vector is normal in cell 1 and far from normal in cell 0: only its own cell counts.
    shifted = torch.tensor([[5.0, 5, 5], [5.0, 5, 5], [0, 0, 0], [0, 0, 0]])
    far, _ = gallery.search(shifted, 1)
    assert far[0, 0] > 20 * distances[0, 0] and far[1, 0] == distances[1, 0]
    assert rows[:, 0].tolist() == [0, 1, 2, 3]
    detector = SpadeDetector(settings(gallery="gaussian", calibration_images=3)).fit(normal_set())
    assert detector.gallery_kind_ == "gaussian"
    heat = detector.anomaly_maps(normal_set())
    loaded = load_detector(detector.save(tmp_path / "gauss.npz"))
    np.testing.assert_allclose(loaded.anomaly_maps(normal_set()), heat, rtol=1e-5, atol=1e-6)
