"""Issue 24: the normal-only signal, epoch 0 as a candidate for Early (auto), SES and EWC, and the choice's record.

Random EfficientNet-Lite0 weights on 32x32 synthetic images, a few epochs: the mechanics, not the figures
(those are in docs/RESULTS-panda.md, from the commands named there).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core.adaptation.fusion import ADAPTED_WEIGHT
from core.adaptation.pipeline import adapt
from core.adaptation.prefix_cache import build_prefix_cache
from core.adaptation.ses import SesScorer
from core.adaptation.signals import SIGNAL, keep_choice, measure, participation_ratio
from core.adaptation.stopping import BestSignal, choose_stop_epoch
from core.adaptation.training import features_of
from core.config import FeatureSettings, PandaSettings
from core.datasets import ImageItem, ImageSet
from core.detectors import load_detector
from core.detectors.panda import PandaDetector
from core.knn import KnnIndex

FEATURES = FeatureSettings(weights="random", resize=32, crop=32, device="cpu", batch_size=16)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, label: int, offset: int, prefix: str, seed: int) -> list[ImageItem]:
    rng = np.random.default_rng(seed)
    return [ImageItem(name=f"{prefix}{i}", array=(rng.integers(0, 90, (32, 32, 3)) + offset).astype(np.uint8),
                      label=label) for i in range(n)]


@pytest.fixture(scope="module")
def normal() -> ImageSet:
    return ImageSet(_images(30, 0, 0, "n", 0))


@pytest.fixture(scope="module")
def test_set() -> ImageSet:
    return ImageSet(_images(8, 0, 0, "tn", 1) + _images(8, 1, 150, "ta", 2))


@pytest.fixture(autouse=True)
def _private_fisher_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_FISHER_CACHE", str(tmp_path / "fisher-cache"))


def settings(strategy: str, **changes) -> PandaSettings:
    base = PandaSettings(features=FEATURES, strategy=strategy, epochs=3, batch_size=8, snapshot_every=1,
                         fisher_batches=1, grad_clip=1.0, lr=0.5, ewc_step="proximal", keep_rule="signal")
    return dataclasses.replace(base, **changes)


def _relabelled(image_set: ImageSet, labels) -> ImageSet:
    return ImageSet([dataclasses.replace(item, label=None if labels is None else int(label))
                     for item, label in zip(image_set.items, labels if labels is not None else image_set.labels)])


# ---------------------------------------------------------------------- the values and the rule
def test_measure_separates_probes_from_held_out_normals():
    rng = np.random.default_rng(0)
    trained, held = rng.normal(size=(60, 16)), rng.normal(size=(10, 16))
    far = rng.normal(size=(20, 16)) * 4 + 3
    values = measure(trained, held, far, ["pool"] * 10 + ["blend"] * 10, 2, "euclidean")
    assert values["probe_auroc"] > 0.95 and values["probe_separation"] > 0.5
    assert {"far_auroc", "near_auroc", "blend_auroc", "holdout_knn_gap", "spread"} <= set(values) and SIGNAL in values
    alike = measure(trained, held, rng.normal(size=(20, 16)), ["pool"] * 20, 2, "euclidean")
    assert alike["probe_separation"] < values["probe_separation"] and 0.2 < alike["probe_auroc"] < 0.8
    assert measure(trained, held, None, (), 2, "cosine").keys() == {"holdout_knn_gap", "spread"}


def test_participation_ratio_counts_the_directions_features_use():
    rng = np.random.default_rng(1)
    assert participation_ratio(rng.normal(size=(400, 20))) > 15  # a ball uses every direction
    line = np.outer(rng.normal(size=400), rng.normal(size=20)) + 50  # collapsed onto a line
    assert participation_ratio(line) < 1.5


def test_keep_choice_needs_the_adapted_network_to_win():
    assert keep_choice(1.0, 1.2, 5, "epoch 5").epoch == 5
    assert keep_choice(1.0, 1.2, 5, "epoch 5", margin=0.5).epoch == 0
    lost = keep_choice(1.3, 1.2, 5, "SES")
    assert lost.pretrained and lost.adapted_epoch == 5 and "pretrained network kept" in lost.reason
    assert keep_choice(1.0, None, 4, "epoch 4").epoch == 4  # nothing to compare: the strategy's own result
    assert keep_choice(1.0, 1.0, 0, "epoch 0").pretrained


def test_best_signal_keeps_the_best_epoch_and_the_guard_ends_training():
    records = [{"epoch": e, "signal": s, "holdout_distance": d}
               for e, (s, d) in enumerate([(1.0, 500), (1.1, 400), (1.4, 300), (1.2, 100), (1.9, 40), (2.0, 10)])]
    rule = BestSignal(fraction=0.1)
    kept = [rule.update(r["epoch"], r) for r in records[:5]]
    assert kept == [True, True, True, False, True] and rule.chosen == 4 and rule.done  # 40 <= 0.1 * 500
    # Training ends at the guard's epoch: epochs after it are not looked at.
    assert choose_stop_epoch(records, fraction=0.1) == 4
    assert choose_stop_epoch(records, fraction=0.05) == 5
    assert choose_stop_epoch(records, fraction=0.5) == 2  # the guard fires at epoch 3 (100 <= 250): best up to it is 2
    falling = [{"epoch": e, "signal": 1.0 - e / 10, "holdout_distance": 500} for e in range(4)]
    assert choose_stop_epoch(falling) == 0  # adaptation only lowered the signal: the pretrained network
    with pytest.raises(ValueError, match="fraction"):
        BestSignal(fraction=1.5)


def test_ses_leaves_out_a_collapsed_snapshot():
    rng = np.random.default_rng(2)
    good = rng.normal(size=(40, 8)).astype(np.float32)
    collapsed = np.ones((40, 8), dtype=np.float32)
    scorer = SesScorer(2, 0.1, 0).fit([good, collapsed])
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    found = scorer.score([queries, np.ones((5, 8), dtype=np.float32)])
    assert scorer.snapshots_used_.tolist() == [0] and set(found.choice.tolist()) == {0}
    rebuilt = SesScorer.from_state(scorer.state(), 2, 0.1, 0)
    np.testing.assert_allclose(rebuilt.score([queries, queries]).scores, found.scores)
    with pytest.raises(ValueError, match="collapsed"):
        SesScorer(2, 0.1, 0).fit([collapsed, collapsed])


# ---------------------------------------------------------------------- no test label is read
@pytest.mark.parametrize("strategy, rule", [("early", "auto"), ("ses", "fixed"), ("ewc", "fixed")])
def test_the_choice_ignores_test_labels(strategy, rule, normal, test_set):
    """Right, flipped, shuffled or absent test labels: the same signal, the same epoch kept, the same weights."""
    chosen = settings(strategy, early_rule=rule)
    labels = test_set.labels
    runs = {
        "labelled": adapt(normal, chosen, test=test_set),
        "flipped": adapt(normal, chosen, test=_relabelled(test_set, 1 - labels)),
        "shuffled": adapt(normal, chosen, test=_relabelled(test_set, np.random.default_rng(3).permutation(labels))),
        "unlabelled": adapt(normal, chosen, test=_relabelled(test_set, None)),
        "no test": adapt(normal, chosen),
    }
    reference = runs["labelled"]
    assert reference.kept.pretrained_signal is not None and reference.kept.adapted_signal is not None
    for name, run in runs.items():
        assert run.kept == reference.kept, name
        assert [r.signal for r in run.result.records] == [r.signal for r in reference.result.records], name
        state = run.result.final_state
        assert all(torch.equal(state[key], reference.result.final_state[key]) for key in state), name
    # The held-out images and the probes are measured every epoch; the epoch kept is marked once.
    assert all(r.signal is not None and r.signals for r in reference.result.records)
    assert [r.epoch for r in reference.result.records if r.kept] == [reference.kept.epoch]


# ---------------------------------------------------------------------- epoch 0 as a candidate
def _pretrained_scores(detector: PandaDetector, normal: ImageSet, test: ImageSet) -> np.ndarray:
    """DN2 on the pretrained network, the PANDA way: the detector's own network with its pretrained top."""
    network = detector.network()
    s = detector.settings
    network.load_suffix_state(detector.pretrained_state_ if detector.fusion_ is not None else detector.states_[0])
    caches = [build_prefix_cache(network, images, detector.image_size, s.features.batch_size) for images in (normal, test)]
    normal_f, test_f = (features_of(network, cache) for cache in caches)
    return KnnIndex(s.k, metric=s.metric).fit(normal_f).score(test_f)


