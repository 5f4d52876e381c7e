"""PandaDetector: the detector contract for every strategy, save/load, the adapt command.

Random EfficientNet-Lite0 weights on 32x32 synthetic images, one or two epochs.
"""

from __future__ import annotations

import dataclasses
import json

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import FeatureSettings, PandaSettings
from core.datasets import ImageItem, ImageSet
from core.detectors import NotFittedError, load_detector, make_detector
from core.detectors.base import ModelFileError
from core.detectors.panda import PandaDetector
from core.knn import KnnIndex
from core.metrics import image_auroc

FEATURES = FeatureSettings(weights="random", resize=32, crop=32, device="cpu", batch_size=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _items(n: int, label: int, offset: int, prefix: str, seed: int) -> list[ImageItem]:
    rng = np.random.default_rng(seed)
    return [
        ImageItem(name=f"{prefix}{i}", array=(rng.integers(0, 90, (32, 32, 3)) + offset).astype(np.uint8), label=label)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def normal() -> ImageSet:
    return ImageSet(_items(24, 0, 0, "n", 0))


@pytest.fixture(scope="module")
def test_set() -> ImageSet:
    return ImageSet(_items(8, 0, 0, "tn", 1) + _items(8, 1, 150, "ta", 2))


def settings(strategy: str, **changes) -> PandaSettings:
    # The paper's keep rule: these tests check each strategy's mechanics (the signal's choice: test_panda_signal.py).
    base = PandaSettings(features=FEATURES, strategy=strategy, epochs=2, batch_size=8, snapshot_every=1,
                         fisher_batches=1, grad_clip=1.0, keep_rule="last")
    return dataclasses.replace(base, **changes)


def test_score_before_fit_is_a_clear_error(normal):
    with pytest.raises(NotFittedError):
        PandaDetector(settings("early")).score(normal)


@pytest.mark.parametrize("strategy", ["early", "ses", "ewc", "oe"])
def test_fit_score_save_load_round_trip(strategy, normal, test_set, tmp_path):
    outliers = ImageSet(_items(12, 1, 140, "o", 3)) if strategy == "oe" else None
    detector = make_detector("panda", settings(strategy))
    assert isinstance(detector, PandaDetector)
    detector.fit(normal, test=test_set, outliers=outliers)
    details = detector.score_details(test_set)
    assert details.scores.shape == (len(test_set),) and details.scores.dtype == np.float64
    assert image_auroc(test_set.labels, details.scores) > 0.8
    assert detector.train_scores_.shape == (len(normal),) and detector.threshold_ is not None
    assert [r.epoch for r in detector.curves_] == [0, 1, 2]
    if strategy == "ses":
        assert detector.state_epochs_ == [1, 2] and details.choice is not None
        assert set(np.unique(details.choice)) <= {0, 1}
    else:
        assert len(detector.states_) == 1 and details.choice is None

    path = detector.save(tmp_path / f"{strategy}.npz")
    loaded = load_detector(path)
    assert isinstance(loaded, PandaDetector) and loaded.settings == detector.settings
    np.testing.assert_allclose(loaded.score(test_set), details.scores, rtol=1e-5, atol=1e-6)
    assert loaded.threshold_ == detector.threshold_
    np.testing.assert_array_equal(loaded.train_scores_, detector.train_scores_)
    assert [r.to_dict() for r in loaded.curves_] == [r.to_dict() for r in detector.curves_]
    assert loaded.summary_["strategy"] == strategy


@pytest.mark.parametrize("strategy", ["early", "ses"])
def test_cosine_metric_reaches_every_knn_score_and_survives_saving(strategy, normal, test_set, tmp_path):
    detector = PandaDetector(settings(strategy, metric="cosine")).fit(normal, test=test_set)
    features = detector.query_features(test_set)
    scores = detector.score(test_set)
    if strategy == "early":
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        expected = KnnIndex(2).fit(unit(detector.gallery_)).score(unit(features[0]))
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    else:
        assert all(index.metric == "cosine" for index in detector.ses_.indexes_)
    loaded = load_detector(detector.save(tmp_path / f"cos-{strategy}.npz"))
    assert loaded.settings.metric == "cosine"
    np.testing.assert_allclose(loaded.score(test_set), scores, rtol=1e-5, atol=1e-6)


def test_saved_model_refuses_another_backbone(normal, tmp_path):
    detector = PandaDetector(settings("early", epochs=1)).fit(normal)
    path = detector.save(tmp_path / "m.npz")
    from core.detectors.base import read_model_file

    header, arrays = read_model_file(path)
    header["features_identity"]["weights"] = "something-else.pth"
    other = PandaDetector(detector.settings)
    from core.detectors.base import restore_common

    restore_common(other, header, arrays)
    with pytest.raises(ModelFileError, match="weights"):
        other.score(normal)


def test_holdout_sets_the_threshold(normal):
    holdout = ImageSet(_items(10, 0, 0, "h", 9))
    detector = PandaDetector(settings("early", epochs=1, target_fpr=0.1)).fit(normal, holdout=holdout)
    assert detector.holdout_fpr_ is not None and detector.holdout_fpr_ <= 0.1 + 1e-9
    held_scores = detector.score(holdout)
    decisions = detector.decide(held_scores)
    assert decisions.mean() <= 0.1 + 1e-9
    # Moving the working point keeps using the held-out scores, not the training ones.
    threshold = detector.set_target_fpr(0.3)
    assert threshold in detector.holdout_scores_
    assert detector.holdout_fpr_ == pytest.approx(float((held_scores > threshold).mean()))
    assert 0.1 < detector.holdout_fpr_ <= 0.3 + 1e-9


def test_cancelled_fit_keeps_a_usable_model(normal, test_set):
    steps = {"n": 0}
    detector = PandaDetector(settings("ses", epochs=4))
    detector.fit(normal, progress=lambda done, total: steps.__setitem__("n", done), cancel=lambda: steps["n"] >= 4)
    assert detector.summary_["cancelled"] and detector.summary_["minibatches"] == 4
    assert detector.state_epochs_ == [1]  # the one snapshot taken before the stop
    assert detector.score(test_set).shape == (len(test_set),)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="strategy"):
        PandaSettings(strategy="late")
    with pytest.raises(ValueError, match="cache_dtype"):
        PandaSettings(cache_dtype="int8")
    with pytest.raises(ValueError, match="epochs"):
        PandaSettings(epochs=-1)


def _noise_folder(folder, n: int, seed: int):
    """A folder of ``n`` 32x32 noise PNGs."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _adapt_parser():
    import argparse

    from core.cli import adapt as adapt_cli

    return adapt_cli.add_parser(argparse.ArgumentParser().add_subparsers())


def test_adapt_command_writes_model_and_curves(tmp_path):
    from core.cli import adapt as adapt_cli

    folder = _noise_folder(tmp_path / "normal", 12, seed=0)
    parser = _adapt_parser()
    out, curves = tmp_path / "m.npz", tmp_path / "c.json"
    args = parser.parse_args([
        "--normal", str(folder), "--strategy", "ewc", "--epochs", "1", "--weights", "random", "--crop", "32",
        "--resize", "32", "--device", "cpu", "--param", "batch_size=8", "--param", "fisher_batches=1",
        "--out", str(out), "--curves", str(curves), "--save-fisher", str(tmp_path / "f.npz"), "--quiet",
    ])
    assert adapt_cli.run(args) == 0
    written = json.loads(curves.read_text())
    assert [e["epoch"] for e in written["epochs"]] == [0, 1]
    assert written["settings"]["strategy"] == "ewc" and written["settings"]["batch_size"] == 8
    stats = written["summary"]["fisher_statistics"]  # what lambda is weighed against
    assert stats["entries"] > 0 and 0 <= stats["median"] <= stats["max"] and stats["mean"] >= 0
    loaded = load_detector(out)
    assert isinstance(loaded, PandaDetector)
    assert (tmp_path / "f.npz").exists()
    # Where the Fisher came from travels with the model (shown on the Adapt page).
    assert loaded.summary_["fisher_source"].startswith("offline photo pool")
    assert written["summary"]["fisher_source"] == loaded.summary_["fisher_source"]


@pytest.fixture(autouse=True)
def _private_fisher_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_FISHER_CACHE", str(tmp_path / "fisher-cache"))


def test_adapt_compare_over_fashion_mnist_classes_writes_table6(tmp_path, capsys):
    from core.cli import adapt as adapt_cli
    from core.datasets.fashion_mnist import FASHION_MNIST_DIR

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}")
    table = tmp_path / "table6.json"
    args = _adapt_parser().parse_args([
        "--compare", "--normal", "fashion-mnist:Trouser,Bag:16", "--test", "fashion-mnist:Trouser,Bag:40",
        "--weights", "random", "--crop", "32", "--resize", "32", "--device", "cpu", "--epochs", "3",
        "--early-epoch", "1", "--ewc-epochs", "1", "--no-ewc-curves", "--param", "batch_size=8",
        "--param", "fisher_batches=1", "--param", "snapshot_every=1", "--param", "grad_clip=1",
        "--table", str(table), "--quiet",
    ])
    assert adapt_cli.run(args) == 0
    written = json.loads(table.read_text())
    assert written["classes"] == ["Trouser", "Bag"] and set(written["table"]) == {"Trouser", "Bag"}
    # With the signal's keep rule SES and EWC may give back DN2 (fused with what they trained); their paper rows,
    # the fused rows and the automatic choice join.
    methods = {"DN2", "PANDA-Early", "PANDA-Early (auto)", "PANDA-SES", "PANDA-SES (paper)", "PANDA-EWC",
               "PANDA-EWC (paper)", "Unregularised (last epoch)", "Unregularised (best epoch)", "Automatic choice",
               "DN2 + epoch 1 (fused)", "DN2 + epoch 3 (fused)", "DN2 + PANDA-EWC (fused)"}
    assert set(written["mean"]) == methods
    for name in ("Trouser", "Bag"):
        rows = {row["method"]: row for row in written["per_class"][name]["rows"]}
        # The defaults' strategy is SES: the automatic choice is its row as kept.
        assert rows["Automatic choice"]["auroc"] == rows["PANDA-SES"]["auroc"]
        if "pretrained network kept" in rows["PANDA-SES"]["note"]:
            assert rows["PANDA-SES"]["auroc"] == rows["DN2 + epoch 3 (fused)"]["auroc"]
        else:
            assert rows["PANDA-SES"]["auroc"] == rows["PANDA-SES (paper)"]["auroc"]
    for method, mean in written["mean"].items():
        assert mean == pytest.approx(np.mean([written["table"][c][method] for c in ("Trouser", "Bag")]))
    assert written["per_class"]["Bag"]["n_train"] == 16 and written["per_class"]["Bag"]["n_test"] == 40
    assert written["wall_seconds"] > 0 and written["paper_fmnist"]["PANDA-EWC"] == 95.6
    printed = capsys.readouterr().out
    assert "mean" in printed and "paper (ResNet152)" in printed

    # Classes run in two processes are merged into the same table (in Fashion-MNIST's class order).
    parts = []
    for name in ("Bag", "Trouser"):
        part = tmp_path / f"{name}.json"
        part.write_text(json.dumps({"settings": written["settings"], "command": ["x"], "wall_seconds": 1.0,
                                    "classes": [name], "per_class": {name: written["per_class"][name]}}))
        parts.append(str(part))
    merged_path = tmp_path / "merged.json"
    assert adapt_cli.run(_adapt_parser().parse_args(["--merge", *parts, "--table", str(merged_path)])) == 0
    merged = json.loads(merged_path.read_text())
    assert merged["classes"] == ["Trouser", "Bag"]
    assert merged["table"] == written["table"] and merged["mean"] == pytest.approx(written["mean"])
    assert "Trouser" in capsys.readouterr().out
    with pytest.raises(ValueError, match="repeats class"):
        adapt_cli.merge_tables([parts[0], parts[0]], None)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"settings": {**written["settings"], "lr": 9.0},
                                 "per_class": {"Coat": written["per_class"]["Bag"]}}))
    with pytest.raises(ValueError, match="other.json: run with other settings .*lr"):
        adapt_cli.merge_tables([parts[0], str(other)], None)
    with pytest.raises(SystemExit, match="--normal is required"):
        adapt_cli.run(_adapt_parser().parse_args(["--compare"]))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a table"):
        adapt_cli.merge_tables([str(tmp_path / "broken.json")], None)


def test_adapt_compare_one_class_against_the_test_images_of_all(tmp_path, capsys):
    """Issue 24, part 5: ``--normal fashion-mnist:Sandal:N --test fashion-mnist:all:M`` compares Sandal against the
    stratified test images of every class (it used to stop with "unknown Fashion-MNIST class 'all'")."""
    from core.cli import adapt as adapt_cli
    from core.datasets.fashion_mnist import FASHION_MNIST_DIR

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}")
    curves = tmp_path / "sandal.json"
    args = _adapt_parser().parse_args([
        "--compare", "--normal", "fashion-mnist:Sandal:16", "--test", "fashion-mnist:all:40", "--weights", "random",
        "--crop", "32", "--resize", "32", "--device", "cpu", "--epochs", "1", "--strategies", "early",
        "--param", "batch_size=8", "--param", "grad_clip=1", "--curves", str(curves), "--quiet",
    ])
    assert adapt_cli.run(args) == 0
    assert "DN2" in capsys.readouterr().out
    assert adapt_cli.labelled_test_spec("fashion-mnist:Sandal:16", "fashion-mnist:all:40") == "fashion-mnist:Sandal:40"
    assert adapt_cli.labelled_test_spec("fashion-mnist:Sandal", "fashion-mnist:Bag,Coat:9") == "fashion-mnist:Sandal:9"
    assert adapt_cli.labelled_test_spec("fashion-mnist:Sandal", "fashion-mnist:Bag:9") == "fashion-mnist:Bag:9"
    with pytest.raises(SystemExit, match="labelled against one normal class"):
        adapt_cli.labelled_test_spec(str(tmp_path), "fashion-mnist:all:40")


def test_adapt_command_times_the_prefix_cache(tmp_path, capsys):
    from core.cli import adapt as adapt_cli

    folder = _noise_folder(tmp_path / "normal", 8, seed=1)
    parser = _adapt_parser()
    report = tmp_path / "timing.json"
    args = parser.parse_args([
        "--normal", str(folder), "--time-cache", "--rounds", "1", "--weights", "random", "--crop", "32",
        "--resize", "32", "--device", "cpu", "--param", "batch_size=4", "--curves", str(report),
    ])
    assert adapt_cli.run(args) == 0
    assert "ratio" in capsys.readouterr().out
    timing = json.loads(report.read_text())
    assert timing["naive_epoch_seconds"] > 0 and timing["cached_epoch_seconds"] > 0
    assert timing["max_weight_difference"] < 1e-5  # both ways train the same weights


def test_bench_entries_build_panda_detectors(tmp_path):
    from core.bench import BENCH_METHODS, BenchOptions

    for strategy in ("early", "ses", "ewc"):
        detector = BENCH_METHODS[f"panda-{strategy}"](BenchOptions(epochs=3, params={"lr": "0.05"}))
        assert isinstance(detector, PandaDetector)
        assert detector.settings.strategy == strategy and detector.settings.epochs == 3 and detector.settings.lr == 0.05
    with pytest.raises(ValueError, match="outliers"):
        BENCH_METHODS["panda-oe"](BenchOptions())
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "o.png")
    detector = BENCH_METHODS["panda-oe"](BenchOptions(outliers=str(tmp_path)))
    assert len(detector.outliers) == 1 and detector.outliers.labels.tolist() == [1]


def test_adapt_command_starts_from_the_measured_defaults_or_the_papers():
    from core.cli import adapt as adapt_cli
    from core.config import paper_panda_settings

    def built(*extra: str) -> PandaSettings:
        return adapt_cli.settings_from_args(_adapt_parser().parse_args(["--normal", "unused", *extra]))

    assert built() == PandaSettings()
    assert built().features.backbone == "efficientnet_lite2" and built().metric == "cosine" and built().epochs == 16
    assert built("--paper") == paper_panda_settings()
    # Another backbone without a size runs at its own geometry, not at Lite2's 224².
    lite0 = built("--backbone", "efficientnet_lite0")
    assert lite0.features.backbone == "efficientnet_lite0" and lite0.features.crop is None
    assert built("--backbone", "efficientnet_lite0", "--crop", "64", "--resize", "64").features.crop == 64
    assert built("--paper", "--strategy", "ses", "--epochs", "3").epochs == 3
    assert built("--minibatches", "50").minibatches == 50 and built("--minibatches", "50").epochs == 0
