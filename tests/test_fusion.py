"""Fusing the pretrained and the adapted network's scores: the arithmetic, the detector, save/load, no test label read.

The detector tests use random EfficientNet-Lite0 weights on 32x32 synthetic images, two epochs (as test_panda.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from core.adaptation.fusion import ADAPTED_WEIGHT, ScoreFusion, ScoreScale
from core.config import KEEP_RULES, PandaSettings
from core.datasets import ImageSet
from core.datasets.fashion_mnist import FASHION_MNIST_DIR
from core.detectors import load_detector
from core.detectors.base import ModelFileError
from core.detectors.panda import PandaDetector
from core.knn import KnnIndex
from core.metrics import image_auroc
from tests.test_panda import FEATURES, _items, normal, test_set  # noqa: F401 (the same fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ arithmetic
def test_standardise_puts_normal_scores_at_mean_zero_spread_one():
    normal = np.array([1.0, 2.0, 3.0, 4.0])
    scale = ScoreScale.of_normal(normal)
    z = scale.standardise(normal)
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1.0) < 1e-12
    assert scale.standardise(np.array([scale.mean + 2 * scale.std]))[0] == pytest.approx(2.0)


def test_a_constant_normal_score_has_unit_spread_not_a_division_by_zero():
    scale = ScoreScale.of_normal(np.full(5, 0.3))
    assert scale.std == 1.0
    np.testing.assert_allclose(scale.standardise(np.array([0.3, 1.3])), [0.0, 1.0])


@pytest.mark.parametrize("bad", [np.array([]), np.array([1.0, np.nan]), np.array([np.inf, 1.0])])
def test_scales_need_finite_normal_scores(bad):
    with pytest.raises(ValueError, match="finite scores"):
        ScoreScale.of_normal(bad)


def test_weights_zero_and_one_give_each_network_alone():
    rng = np.random.default_rng(0)
    pre_normal, ad_normal = rng.random(50), 10 * rng.random(50)
    pre_test, ad_test = rng.random(20), 10 * rng.random(20)
    only_pretrained = ScoreFusion.of_normal(pre_normal, ad_normal, 0.0).fuse(pre_test, ad_test)
    only_adapted = ScoreFusion.of_normal(pre_normal, ad_normal, 1.0).fuse(pre_test, ad_test)
    np.testing.assert_array_equal(np.argsort(only_pretrained), np.argsort(pre_test))
    np.testing.assert_array_equal(np.argsort(only_adapted), np.argsort(ad_test))


def test_units_do_not_matter_only_each_networks_normal_spread():
    """Scaling one network's scores (another distance unit) changes nothing: both sides are standardised."""
    rng = np.random.default_rng(1)
    pre_normal, ad_normal, pre_test, ad_test = (rng.random(n) for n in (40, 40, 10, 10))
    fused = ScoreFusion.of_normal(pre_normal, ad_normal).fuse(pre_test, ad_test)
    rescaled = ScoreFusion.of_normal(pre_normal, 1000 * ad_normal).fuse(pre_test, 1000 * ad_test)
    np.testing.assert_allclose(fused, rescaled, rtol=1e-9)


def test_an_image_far_under_either_network_ranks_above_normal_ones():
    normal = np.random.default_rng(2).normal(1.0, 0.1, 100)
    fusion = ScoreFusion.of_normal(normal, normal)
    only_pretrained_sees_it = fusion.fuse(np.array([2.0, 1.0]), np.array([1.0, 1.0]))
    only_adapted_sees_it = fusion.fuse(np.array([1.0, 1.0]), np.array([2.0, 1.0]))
    assert only_pretrained_sees_it[0] > only_pretrained_sees_it[1]
    assert only_adapted_sees_it[0] > only_adapted_sees_it[1]


def test_fusion_round_trips_and_refuses_a_bad_weight():
    fusion = ScoreFusion.of_normal(np.array([1.0, 2.0]), np.array([5.0, 9.0]), 0.25)
    assert ScoreFusion.from_dict(fusion.to_dict()) == fusion
    with pytest.raises(ValueError, match="between 0 and 1"):
        ScoreFusion.of_normal(np.array([1.0, 2.0]), np.array([1.0, 2.0]), 1.5)
    with pytest.raises(KeyError):
        ScoreFusion.from_dict({"pretrained_mean": 1.0})


# ------------------------------------------------------------------ detector
def fused_settings(strategy: str) -> PandaSettings:
    return PandaSettings(features=FEATURES, strategy=strategy, epochs=2, batch_size=8, snapshot_every=1,
                         fisher_batches=1, grad_clip=1.0, keep_rule="fuse")