@pytest.mark.parametrize("strategy", ["early", "ses", "ewc"])
def test_the_pretrained_network_can_be_kept_and_survives_saving(strategy, normal, test_set, tmp_path):
    # A margin no adaptation can clear: the signal keeps epoch 0 (DN2's features) for every strategy, scored
    # together with the last epoch trained (the fused fallback, weighted towards the pretrained network).
    chosen = settings(strategy, keep_margin=1e9, metric="cosine")
    detector = PandaDetector(chosen).fit(normal, test=test_set)
    assert detector.summary_["kept_epoch"] == 0 and detector.summary_["fused"] is True
    assert detector.state_epochs_ == [3] and detector.ses_ is None and detector.gallery_ is not None
    assert detector.fusion_.adapted_weight == ADAPTED_WEIGHT < 0.5
    assert "pretrained network kept" in detector.summary_["kept_reason"]
    assert "fused" in detector.summary_["kept_reason"]
    assert detector.summary_["adapted_epoch"] == 3 and detector.summary_["epochs"] == 3
    assert [r.epoch for r in detector.curves_ if r.kept] == [0]
    fresh = PandaDetector(chosen)
    fresh.identity_, fresh.trainable_ = detector.identity_, detector.trainable_
    pretrained = fresh.network().suffix_state()
    assert all(torch.equal(detector.pretrained_state_[k], pretrained[k]) for k in pretrained)  # untouched weights
    details = detector.score_details(test_set)
    np.testing.assert_allclose(details.pretrained, _pretrained_scores(detector, normal, test_set), rtol=1e-4, atol=1e-6)
    loaded = load_detector(detector.save(tmp_path / f"{strategy}.npz"))
    np.testing.assert_allclose(loaded.score(test_set), details.scores, rtol=1e-6)
    assert loaded.summary_["kept_epoch"] == 0 and loaded.summary_["kept_reason"] == detector.summary_["kept_reason"]
    assert [r.epoch for r in loaded.curves_ if r.kept] == [0]


