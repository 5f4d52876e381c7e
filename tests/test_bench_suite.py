"""The development suite (core.tuning.suite, ``python -m core bench-suite``) on two tiny lines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from core.__main__ import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _category(root, seed: int, size: int = 48):
    """A tiny MVTec-layout category of striped images; defects are bright squares with masks."""
    rng = np.random.default_rng(seed)

    def stripes(height, width):
        x = np.arange(width)[None, :].repeat(height, 0)
        base = 128 + 60 * np.sin(2 * np.pi * x / 12 + rng.uniform(0, 2 * np.pi))
        return np.clip(base[..., None] + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)

    for i in range(10):
        path = root / "train" / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(stripes(size, size)).save(path)
    for folder in ("good", "crack"):
        for i in range(4):
            image = stripes(size, size)
            if folder == "crack":
                image[10:20, 12:22] = 250
                mask = np.zeros((size, size), np.uint8)
                mask[10:20, 12:22] = 255
                (root / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "ground_truth" / folder / f"{i:03d}_mask.png")
            (root / "test" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "test" / folder / f"{i:03d}.png")


def test_the_suite_prints_every_row_fidelity_and_the_leave_one_line_out_table(tmp_path, monkeypatch, capsys):
    import core.tuning.search as search

    monkeypatch.setattr(search, "RESOLUTIONS", (64,))
    data = tmp_path / "data"
    _category(data / "mvtec_ad" / "bottle", seed=0)
    _category(data / "deeppcb" / "pcb", seed=1)
    out = tmp_path / "reports"
    args = ["bench-suite", "--data", str(data), "--cache", str(tmp_path / "cache"), "--lines", "bottle,deeppcb",
            "--weights", "random", "--param", "features.resize=64", "--param", "features.crop=64",
            "--param", "features.batch_size=8", "--labelled", "0,1", "--out", str(out), "--markdown", str(tmp_path / "suite.md"), "--json", str(tmp_path / "suite.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "leave one line out" in printed and "fidelity" in printed
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert [r["line"] for r in suite["lines"]] == ["bottle", "deeppcb"]
    for report in suite["lines"]:
        for row in ("dn2", "gaussian", "defaults", "tuned"):
            assert 0.0 <= report[row]["image_auroc"] <= 1.0
        assert set(report["fidelity"]) >= {"pixel_auroc", "pro", "image_fused"}
        assert report["audit"] and all("real_pro" in row and "synthetic_pro" in row for row in report["audit"])
        assert report["loss"]["worst"] == min(v for k, v in report["loss"].items() if k != "worst")
        # One marked defect and one good image: evaluated on the other test images, beside the oracle.
        marked = report["labelled"]["1"]
        assert marked["n_marked"] == 2 and marked["n_evaluated"] == report["labelled"]["0"]["n_evaluated"] - 2
        assert 0.0 <= marked["oracle"]["image_auroc"] <= 1.0 and marked["image_rule"] in ("dn2", "topk", "fused")
        assert report["tuned"]["image_auroc"] == report["labelled"]["0"]["image_auroc"]
    assert "marked defects" in printed
    table = (tmp_path / "suite.md").read_text()
    assert table.count("| bottle |") >= 3 and "| held-out line |" in table and "| marked N |" in table
    loo = suite["leave_one_line_out"]
    assert [row["line"] for row in loo] == ["bottle", "deeppcb"]
    assert all(row["image_rule"] in ("dn2", "topk", "fused") and (row["margin"] >= 0 or math.isinf(row["margin"]))
               for row in loo)
    # Reports written per line are read back instead of being run again ...
    assert main(["bench-suite", "--data", str(data), "--lines", "bottle,deeppcb", "--out", str(out)]) == 0
    assert "read" in capsys.readouterr().out
    # ... and after a tuner change only the tuned row (and its audit) is run again.
    before = json.loads((out / "bottle.json").read_text())
    assert main(args[:-2] + ["--lines", "bottle", "--rows", "tuned", "--labelled", "0"]) == 0
    after = json.loads((out / "bottle.json").read_text())
    assert after["dn2"] == before["dn2"] and after["defaults"] == before["defaults"]
    assert after["tuned"]["seconds"] != before["tuned"]["seconds"]
