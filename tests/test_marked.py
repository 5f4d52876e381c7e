"""A few marked real defects as the tuner's evidence (core.tuning.marked, bench --labelled, tune --labelled)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.__main__ import main
from core.tuning.marked import MarkedScores, choose_marked, cross_validate
from core.tuning.pixel_counts import pixel_counts
from core.tuning.proxy import Candidate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _candidate(sigma: float) -> Candidate:
    return Candidate(256, "stretch", (4, 8, 16), sigma, "fused", 0.9, 0.9, 0.9, 0.1)


def _scores(quality: float, image: dict[str, np.ndarray], seed: int) -> MarkedScores:
    """Marked images 0-4 good, 5-9 defective (a 4x4 region); ``quality`` lifts the region's pixels."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for index in range(10):
        mask = np.zeros((12, 12), bool)
        if index >= 5:
            mask[3:7, 3:7] = True
        masks.append(mask)
        maps.append((rng.normal(0, 1, (12, 12)) + quality * mask).astype(np.float32))
    return MarkedScores(image, pixel_counts(masks, maps))


LABELS = np.array([0] * 5 + [1] * 5)
GOOD_RANKING = np.arange(10, dtype=float)  # every defective image above every good one
NO_RANKING = np.array([5, 6, 7, 8, 9, 0, 1, 2, 3, 4], dtype=float)


def test_marked_regions_choose_the_candidate_that_finds_them_and_never_the_image_score():
    proxy_choice, other = _candidate(4.0), _candidate(2.0)
    scores = {
        proxy_choice: _scores(0.3, {"fused": NO_RANKING, "dn2": GOOD_RANKING, "topk": NO_RANKING}, seed=1),
        other: _scores(4.0, {"fused": GOOD_RANKING, "dn2": GOOD_RANKING, "topk": GOOD_RANKING}, seed=2),
    }
    found = choose_marked([proxy_choice, other], scores, LABELS, "fused")
    assert found.candidate == other and found.rule == "fused" and found.image_auroc == 1.0
    # At the proxy's choice, DN2 ranks the marked images perfectly and the fused score not at all: the fixed
    # score stays (a handful of images cannot choose a ranking rule), and how each rule ranked them is reported.
    found = choose_marked([proxy_choice], scores, LABELS, "fused")
    assert found.rule == "fused"
    assert found.rule_aurocs == {"fused": 0.0, "dn2": 1.0, "topk": 0.0}


def test_cross_validation_scores_each_fold_with_a_choice_made_without_it():
    candidate = _candidate(4.0)
    scores = {candidate: _scores(4.0, {"fused": GOOD_RANKING, "dn2": NO_RANKING, "topk": NO_RANKING}, seed=3)}
    validated = cross_validate([candidate], scores, LABELS, "fused", folds=5)
    assert validated["folds"] == 5 and validated["image_auroc"] == 1.0 and validated["pixel_objective"] > 0.9
    # Held-out pairs only: with the ranking reversed, the estimate says so.
    scores[candidate].image["fused"] = -GOOD_RANKING
    assert cross_validate([candidate], scores, LABELS, "fused")["image_auroc"] == 0.0


def _category(root, poisoned_names=(), size: int = 48):
    rng = np.random.default_rng(5)

    def stripes():
        x = np.arange(size)[None, :].repeat(size, 0)
        base = 128 + 60 * np.sin(2 * np.pi * x / 12 + rng.uniform(0, 2 * np.pi))
        return np.clip(base[..., None] + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)

    for i in range(12):
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(stripes()).save(root / "train" / "good" / f"{i:03d}.png")
    for folder in ("good", "crack"):
        for i in range(6):
            image = stripes()
            name = f"test/{folder}/{i:03d}.png"
            if folder == "crack":
                image[10:20, 12:22] = 250
                mask = np.zeros((size, size), np.uint8)
                mask[10:20, 12:22] = 255
                (root / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "ground_truth" / folder / f"{i:03d}_mask.png")
            if name in poisoned_names:  # its own generator: the other images stay as they are
                image = np.random.default_rng(i).integers(0, 255, image.shape, dtype=np.uint8)
            (root / "test" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / name)
    return root


def test_labelled_evidence_is_never_evaluated(tmp_path, monkeypatch):
    """Poisoning exactly the evidence images changes nothing in the evaluation, though the same poison changes
    a plain run's figures: the evidence was left out of what was scored."""
    import core.tuning.search as search
    from core.bench import BenchOptions, run_bench, split_marked, load_tasks

    monkeypatch.setattr(search, "RESOLUTIONS", (64,))
    clean = _category(tmp_path / "clean")
    test = load_tasks(f"mvtec:{clean}")[0].test
    evidence, rest = split_marked(test, 2, seed=0)
    assert len(evidence) == 4 and sorted(evidence.labels.tolist()) == [0, 0, 1, 1]
    assert not set(evidence.names) & set(rest.names) and len(rest) == len(test) - 4
    poisoned = _category(tmp_path / "poisoned", poisoned_names=set(evidence.names))
    # The evidence must not decide anything here, or a poisoned one could legitimately change the choice.
    from core.tuning.marked import MarkedChoice

    monkeypatch.setattr(search, "choose_marked",
                        lambda shortlist, scores, labels, rule, use=None: MarkedChoice(shortlist[0], rule, 0.0, 0.0))
    params = {"features.resize": "64", "features.crop": "64", "features.batch_size": "8", "calibration_images": "3"}
    options = BenchOptions(weights="random", params=params, tune=True, labelled=2)
    reports = [run_bench("spade", f"mvtec:{root}", options) for root in (clean, poisoned)]
    results = [report["results"][0] for report in reports]
    assert results[0]["n_test"] == results[1]["n_test"] == len(rest) and results[0]["n_marked"] == 4
    assert results[0]["marked"] == results[1]["marked"] == list(evidence.names)
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert results[0][key] == results[1][key], key
    plain = BenchOptions(weights="random", params=params)
    assert run_bench("spade", f"mvtec:{clean}", plain)["results"][0]["pixel_auroc"] != \
        run_bench("spade", f"mvtec:{poisoned}", plain)["results"][0]["pixel_auroc"]


def test_tune_reads_marked_images_from_an_mvtec_folder(tmp_path, monkeypatch, capsys):
    import core.tuning.search as search

    monkeypatch.setattr(search, "RESOLUTIONS", (64,))
    root = _category(tmp_path / "line")
    marked = tmp_path / "marked"
    for folder in ("test", "ground_truth"):
        (marked / folder).mkdir(parents=True)
    import shutil

    shutil.copytree(root / "test", marked / "test", dirs_exist_ok=True)
    shutil.copytree(root / "ground_truth", marked / "ground_truth", dirs_exist_ok=True)
    out = tmp_path / "tuning.json"
    assert main(["tune", "--normal", str(root / "train" / "good"), "--labelled", str(marked), "--weights", "random",
                 "--param", "features.resize=64", "--param", "features.crop=64", "--param", "calibration_images=3",
                 "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["marked"]["n_defective"] == 6 and summary["marked"]["n_good"] == 6
    assert summary["marked"]["with_masks"] and summary["marked"]["cross_validated"]["folds"] >= 2
    assert "marked defects" in capsys.readouterr().out