def test_early_auto_that_picks_epoch_0_keeps_the_pretrained_network_alone(normal, test_set, tmp_path):
    """With nothing trained to fuse with (the best signal is epoch 0's), the model is DN2's features alone."""
    chosen = settings("early", early_rule="auto", metric="cosine", keep_margin=1e9)
    run = adapt(normal, chosen, test=test_set)
    detector = PandaDetector(chosen).fit_run(run)
    if run.kept.adapted_epoch != 0:
        pytest.skip("the signal peaked after epoch 0 on this seed")
    assert detector.fusion_ is None and detector.state_epochs_ == [0]
    np.testing.assert_allclose(detector.score(test_set), _pretrained_scores(detector, normal, test_set),
                               rtol=1e-4, atol=1e-6)
    loaded = load_detector(detector.save(tmp_path / "auto0.npz"))
    np.testing.assert_allclose(loaded.score(test_set), detector.score(test_set), rtol=1e-6)


def test_the_papers_rule_keeps_what_was_trained(normal):
    run = adapt(normal, settings("ses", keep_rule="last", keep_margin=1e9))
    assert run.prepared.holdout is None and run.kept.epoch == 3 and "paper" in run.kept.reason


def test_the_comparison_reports_each_fallback_and_the_automatic_choice(normal, test_set):
    from core.adaptation.compare import compare_strategies

    result = compare_strategies(normal, test_set, settings("ses", epochs=0), epochs=3, early_epoch=1, ewc_epochs=2,
                                ewc_curves=False)
    methods = [row.method for row in result.rows]
    assert methods == ["DN2", "PANDA-Early", "PANDA-Early (auto)", "PANDA-SES", "PANDA-SES (paper)",
                       "Unregularised (last epoch)", "Unregularised (best epoch)", "DN2 + epoch 1 (fused)",
                       "DN2 + epoch 3 (fused)", "PANDA-EWC", "PANDA-EWC (paper)", "DN2 + PANDA-EWC (fused)",
                       "Automatic choice"]
    rows = {row.method: row for row in result.rows}
    # The row as kept: the paper's figure, or, when the signal fell back, DN2 fused with what was trained.
    for strategy, fused in (("PANDA-SES", "DN2 + epoch 3 (fused)"), ("PANDA-EWC", "DN2 + PANDA-EWC (fused)")):
        kept = rows[strategy]
        assert "kept" in kept.note
        expected = rows[fused] if "pretrained network kept" in kept.note else rows[f"{strategy} (paper)"]
        assert kept.auroc == expected.auroc
    automatic = rows["Automatic choice"]  # the settings' strategy (SES) as kept
    assert automatic.auroc == rows["PANDA-SES"].auroc and "keep_rule=signal" in automatic.note
