"""``--engine ray``: a local Ray cluster with two workers scores (and segments) exactly like the in-process engine.

Ray is an optional dependency; ``.ci/run`` installs it (requirements-ray.txt), so on CI this runs.
One cluster (2 CPUs, no dashboard) serves the whole module to keep its start-up cost to one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")

from core.scoring import EngineOptions, SegmentOptions, read_results, score_files, segment_files  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cluster():
    from core.scoring.ray_engine import connect, shutdown

    connect(num_cpus=2)
    yield ray
    shutdown()


def _images(folder: Path, n: int, seed: int, level: int, side: int = 24) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.clip(level + rng.integers(0, 60, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{folder.name}{i:02d}.png")


def _by_file(rows):
    return {row["file"]: row for row in rows}


def test_ray_engine_equals_in_process_engine(cluster, tmp_path):
    from core.config import DN2Settings, FeatureSettings
    from core.datasets import read_folder
    from core.detectors import make_detector

    _images(tmp_path / "normal", 8, 0, 20)
    _images(tmp_path / "test", 10, 1, 20)
    _images(tmp_path / "odd", 4, 2, 190)
    (tmp_path / "test" / "broken.png").write_bytes(b"not a png")
    settings = DN2Settings(features=FeatureSettings(weights="random", resize=32, crop=32), k=2)
    model = make_detector("dn2", settings).fit(read_folder(tmp_path / "normal", label=0)).save(tmp_path / "m.npz")
    inputs = [tmp_path / "test", tmp_path / "odd"]

    local = tmp_path / "local.csv"
    score_files(model, inputs, local, engine=EngineOptions(batch_size=4))
    distributed = tmp_path / "ray.csv"
    summary = score_files(model, inputs, distributed, engine=EngineOptions("ray", batch_size=4, workers=2))
    assert (summary.scored, summary.errors) == (14, 1)
    want, got = _by_file(read_results(local)), _by_file(read_results(distributed))
    assert set(got) == set(want) and len(read_results(distributed)) == 15
    for name, row in want.items():
        assert (got[name]["error"], got[name]["anomalous"], got[name]["model"]) == (row["error"], row["anomalous"], row["model"])
        if not row["error"]:
            assert abs(float(got[name]["score"]) - float(row["score"])) <= 1e-5 * abs(float(row["score"]))

    # Resume on the Ray engine skips what is there and adds nothing.
    again = score_files(model, inputs, distributed, resume=True, engine=EngineOptions("ray", workers=2))
    assert (again.skipped, again.scored) == (15, 0) and len(read_results(distributed)) == 15


def test_ray_engine_segments_like_in_process(cluster, tmp_path):
    from core.config import FeatureSettings, SpadeSettings
    from core.datasets import read_folder
    from core.detectors import make_detector

    _images(tmp_path / "normal", 5, 3, 60, 40)
    _images(tmp_path / "test", 3, 4, 120, 40)
    settings = SpadeSettings(features=FeatureSettings(weights="random", resize=64, crop=64), calibration_images=3)
    model = make_detector("spade", settings).fit(read_folder(tmp_path / "normal", label=0)).save(tmp_path / "s.npz")
    segment_files(model, [tmp_path / "test"], tmp_path / "local", SegmentOptions(), engine=EngineOptions(batch_size=2))
    summary = segment_files(model, [tmp_path / "test"], tmp_path / "ray", SegmentOptions(),
                            engine=EngineOptions("ray", batch_size=2, workers=2))
    assert summary.scored == 3
    want = _by_file(read_results(tmp_path / "local" / "segment.csv"))
    got = _by_file(read_results(tmp_path / "ray" / "segment.csv"))
    assert set(got) == set(want)
    for name, row in want.items():
        assert float(got[name]["image_score"]) == pytest.approx(float(row["image_score"]), rel=1e-5)
        with np.load(tmp_path / "local" / row["npz"]) as a, np.load(tmp_path / "ray" / got[name]["npz"]) as b:
            np.testing.assert_allclose(b["heatmap"], a["heatmap"], rtol=1e-5, atol=1e-6)
        assert (tmp_path / "ray" / got[name]["overlay"]).is_file()
