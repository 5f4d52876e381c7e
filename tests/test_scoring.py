"""Streaming scoring (core.scoring): equals batch scoring, error rows, lazy inputs, bounded look-ahead, resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.scoring import (
    SCORE_COLUMNS, EngineOptions, ResultFileError, SegmentOptions, iter_sources, open_results, read_results,
    score_files, segment_files,
)
from core.scoring.inputs import Source
from core.scoring.stream import decoded_batches
from conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"weights": "random", "resize": 32, "crop": 32}


def _save(folder: Path, name: str, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / name)
    return folder / name


def _noise(rng, level: int, side: int = 24) -> np.ndarray:
    return np.clip(level + rng.integers(0, 60, (side, side, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """normal/ (10 dark), test/ (6 dark, 6 bright, 1 corrupt), and a DN2 model fitted on normal/ (random weights)."""
    from core.config import DN2Settings, FeatureSettings
    from core.datasets import read_folder
    from core.detectors import make_detector

    root = tmp_path_factory.mktemp("scoring")
    rng = np.random.default_rng(0)
    for i in range(10):
        _save(root / "normal", f"n{i:02d}.png", _noise(rng, 20))
    for i in range(6):
        _save(root / "test", f"dark{i}.png", _noise(rng, 20))
        _save(root / "test", f"light{i}.png", _noise(rng, 180))
    (root / "test" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    settings = DN2Settings(features=FeatureSettings(**TINY), k=2, target_fpr=0.1)
    detector = make_detector("dn2", settings).fit(read_folder(root / "normal", label=0))
    model = detector.save(root / "dn2.npz")
    return {"root": root, "test": root / "test", "normal": root / "normal", "model": model, "detector": detector}


def _by_file(rows):
    return {row["file"]: row for row in rows}


def test_streaming_equals_batch_scoring_and_bad_file_is_an_error_row(data, tmp_path):
    from core.datasets import read_folder

    out = tmp_path / "scores.csv"
    summary = score_files(data["model"], [data["test"]], out, engine=EngineOptions(batch_size=5, workers=2))
    rows = read_results(out)
    assert list(rows[0]) == list(SCORE_COLUMNS)
    assert (summary.scored, summary.errors) == (12, 1) and len(rows) == 13
    broken = _by_file(rows)[str(data["test"] / "broken.png")]
    assert broken["score"] == "" and broken["anomalous"] == "" and "header" in broken["error"]
    # The same images through the ImageSet path (validate + score in one go).
    images = read_folder(data["test"]).validate(data["detector"].image_size)
    expected = data["detector"].score(images)
    streamed = np.array([float(_by_file(rows)[item.path]["score"]) for item in images])
    np.testing.assert_allclose(streamed, expected, rtol=1e-5)
    flagged = {Path(r["file"]).name for r in rows if r["anomalous"] == "1"}
    assert {f"light{i}.png" for i in range(6)} <= flagged
    assert all(r["model"].startswith("dn2@") for r in rows)


def test_jsonl_output_and_inputs_from_zip_glob_and_list_file(data, tmp_path):
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(data["test"] / "light0.png", "inner/light0.png")
        handle.writestr("readme.md", "not an image")
    listing = tmp_path / "todo.txt"
    listing.write_text(f"# two files and a missing one\n{data['test'] / 'dark0.png'}\nnowhere.png\n")
    pattern = str(data["test"] / "dark[12].png")
    out = tmp_path / "scores.jsonl"
    score_files(data["model"], [archive, listing, pattern], out)
    rows = _by_file(read_results(out))
    assert set(rows) == {
        f"{archive}!inner/light0.png", f"{archive}!readme.md", str(data["test"] / "dark0.png"),
        str(tmp_path / "nowhere.png"), str(data["test"] / "dark1.png"), str(data["test"] / "dark2.png"),
    }
    assert rows[f"{archive}!readme.md"]["error"].startswith("not an image file type")
    assert rows[str(tmp_path / "nowhere.png")]["error"] == "no such file or folder"
    assert rows[f"{archive}!inner/light0.png"]["anomalous"] is True and rows[f"{archive}!inner/light0.png"]["score"] > 0
    assert rows[f"{archive}!inner/light0.png"]["key"].startswith("zip:")
    again = score_files(data["model"], [archive, listing, pattern], out, resume=True)
    assert (again.skipped, again.scored, again.errors) == (6, 0, 0) and len(read_results(out)) == 6


def test_decoding_pulls_the_listing_only_a_bounded_way_ahead(data):
    from core.images import ImageSize

    pulled = []
    good = str(data["test"] / "dark0.png")

    def listing():
        for i in range(1000):
            pulled.append(i)
            yield Source(f"{good}#{i}", good, key=str(i))

    batches = decoded_batches(listing(), ImageSize(32, 32), batch_size=4, workers=2, prefetch=8)
    for _ in range(3):
        batch = next(batches)
        assert len(batch) == 4 and all(d.ok for d in batch)
    # 12 images consumed; at most prefetch (8) more were listed: memory does not grow with the input.
    assert len(pulled) <= 12 + 8
    batches.close()


def test_resume_skips_done_rows_and_drops_a_torn_line(tmp_path):
    out = tmp_path / "r.csv"
    writer, done = open_results(out, SCORE_COLUMNS, resume=True, model="m@1")
    assert done == set()
    writer.write([{"file": "a.png", "score": 1.5, "anomalous": True, "threshold": 1.0, "model": "m@1", "error": "",
                   "key": "1:2"}])
    writer.close()
    with open(out, "a") as stream:
        stream.write("b.png,0.2,0,1.0,m@1,,3:")  # a kill in the middle of a row
    writer, done = open_results(out, SCORE_COLUMNS, resume=True, model="m@1")
    writer.close()
    assert done == {("a.png", "1:2")}
    assert out.read_text().endswith("1:2\n")  # the torn line is gone, the good row kept
    with pytest.raises(ResultFileError, match="scored by model"):
        open_results(out, SCORE_COLUMNS, resume=True, model="other@2")
    with pytest.raises(ValueError, match="needs an output file"):
        open_results(None, SCORE_COLUMNS, resume=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "core", "score", *args]


def test_killed_and_resumed_run_equals_an_uninterrupted_one(data, tmp_path):
    """A real SIGKILL part-way through; --resume completes it: same rows, same scores, nothing twice."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "many"
    for i in range(300):
        _save(folder, f"img{i:03d}.png", _noise(rng, 20 if i % 7 else 170))
    (folder / "zz_bad.png").write_bytes(b"garbage")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "ANOMALY_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    common = ["--model", str(data["model"]), str(folder), "--batch-size", "2", "--threads", "1", "--quiet"]
    full = tmp_path / "full.csv"
    subprocess.run(_cli(*common, "--csv", str(full)), env=env, cwd=REPO_ROOT, check=True, timeout=300,
                   capture_output=True)

    out = tmp_path / "killed.csv"
    process = subprocess.Popen(_cli(*common, "--csv", str(out)), env=env, cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") > 20:  # header + some batches, not all 301 rows
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = read_results(out)
    assert process.returncode == -signal.SIGKILL and 0 < len(partial) < 301, "the run was not killed part-way"

    resumed = subprocess.run(_cli(*common, "--csv", str(out), "--resume"), env=env, cwd=REPO_ROOT, timeout=300,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(partial)} already in the output" in resumed.stderr
    rows, expected = read_results(out), read_results(full)
    assert len(rows) == len(expected) == 301
    assert len({row["file"] for row in rows}) == 301  # nothing written twice
    got, want = _by_file(rows), _by_file(expected)
    assert set(got) == set(want)
    for name, row in want.items():
        assert (got[name]["error"], got[name]["anomalous"], got[name]["key"]) == (row["error"], row["anomalous"], row["key"])
        if not row["error"]:
            assert float(got[name]["score"]) == pytest.approx(float(row["score"]), rel=1e-6)


def test_segment_files_writes_maps_and_rows(tmp_path):
    """SPADE through the streaming path: PNG + npz per image, same image scores as the ImageSet path."""
    from core.config import FeatureSettings, SpadeSettings
    from core.datasets import read_folder
    from core.detectors import make_detector

    rng = np.random.default_rng(5)
    for i in range(5):
        _save(tmp_path / "normal", f"n{i}.png", _noise(rng, 60, 48))
    for i in range(3):
        _save(tmp_path / "test", f"t{i}.png", _noise(rng, 60 + 60 * i, 48))
    (tmp_path / "test" / "bad.png").write_bytes(b"nope")
    settings = SpadeSettings(features=FeatureSettings(weights="random", resize=64, crop=64), calibration_images=3)
    detector = make_detector("spade", settings).fit(read_folder(tmp_path / "normal", label=0))
    model = detector.save(tmp_path / "spade.npz")
    summary = segment_files(model, [tmp_path / "test"], tmp_path / "out", SegmentOptions(),
                            engine=EngineOptions(batch_size=2))
    assert (summary.scored, summary.errors) == (3, 1)
    rows = _by_file(read_results(tmp_path / "out" / "segment.csv"))
    assert rows[str(tmp_path / "test" / "bad.png")]["error"]
    good = read_folder(tmp_path / "test").validate(detector.image_size)
    expected = detector.score(good)
    for item, score in zip(good, expected):
        row = rows[item.path]
        assert float(row["image_score"]) == pytest.approx(score, rel=1e-5)
        assert Image.open(tmp_path / "out" / row["overlay"]).size == (48, 48)
        with np.load(tmp_path / "out" / row["npz"], allow_pickle=False) as maps:
            assert maps["heatmap"].shape == (64, 64) and maps["heatmap"].dtype == np.float32
            assert tuple(maps["original_hw"]) == (48, 48)


def test_iter_sources_lists_lazily_in_name_order(tmp_path):
    for name in ("b.png", "a.png", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    sources = iter_sources([tmp_path])
    first = next(sources)
    assert first.file == str(tmp_path / "a.png") and first.key.count(":") == 1
    assert [s.file for s in sources] == [str(tmp_path / "b.png")]


@pytest.mark.realdata
def test_bench_scale_reports_speed_memory_and_resume(tmp_path):
    """The scale benchmark end to end on 400 Fashion-MNIST images (random weights, local engine)."""
    import json

    from core.__main__ import main
    from core.datasets import FASHION_MNIST_DIR

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed")
    report_file = tmp_path / "report.json"
    code = main(["bench-scale", "--n", "400", "--engines", "local", "--resume-n", "120", "--bare-n", "64",
                 "--normal", "40", "--weights", "random", "--batch-size", "16", "--threads", "1",
                 "--data-dir", str(tmp_path / "images"), "--json", str(report_file)])
    assert code == 0
    report = json.loads(report_file.read_text())
    assert report["local"]["scored"] == 400 and report["local"]["errors"] == 0
    assert set(report["local"]["memory_mb"]) == {"10", "50", "100"}
    assert report["bare_images_per_s"] > 0 and report["local"]["images_per_s"] > 0
    resume = report["resume"]
    assert resume["killed"] and 0 < resume["rows_when_killed"] < 120 and resume["ok"]


def test_command_line_errors_are_one_line(data, monkeypatch, capsys):
    from core.__main__ import main

    # --resume needs a file to resume; without Ray installed, --engine ray says how to get it.
    assert main(["score", "--model", str(data["model"]), str(data["test"]), "--resume", "--quiet"]) == 2
    assert "--resume needs an output file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["score", "--model", str(data["model"]), str(data["test"]), "--engine", "ray", "--quiet"]) == 2
    assert "pip install -r requirements-ray.txt" in capsys.readouterr().err


def test_decoding_in_processes_gives_the_rows_of_decoding_in_threads(data, tmp_path):
    by_mode = {}
    for mode in ("threads", "processes"):
        out = tmp_path / f"{mode}.csv"
        summary = score_files(data["model"], [data["test"]], out,
                              engine=EngineOptions(batch_size=5, workers=2, decode=mode))
        assert (summary.scored, summary.errors) == (12, 1)
        by_mode[mode] = read_results(out)
    assert [r["file"] for r in by_mode["threads"]] == [r["file"] for r in by_mode["processes"]]
    for threaded, spawned in zip(by_mode["threads"], by_mode["processes"]):
        assert threaded["error"] == spawned["error"]
        if not threaded["error"]:
            assert float(spawned["score"]) == pytest.approx(float(threaded["score"]), rel=1e-6)


def test_auto_decoding_uses_processes_only_for_long_runs(monkeypatch):
    from core.scoring import stream

    monkeypatch.setattr(stream.os, "cpu_count", lambda: 2)
    assert not stream.use_processes("auto", 50) and not stream.use_processes("auto", None)
    assert stream.use_processes("auto", stream.PROCESS_DECODING_MIN_IMAGES)
    monkeypatch.setattr(stream.os, "cpu_count", lambda: 1)
    assert not stream.use_processes("auto", 10**6)
    assert stream.use_processes("processes", 1) and not stream.use_processes("threads", 10**6)
    with pytest.raises(ValueError, match="decode must be one of"):
        EngineOptions(decode="fibers")


def test_a_file_that_kills_its_decoding_process_costs_only_its_own_row(data, tmp_path):
    from _crash_decoder import decode_or_die

    from core.images import ImageSize
    from core.scoring.decode_processes import WORKER_CRASHED, process_decoded_batches

    good = str(data["test"] / "dark0.png")
    crash = _save(tmp_path, "crash.png", _noise(np.random.default_rng(1), 20))
    files = [good] * 5 + [str(crash), good, str(crash)] + [good] * 2  # two crashes in one batch of four
    sources = [Source(f"{name}#{i}", name, key=str(i)) for i, name in enumerate(files)]
    batches = list(process_decoded_batches(sources, ImageSize(32, 32), batch_size=4, workers=1,
                                           decode=decode_or_die))
    decoded = [d for batch in batches for d in batch]
    assert [d.source.file for d in decoded] == [s.file for s in sources]  # every file, in order, once
    assert [d.error for d in decoded] == [""] * 5 + [WORKER_CRASHED, "", WORKER_CRASHED] + [""] * 2


def test_decoding_processes_do_not_run_the_parents_main_script_again(data, tmp_path, monkeypatch):
    """Under Streamlit the dashboard page is ``__main__``; spawned decoders must not execute it again."""
    import types

    from core.images import ImageSize
    from core.scoring.decode_processes import process_decoded_batches

    marker = tmp_path / "main-ran"
    script = tmp_path / "page.py"
    script.write_text(f"open({str(marker)!r}, 'a').write('ran\\n')\n")
    page = types.ModuleType("__main__")
    page.__file__ = str(script)  # what Streamlit's script module looks like: a file, no import spec
    page.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", page)
    good = str(data["test"] / "dark0.png")
    sources = [Source(f"{good}#{i}", good, key=str(i)) for i in range(6)]
    decoded = [d for batch in process_decoded_batches(sources, ImageSize(32, 32), batch_size=2, workers=2)
               for d in batch]
    assert len(decoded) == 6 and all(d.ok for d in decoded)
    assert not marker.exists()
    assert sys.modules["__main__"] is page  # put back