def test_fuse_is_a_keep_rule_the_settings_accept():
    assert "fuse" in KEEP_RULES
    with pytest.raises(ValueError, match="keep_rule"):
        PandaSettings(keep_rule="both")


@pytest.mark.parametrize("strategy", ["early", "ses", "ewc"])
def test_fused_model_scores_with_both_networks_and_round_trips(strategy, normal, test_set, tmp_path):
    detector = PandaDetector(fused_settings(strategy)).fit(normal, test=test_set)
    assert detector.fusion_ is not None and detector.summary_["fused"] is True
    assert detector.summary_["kept_reason"].endswith("(keep_rule=fuse)")
    assert detector.pretrained_gallery_.shape[0] == len(normal)
    details = detector.score_details(test_set)
    # The fused score is exactly the weighted sum of the two networks' standardised scores.
    expected = detector.fusion_.fuse(details.pretrained, details.adapted)
    np.testing.assert_allclose(details.scores, expected)
    assert detector.fusion_.adapted_weight == ADAPTED_WEIGHT
    # The pretrained part is epoch 0: DN2's features through the same network code.
    features = detector.query_features(test_set)
    assert len(features) == len(detector.states_) + 1
    pretrained = KnnIndex(2, metric="cosine").fit(detector.pretrained_gallery_).score(features[-1])
    np.testing.assert_allclose(details.pretrained, pretrained, rtol=1e-5)
    # The threshold is set on fused normal scores: about half of them above 0, the normal mean.
    assert detector.train_scores_.shape == (len(normal),)
    assert abs(float(np.mean(detector.train_scores_))) < 1e-6
    assert image_auroc(test_set.labels, details.scores) > 0.8

    loaded = load_detector(detector.save(tmp_path / f"fused-{strategy}.npz"))
    assert isinstance(loaded, PandaDetector) and loaded.fusion_ == detector.fusion_
    np.testing.assert_allclose(loaded.score(test_set), details.scores, rtol=1e-5, atol=1e-6)
    assert loaded.threshold_ == detector.threshold_


def test_fused_choice_reads_no_test_label(normal, test_set):
    """Labels flipped, shuffled or absent give the same fused model (the labels only feed the curves)."""
    base = PandaDetector(fused_settings("early")).fit(normal, test=test_set)
    flipped = ImageSet([dataclasses.replace(item, label=1 - item.label) for item in test_set.items])
    shuffled_labels = np.random.default_rng(0).permutation(test_set.labels)
    shuffled = ImageSet([dataclasses.replace(item, label=int(label)) for item, label in zip(test_set.items, shuffled_labels)])
    for other_test in (flipped, shuffled, None):
        other = PandaDetector(fused_settings("early")).fit(normal, test=other_test)
        assert other.fusion_ == base.fusion_
        np.testing.assert_allclose(other.score(test_set), base.score(test_set), rtol=1e-6)


def test_oe_never_fuses(normal):
    outliers = ImageSet(_items(12, 1, 140, "o", 3))
    detector = PandaDetector(fused_settings("oe")).fit(normal, outliers=outliers)
    assert detector.fusion_ is None and detector.summary_["fused"] is False


def test_fused_model_file_without_the_pretrained_part_is_a_clear_error(normal, tmp_path):
    detector = PandaDetector(fused_settings("early")).fit(normal)
    path = detector.save(tmp_path / "fused.npz")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files if not key.startswith("pretrained/")}
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(ModelFileError, match="pretrained network"):
        load_detector(tmp_path / "broken.npz")


def test_adapt_command_reports_both_networks_of_a_fused_model(tmp_path, capsys):
    """The CLI prints the fused ROC AUC and each network's alone, and says the model fuses."""
    from core.cli import adapt as adapt_cli
    from tests.test_panda import _adapt_parser

    if not (Path(FASHION_MNIST_DIR)).is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}")
    args = _adapt_parser().parse_args([
        "--normal", "fashion-mnist:Trouser:16", "--test", "fashion-mnist:Trouser:40", "--strategy", "early",
        "--epochs", "1", "--weights", "random", "--crop", "32", "--resize", "32", "--device", "cpu",
        "--param", "batch_size=8", "--param", "keep_rule=fuse", "--quiet", "--out", str(tmp_path / "m.npz"),
    ])
    assert adapt_cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "of which: the pretrained network alone" in printed
    assert "model fuses the pretrained network (epoch 0) with epoch 1" in printed
    assert load_detector(tmp_path / "m.npz").fusion_ is not None
