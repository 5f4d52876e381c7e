"""Command line: python -m core --help / info / fit / score / bench."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.__main__ import main
from core.cli import COMMANDS, TextProgress, parse_params

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--weights", "random", "--param", "features.resize=32", "--param", "features.crop=32"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "ANOMALY_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """normal/ (8 dark images), mixed/ (2 dark, 2 bright, one corrupt .png, one text file)."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for i in range(8):
        path = root / "normal" / f"n{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 50, (20, 20, 3), dtype=np.uint8)).save(path)
    mixed = root / "mixed"
    mixed.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 50, (20, 20, 3), dtype=np.uint8)).save(mixed / f"good{i}.png")
        Image.fromarray(rng.integers(200, 255, (20, 20, 3), dtype=np.uint8)).save(mixed / f"bright{i}.png")
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (mixed / "notes.txt").write_text("not an image")
    return {"root": root, "normal": root / "normal", "mixed": mixed}


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert set(COMMANDS) >= {"info", "fit", "score", "bench"}


def test_info_shows_device_knn_and_weights():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert "device:" in result.stdout and "CPU" in result.stdout
    assert "kNN:" in result.stdout
    assert "efficientnet_lite0 (default): available offline" in result.stdout
    assert "resnet152" in result.stdout


def test_fit_then_score(folders, tmp_path):
    model = tmp_path / "model.npz"
    fit = run_cli("fit", "--method", "dn2", "--normal", str(folders["normal"]), "--target-fpr", "0.2",
                  "--out", str(model), "--threads", "1", *TINY)
    assert fit.returncode == 0, fit.stderr
    assert model.is_file() and "threshold" in fit.stdout
    out = tmp_path / "scores.csv"
    missing = tmp_path / "missing.png"
    score = run_cli("score", "--model", str(model), str(folders["mixed"]), str(missing), "--csv", str(out), "--threads", "1")
    assert score.returncode == 0, score.stderr
    assert "broken.png" in score.stderr and "notes.txt" in score.stderr and "missing.png" in score.stderr
    with out.open() as stream:
        rows = list(csv.DictReader(stream))
    # Today's four columns first, then the model, the error (a bad file is a row) and the resume key.
    assert list(rows[0]) == ["file", "score", "anomalous", "threshold", "model", "error", "key"]
    failed = {Path(row["file"]).name: row["error"] for row in rows if row["error"]}
    assert set(failed) == {"broken.png", "notes.txt", "missing.png"} and all(failed.values())
    scored = {Path(row["file"]).name: row for row in rows if not row["error"]}
    assert set(scored) == {"good0.png", "good1.png", "bright0.png", "bright1.png"}
    assert {row["anomalous"] for row in scored.values()} <= {"0", "1"}
    assert min(float(scored[f"bright{i}.png"]["score"]) for i in range(2)) > \
        max(float(scored[f"good{i}.png"]["score"]) for i in range(2))


def test_score_with_nothing_readable_fails(folders, tmp_path):
    code = main(["score", "--model", str(tmp_path / "absent.npz"), str(folders["mixed"])])
    assert code == 2  # missing model: one-line error
    model = tmp_path / "model.npz"
    assert main(["fit", "--method", "gaussian", "--normal", str(folders["normal"]), "--out", str(model),
                 "--quiet", "--param", "stages=block6", *TINY]) == 0
    assert main(["score", "--model", str(model), str(folders["mixed"] / "notes.txt"), "--quiet"]) == 1


def test_unknown_param_is_a_one_line_error(folders, tmp_path, capsys):
    code = main(["fit", "--normal", str(folders["normal"]), "--out", str(tmp_path / "m.npz"), "--param", "kk=3"])
    assert code == 2
    assert "unknown setting 'kk'" in capsys.readouterr().err


def test_bench_command_writes_json(tmp_path, folders):
    root = tmp_path / "classes"
    rng = np.random.default_rng(1)
    for name, level in (("dark", 30), ("light", 220)):
        (root / name).mkdir(parents=True)
        for i in range(5):
            pixels = np.clip(level + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    out = tmp_path / "bench.json"
    assert main(["bench", "--method", "dn2", "--dataset", f"oneclass:{root}", "--json", str(out), "--quiet",
                 "--param", "k=1", *TINY]) == 0
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["dark", "light"]
    assert report["settings"]["k"] == 1


def test_progress_bar_and_params_helpers(capsys):
    import io

    stream = io.StringIO()
    bar = TextProgress("extract", stream)
    for done in range(0, 101, 5):
        bar(done, 100)
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("extract") and "100/100" in lines[-1]
    assert parse_params(["a=1", "features.crop = 224"]) == {"a": "1", "features.crop": "224"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_params(["oops"])


def test_crops_cut_non_square_images_whose_masks_stay_on_the_defect(tmp_path):
    """`crops`: a many-sized, non-square set from a square category; each mask still covers its defect's pixels."""
    root = tmp_path / "square"
    rng = np.random.default_rng(0)
    for folder in ("train/good", "test/good", "test/hole", "ground_truth/hole"):
        (root / folder).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 100, (400, 400, 3), dtype=np.uint8)).save(root / "train/good" / f"{i}.png")
        Image.fromarray(rng.integers(0, 100, (400, 400, 3), dtype=np.uint8)).save(root / "test/good" / f"{i}.png")
        image = rng.integers(0, 100, (400, 400, 3), dtype=np.uint8)
        mask = np.zeros((400, 400), np.uint8)
        top, left = rng.integers(0, 380, 2)
        image[top:top + 20, left:left + 20] = 255
        mask[top:top + 20, left:left + 20] = 255
        Image.fromarray(image).save(root / "test/hole" / f"{i}.png")
        Image.fromarray(mask).save(root / "ground_truth/hole" / f"{i}_mask.png")
    out = tmp_path / "crops"
    assert main(["crops", "--source", str(root), "--out", str(out), "--train", "3", "--test", "4"]) == 0
    assert len(list((out / "train/good").iterdir())) == 3 and len(list((out / "test/good").iterdir())) == 4
    for path in sorted((out / "test/defect").iterdir()):
        image = np.asarray(Image.open(path))
        mask = np.asarray(Image.open(out / "ground_truth/defect" / f"{path.stem}_mask.png")) > 0
        assert image.shape[:2] == mask.shape and image.shape[0] != image.shape[1]
        assert mask.any() and (image[mask] == 255).all() and not (image[~mask] == 255).all(axis=-1).any()
    assert main(["crops", "--source", str(root), "--out", str(out)]) == 2  # never overwrites
