"""Property tests (hypothesis): whatever bytes or JSON a user hands in, only the project's own errors come out.

* random bytes, random mutations of a real model file, and real model files
  with random JSON in their header go to ``load_detector``: it loads or raises
  ``ModelFileError`` naming the file, nothing else;
* random bytes (bare, or behind a PNG / JPEG / zip signature) go to
  ``decode_image``: it decodes or raises ``ImageError``;
* any file name (any bytes) written to a CSV / JSONL result file is found again by
  ``--resume``, and random damage to a result file makes ``--resume`` raise
  ``ResultFileError`` naming the file, without changing a byte of it;
* real model files with random geometry (resize, crop, tile, aspect) in their
  header load with a geometry that fits in memory, or raise ``ModelFileError``;
* random bytes, and real workspace databases with random bytes changed, open as a
  workspace or raise ``WorkspaceDatabaseError`` naming the database, nothing else;
* Table 6 files with random JSON in any field go to ``adapt --merge``: it merges
  or raises ``ValueError`` naming the file, nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.config import DN2Settings, FeatureSettings, SpadeSettings
from core.detectors import ModelFileError, load_detector, make_detector
from core.images import ImageError, decode_image
from core.npz_io import read_npz
from core.scoring import SCORE_COLUMNS, ResultFileError, open_results
from tests.conftest import synthetic_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEATURES = FeatureSettings(weights="random", resize=32, crop=32, device="cpu", batch_size=16)

_folder = Path()


@pytest.fixture(scope="module", autouse=True)
def _workdir(tmp_path_factory):
    """Where the candidate files go (module-scoped: hypothesis reruns each test many times)."""
    global _folder
    _folder = tmp_path_factory.mktemp("property-inputs")
    _MODELS.clear()


def _model(method: str, settings_) -> tuple[bytes, dict, dict]:
    path = make_detector(method, settings_).fit(synthetic_images(8, 0, "n", 0)).save(_folder / f"{method}.npz")
    header, arrays = read_npz(path)
    return path.read_bytes(), header, arrays


_MODELS: dict[str, tuple[bytes, dict, dict]] = {}


def model(method: str) -> tuple[bytes, dict, dict]:
    """A small real model of ``method`` (fitted once per session): (file bytes, header, arrays)."""
    if method not in _MODELS:
        tiny = {"dn2": DN2Settings(features=FEATURES),
                "spade": SpadeSettings(features=FEATURES, gallery="exact", top_images=4, calibration_images=4)}
        _MODELS[method] = _model(method, tiny[method])
    return _MODELS[method]


def _load(data: bytes) -> None:
    path = _folder / "candidate.npz"
    path.write_bytes(data)
    try:
        load_detector(path)
    except ModelFileError as error:
        assert str(error).startswith(str(path)), error


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes_into_the_model_loader(data):
    _load(data)


@FAST
@given(st.sampled_from(["dn2", "spade"]), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                                   min_size=1, max_size=4))
def test_mutated_model_files(method, changes):
    data = bytearray(model(method)[0])
    for where, value in changes:
        data[int(where * len(data))] = value
    _load(bytes(data))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@FAST
@given(st.sampled_from(["dn2", "spade"]), st.data())
def test_random_json_in_a_real_header(method, data):
    _, header, arrays = model(method)
    header = json.loads(json.dumps(header))
    # Replace a few fields (settings fields included) by random JSON, or the whole header.
    if data.draw(st.booleans(), "whole header"):
        header = data.draw(json_values, "header")
    else:
        for _ in range(data.draw(st.integers(1, 3), "edits")):
            target = header
            if data.draw(st.booleans(), "in settings") and isinstance(header.get("settings"), dict):
                target = header["settings"]
            key = data.draw(st.sampled_from(sorted(target)) if target else st.text(max_size=8), "key")
            target[key] = data.draw(json_values, "value")
    path = _folder / "edited.npz"
    encoded = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(path, __header__=encoded, **arrays)
    try:
        load_detector(path)
    except ModelFileError as error:
        assert str(error).startswith(str(path)), error


_SIGNATURES = [b"", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff\xe0", b"PK\x03\x04",
               b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(_SIGNATURES), st.binary(max_size=2048))
def test_random_bytes_into_the_image_decoder(signature, body):
    try:
        pixels = decode_image(signature + body, name="upload.png")
    except ImageError as error:
        assert error.source == "upload.png"
        return
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8


# ---------------------------------------------------------------------- result files read by --resume
file_names = st.binary(min_size=1, max_size=40).filter(lambda name: b"/" not in name and b"\0" not in name)


@FAST
@given(st.sampled_from(["r.csv", "r.jsonl"]), st.lists(file_names, min_size=1, max_size=6, unique=True))
def test_any_file_name_written_to_a_result_file_is_found_again_on_resume(name, raw_names):
    path = _folder / name
    path.unlink(missing_ok=True)
    names = [os.fsdecode(b"dir/" + raw) for raw in raw_names]  # how Python holds a name read from disk
    writer, _ = open_results(path, SCORE_COLUMNS)
    writer.write([{"file": file, "score": 0.5, "anomalous": False, "threshold": 1.0, "model": "m@1", "error": "",
                   "key": f"{i}:1"} for i, file in enumerate(names)])
    writer.close()
    text = path.read_bytes().decode("utf-8")  # valid UTF-8 whatever the names were
    assert text.count("\n") == len(names) + (name.endswith(".csv"))  # one line per row (+ the CSV header)
    writer, done = open_results(path, SCORE_COLUMNS, resume=True, model="m@1")
    writer.close()
    assert all((file, f"{i}:1") in done for i, file in enumerate(names))
    assert len(done) == len(names)


@FAST
@given(st.sampled_from(["r.csv", "r.jsonl"]), st.binary(max_size=300), st.floats(0, 1), st.booleans())
def test_damaged_result_files_are_refused_or_resumed_never_crash(name, junk, where, replace):
    path = _folder / name
    path.unlink(missing_ok=True)
    writer, _ = open_results(path, SCORE_COLUMNS)
    writer.write([{"file": f"img{i}.png", "score": 0.5, "anomalous": False, "threshold": 1.0, "model": "m@1",
                   "error": "", "key": f"{i}:1"} for i in range(3)])
    writer.close()
    data = path.read_bytes()
    at = int(where * len(data))
    data = data[:at] + junk + data[at + (len(junk) if replace else 0):]
    path.write_bytes(data)
    try:
        writer, done = open_results(path, SCORE_COLUMNS, resume=True, model="m@1")
    except ResultFileError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
        assert path.read_bytes() == data  # refused: not a byte changed
        return
    writer.close()
    # Resumed: only a torn last line may have been cut, every complete line before it was kept.
    kept = path.read_bytes()
    assert data.startswith(kept) and (kept == data or b"\n" not in data[len(kept):])
    assert all(isinstance(file, str) and isinstance(key, str) for file, key in done)


# ---------------------------------------------------------------------- adapt --merge's table reader


def _random_edit(document: Any, data) -> Any:
    """``document`` with one value somewhere inside it (or the whole of it) replaced by random JSON."""
    if not isinstance(document, (dict, list)) or not document or data.draw(st.integers(0, 4), "stop here") == 0:
        return data.draw(json_values, "value")
    if isinstance(document, dict):
        key = data.draw(st.sampled_from(sorted(document)), "key")
        return {**document, key: _random_edit(document[key], data)}
    index = data.draw(st.integers(0, len(document) - 1), "index")
    return [*document[:index], _random_edit(document[index], data), *document[index + 1:]]


@FAST
@given(st.data())
def test_random_json_in_a_table_given_to_adapt_merge(data):
    from core.cli.adapt import merge_tables
    from tests.test_hardening import table_document

    first, second = _folder / "t6_a.json", _folder / "t6_b.json"
    first.write_text(json.dumps(table_document(("Trouser",))))
    second.write_text(json.dumps(_random_edit(table_document(("Bag", "Coat")), data)))
    try:
        merged = merge_tables([str(first), str(second)], None)
    except ValueError as error:
        assert str(error).startswith((str(first), str(second))), error
        return
    assert "Trouser" in merged["classes"]


# ---------------------------------------------------------------------- model-header geometry

sides = st.none() | st.integers(-10, 40) | st.integers(-2**40, 2**40) | st.sampled_from([4096, 4097, 20_000, 10**9])


@FAST
@given(st.sampled_from(["dn2", "spade"]), sides, sides, st.integers(-10, 2**20) | st.sampled_from([0, 32, 64, 4096]),
       st.sampled_from(["stretch", "pad"]))
def test_random_geometry_in_a_real_header(method, resize, crop, tile, aspect):
    from core.config import MAX_INPUT_SIDE

    _, header, arrays = model(method)
    header = json.loads(json.dumps(header))
    header["settings"]["features"].update(resize=resize, crop=crop, tile=tile, aspect=aspect)
    path = _folder / "geometry.npz"
    np.savez(path, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    try:
        detector = load_detector(path)
    except ModelFileError as error:
        assert str(error).startswith(f"{path}: "), error
        return
    size = detector.image_size  # the geometry it would run at: valid, and small enough for one machine
    assert 1 <= size.crop <= size.resize <= MAX_INPUT_SIDE
    assert tile == 0 or tile % 32 == 0 and tile <= MAX_INPUT_SIDE


# ---------------------------------------------------------------------- opening a workspace database

_DATABASE: list[bytes] = []


def _real_database() -> bytes:
    """The database file of a small real workspace (two projects, a model row), made once."""
    if not _DATABASE:
        from core.store import Workspace

        workspace = Workspace(_folder / "template-workspace")
        for name in ("line 1", "line 2"):
            project = workspace.create_project(name)
            workspace.set_preference(project.id, "threshold", "0.5")
        _DATABASE.append(workspace.database.read_bytes())
    return _DATABASE[0]


@FAST
@given(st.one_of(st.binary(max_size=8192),
                 st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)))
def test_opening_a_random_or_damaged_workspace_database(change):
    from core.store import Workspace, WorkspaceDatabaseError

    folder = _folder / "candidate-workspace"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("workspace.sqlite3*"):
        old.unlink()
    if isinstance(change, bytes):
        data = change
    else:
        data = bytearray(_real_database())
        for where, value in change:
            data[int(where * len(data))] = value
    database = folder / "workspace.sqlite3"
    database.write_bytes(bytes(data))
    try:
        workspace = Workspace(folder)
        workspace.projects()
        workspace.counts(1)
    except WorkspaceDatabaseError as error:
        assert str(error).startswith(f"{database}: "), error
