"""One contract for every registered method, and model files that fail with the file's name, never a traceback.

For each entry of ``core.detectors.METHODS`` (random weights, tiny synthetic
images): the declared capabilities match the class; fit -> score -> save ->
load gives the same scores (and maps, for segmentation methods); a truncated
file, flipped bytes, another method's model, a random npz, a plain zip and
hand-edited headers each raise ``ModelFileError`` naming the file. Also the
import rules: the layers of ``core`` and of ``dashboard`` (nothing imports
upward), and no circle of imports anywhere.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from core.config import DN2Settings, FeatureSettings, GaussianSettings, PandaSettings, SpadeSettings
from core.datasets import ImageSet
from core.detectors import METHODS, ModelFileError, SegmentationDetector, load_detector, methods_with
from core.detectors.mixins import FeatureDetector
from core.npz_io import NpzFileError, open_npz, read_npz, write_npz
from tests.conftest import REPO_ROOT, synthetic_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEATURES = FeatureSettings(weights="random", resize=32, crop=32, device="cpu", batch_size=16)

TINY = {
    "dn2": DN2Settings(features=FEATURES),
    "gaussian": GaussianSettings(features=FEATURES),
    "spade": SpadeSettings(features=FEATURES, gallery="exact", top_images=4, calibration_images=4),
    "panda": PandaSettings(features=FEATURES, epochs=1, batch_size=8, grad_clip=1.0),
}
"""Settings small enough for a unit test, one per registered method."""


def test_every_registered_method_has_tiny_settings():
    # A new method joins the contract test by adding its tiny settings above.
    assert set(TINY) == set(METHODS)
    for name, settings in TINY.items():
        assert isinstance(settings, METHODS[name].settings_type)


@pytest.mark.parametrize("name", list(METHODS))
def test_declared_capabilities_match_the_class(name):
    info = METHODS[name]
    cls = info.detector_class()
    assert cls.method == name and cls.settings_type is info.settings_type
    assert issubclass(cls, SegmentationDetector) == info.segmentation
    assert issubclass(cls, FeatureDetector) == info.features
    fit_parameters = inspect.signature(cls.fit).parameters
    assert ({"test", "outliers", "on_epoch"} <= set(fit_parameters)) == info.adaptation
    assert info.image_only == (not info.segmentation)
    for preset in info.bench_presets:
        assert set(preset.overrides) <= {f.name for f in dataclasses.fields(info.settings_type)}


def test_bench_and_cli_read_the_registry():
    from core.bench import BENCH_METHODS
    from core.cli.fit import fit_methods

    assert set(BENCH_METHODS) == {p.name for info in METHODS.values() for p in info.bench_presets}
    assert set(fit_methods()) == set(methods_with(adaptation=False))
    assert "panda" not in fit_methods() and "spade" in fit_methods()


@pytest.fixture(scope="module")
def normal():
    return synthetic_images(12, 0, "n", 0)


@pytest.fixture(scope="module")
def test_set():
    return ImageSet([*synthetic_images(4, 0, "tn", 1), *synthetic_images(4, 120, "ta", 2)])


@pytest.fixture(scope="module")
def saved(normal, test_set, tmp_path_factory):
    """name -> (fitted detector, its saved path, its test scores); one fit per method for the module."""
    folder = tmp_path_factory.mktemp("models")
    result = {}
    for name, info in METHODS.items():
        detector = info.make(TINY[name]).fit(normal)
        scores = detector.score(test_set)
        result[name] = (detector, detector.save(folder / f"{name}.npz"), scores)
    return result


@pytest.mark.parametrize("name", list(METHODS))
def test_fit_score_save_load_same_scores(name, saved, test_set):
    detector, path, scores = saved[name]
    assert scores.shape == (len(test_set),) and scores.dtype == np.float64 and np.isfinite(scores).all()
    assert detector.train_scores_ is not None and detector.threshold_ is not None
    loaded = load_detector(path)
    assert type(loaded) is type(detector) and loaded.settings == detector.settings
    assert loaded.threshold_ == detector.threshold_
    np.testing.assert_allclose(loaded.score(test_set), scores, rtol=1e-6, atol=1e-9)
    assert load_detector(path, method=name).method == name


@pytest.mark.parametrize("name", methods_with(segmentation=True))
def test_segmentation_maps_survive_save_load(name, saved, test_set):
    detector, path, _ = saved[name]
    maps = detector.anomaly_maps(test_set)
    crop = detector.image_size.crop
    assert maps.shape == (len(test_set), crop, crop) and maps.dtype == np.float32 and np.isfinite(maps).all()
    assert detector.map_stages
    for stage in detector.map_stages:
        assert detector.combined_maps(stages=(stage,)).shape == maps.shape
    scores, same_maps = detector.score_and_maps(test_set)
    np.testing.assert_allclose(same_maps, maps)
    loaded = load_detector(path, segmentation=True)
    np.testing.assert_allclose(loaded.anomaly_maps(test_set), maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", methods_with(segmentation=False))
def test_image_only_models_are_refused_where_maps_are_needed(name, saved):
    _, path, _ = saved[name]
    with pytest.raises(ModelFileError, match=f"{path}: this is a {METHODS[name].label} model, which gives no heatmaps"):
        load_detector(path, segmentation=True)


# ---------------------------------------------------------------------- damaged and foreign files


def _copy(path: Path, folder: Path, name: str, data: bytes | None = None) -> Path:
    target = folder / name
    target.write_bytes(path.read_bytes() if data is None else data)
    return target


@pytest.mark.parametrize("name", list(METHODS))
def test_truncated_and_flipped_files_name_the_file(name, saved, tmp_path, test_set):
    _, path, scores = saved[name]
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        truncated = _copy(path, tmp_path, f"cut{cut}.npz", data[:cut])
        with pytest.raises(ModelFileError, match=str(truncated)):
            load_detector(truncated)
    # A byte flipped inside the array data: the zip CRC catches it.
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    broken = _copy(path, tmp_path, "flipped.npz", bytes(flipped))
    with pytest.raises(ModelFileError, match=str(broken)):
        load_detector(broken)
    # Anywhere else: either the model loads and scores as before (the byte was, e.g., a timestamp)
    # or the error names the file.
    rng = np.random.default_rng(0)
    for position in rng.choice(len(data), size=12, replace=False):
        flipped = bytearray(data)
        flipped[position] ^= 1 << int(rng.integers(8))
        broken = _copy(path, tmp_path, f"flip{position}.npz", bytes(flipped))
        try:
            loaded = load_detector(broken)
        except ModelFileError as error:
            assert str(error).startswith(str(broken))
            continue
        np.testing.assert_allclose(loaded.score(test_set), scores, rtol=1e-6, atol=1e-9)


def test_another_methods_model_says_what_it_is(saved):
    names = list(METHODS)
    for name, other in zip(names, names[1:] + names[:1]):
        _, path, _ = saved[other]
        with pytest.raises(ModelFileError, match=f"{path}: this is a {other} model, not a {name} model"):
            load_detector(path, method=name)


def test_header_naming_one_method_with_anothers_settings(saved, tmp_path):
    _, path, _ = saved["gaussian"]
    header, arrays = read_npz(path)
    header["method"] = "dn2"
    forged = write_npz(tmp_path / "forged.npz", arrays, header)
    with pytest.raises(ModelFileError, match=f"{forged}: the header says DN2 but the settings are Gaussian's: "
                                             "this is a Gaussian model"):
        load_detector(forged)


def test_foreign_files_name_the_file(tmp_path):
    random_npz = tmp_path / "random.npz"
    np.savez(random_npz, a=np.random.default_rng(0).normal(size=(3, 4)))
    with pytest.raises(ModelFileError, match=f"{random_npz}: not a model file of this tool \\(no header\\)"):
        load_detector(random_npz)
    plain_zip = tmp_path / "photos.zip"
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ModelFileError, match=f"{plain_zip}: not a model file of this tool \\(no header\\)"):
        load_detector(plain_zip)
    text = tmp_path / "notes.npz"
    text.write_text("just text")
    with pytest.raises(ModelFileError, match=f"{text}: not a model file of this tool \\(damaged, or not an .npz"):
        load_detector(text)
    with pytest.raises(ModelFileError, match=f"{tmp_path / 'missing.npz'}: no such model file"):
        load_detector(tmp_path / "missing.npz")
    with pytest.raises(ModelFileError, match=f"{tmp_path}: is a folder"):
        load_detector(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda h: ["a", "list"], "damaged model file header \\(a JSON list, expected an object\\)"),
    (lambda h: {**h, "settings": [1, 2]}, "settings are a list, expected an object"),
    (lambda h: {**h, "threshold": None}, "threshold null, expected a number"),
    (lambda h: {**h, "holdout_fpr": "high"}, "holdout_fpr \"high\""),
    (lambda h: {**h, "method": 7}, "damaged model header \\(method 7, expected a method name\\)"),
    (lambda h: {**h, "method": "autoencoder"}, "a model of an unknown method 'autoencoder'"),
    (lambda h: {**h, "format_version": 99}, "model format 99, expected 1"),
    (lambda h: {k: v for k, v in h.items() if k != "settings"}, "settings are null"),
    (lambda h: {**h, "settings": {**h["settings"], "k": "two"}}, "damaged DN2 model settings"),
    (lambda h: {**h, "settings": {**h["settings"], "features": "lite0"}}, "damaged DN2 model settings"),
    (lambda h: {**h, "settings": {**h["settings"], "features": {**h["settings"]["features"], "batch_size": "x"}}},
     "damaged DN2 model settings \\(FeatureSettings.batch_size is \"x\", not int\\)"),
    (lambda h: {**h, "features_identity": None}, "lacks the backbone identity"),
])
def test_hand_edited_headers_name_the_file(saved, tmp_path, change, message):
    _, path, _ = saved["dn2"]
    header, arrays = read_npz(path)
    edited = tmp_path / "edited.npz"
    encoded = np.frombuffer(json.dumps(change(header)).encode(), dtype=np.uint8)
    np.savez(edited, __header__=encoded, **arrays)
    with pytest.raises(ModelFileError, match=f"{edited}: .*{message}"):
        load_detector(edited)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_model_for_other_weights_names_its_file_when_used(name, saved, tmp_path, test_set):
    _, path, _ = saved[name]
    header, arrays = read_npz(path)
    header["features_identity"]["weights"] = "someone-elses-weights.pth"
    other = write_npz(tmp_path / "other-weights.npz", arrays, header)
    with pytest.raises(ModelFileError, match=f"^{other}: the model was fitted with .* weights 'someone-elses"):
        load_detector(other).score(test_set)


def test_header_is_checked_before_arrays_are_loaded(tmp_path):
    # 1 GiB of zeros deflates to ~1 MB: refused from the .npy header's declared size, never allocated.
    bomb = tmp_path / "bomb.npz"
    header = np.frombuffer(json.dumps({"kind": "not a model"}).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("__header__.npy", _npy_bytes(header))
        with archive.open("zeros.npy", "w", force_zip64=True) as stream:
            stream.write(_npy_prefix((2**30,), "|u1"))
            chunk = bytes(2**24)
            for _ in range(64):
                stream.write(chunk)
    bomb.write_bytes(buffer.getvalue())
    assert bomb.stat().st_size < 5 * 2**20
    with pytest.raises(ModelFileError, match=f"{bomb}: not a model file of this tool \\(model format None"):
        load_detector(bomb)
    with open_npz(bomb) as npz, pytest.raises(NpzFileError, match="declares 1,073,741,824 bytes, more than this file"):
        npz.array("zeros")


def test_a_small_array_in_front_of_a_deflated_tail_is_refused_unread(tmp_path):
    forged = tmp_path / "tail.npz"
    with zipfile.ZipFile(forged, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as stream:
            stream.write(_npy_bytes(np.arange(3)))
            for _ in range(64):
                stream.write(bytes(2**24))
    with open_npz(forged) as npz, pytest.raises(NpzFileError, match=f"{forged}: array 'x' is followed by other data"):
        npz.array("x")


def _npy_prefix(shape: tuple[int, ...], descr: str) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    path = write_npz(tmp_path / "a", {"x": np.arange(3)}, {"kind": "test"})
    assert path.name == "a.npz" and [p.name for p in tmp_path.iterdir()] == ["a.npz"]
    header, arrays = read_npz(path)
    assert header == {"kind": "test"} and arrays["x"].tolist() == [0, 1, 2]
    arrays["x"][0] = 5  # writable, as np.load's arrays are


def test_fisher_files_fail_with_their_name(tmp_path):
    from core.adaptation.fisher import FisherFileError, load_fisher

    damaged = tmp_path / "fisher.npz"
    np.savez(damaged, weight=np.ones(4, dtype=np.float32))
    damaged.write_bytes(damaged.read_bytes()[:-30])
    with pytest.raises(FisherFileError, match=f"{damaged}: "):
        load_fisher(damaged)
    listed = tmp_path / "listed.npz"
    np.savez(listed, __fisher_header__=np.frombuffer(b"[1, 2]", dtype=np.uint8), w=np.ones(2, dtype=np.float32))
    with pytest.raises(FisherFileError, match=f"{listed}: damaged Fisher file header \\(a JSON list"):
        load_fisher(listed)


# ---------------------------------------------------------------------- the import rules

SERVICES = ("core.bench", "core.cli", "core.projects", "core.scoring", "core.tuning", "core.__main__")
"""Modules above the detectors: they may import ``core.detectors``; nothing else outside it may."""

DASHBOARD_FLOORS = {"dashboard.app": 4, "dashboard.views": 3, "dashboard.components": 2, "dashboard.state": 1,
                    "dashboard.tasks": 1, "dashboard.jobs": 1, "dashboard": 1}
"""The dashboard's floors, top down: the app, the pages, their widgets, and below them the session state, the
background work and the job thread (which may import each other, without a circle). A module may import its
own floor or lower ones only."""

SOURCE_FOLDERS = ("core", "dashboard")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    """Every module of the project (``core``, ``dashboard``) by dotted name."""
    return {_module_name(path): path for folder in SOURCE_FOLDERS for path in sorted((REPO_ROOT / folder).rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, at any depth (function-level and ``TYPE_CHECKING`` imports included).

    ``from a.b import c`` counts as importing the module ``a.b.c`` when there is one, else ``a.b``: a package's
    ``__init__`` is only counted when a name is taken from it.
    """
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known}


def _import_graph() -> dict[str, set[str]]:
    sources = _sources()
    return {module: _imports(path, set(sources)) for module, path in sources.items()}


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_upward_imports_in_core():
    """Layers, bottom up: the library (images, datasets, backbones, features, knn, metrics, store,
    npz_io, config, adaptation, ...), then ``core.detectors``, then the services (bench, cli,
    projects, scoring, tuning). A module may import its own layer or lower ones only; ``core`` never
    imports the dashboard."""
    problems = []
    for module, imported in _import_graph().items():
        if not _within(module, ("core",)):
            continue
        upward = {name for name in imported if _within(name, ("dashboard",))}
        if not _within(module, SERVICES):
            upward |= {name for name in imported if _within(name, SERVICES)}
            if not _within(module, ("core.detectors",)):
                upward |= {name for name in imported if _within(name, ("core.detectors",))}
        problems.extend(f"{module} imports {name}" for name in sorted(upward))
    assert not problems, "upward imports:\n" + "\n".join(problems)


def _dashboard_floor(module: str) -> int:
    """The floor of the longest ``DASHBOARD_FLOORS`` prefix that holds ``module``."""
    prefix = max((p for p in DASHBOARD_FLOORS if _within(module, (p,))), key=len)
    return DASHBOARD_FLOORS[prefix]


def test_no_upward_imports_in_the_dashboard():
    """app -> views -> components -> state / tasks / jobs, never back up (the dashboard may import any of core)."""
    floors = {module: _dashboard_floor(module) for module in _sources() if _within(module, ("dashboard",))}
    problems = [f"{module} (floor {floors[module]}) imports {name} (floor {floors[name]})"
                for module, imported in _import_graph().items() if module in floors
                for name in sorted(imported) if name in floors and floors[name] > floors[module]]
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_session_state_and_caches_live_in_state_py():
    """Every ``st.session_state`` key and ``st.cache_*`` function is in ``dashboard/state.py``, where two browser
    sessions' separation can be checked in one place; pages and components go through its functions."""
    problems = []
    for module, path in _sources().items():
        if not _within(module, ("dashboard",)) or module == "dashboard.state":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and (node.attr == "session_state" or node.attr.startswith("cache_")):
                problems.append(f"{module}, line {node.lineno}: {node.attr}")
    assert not problems, "outside dashboard/state.py:\n" + "\n".join(problems)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_circles_are_found_inside_functions_and_packages():
    # The detector of the test below, on a made-up graph: a circle through a function-level import
    # reads like any other edge, and a module importing itself counts.
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "b": {"a.x"}, "c": {"c"}}
    assert _circles(graph) == [["a.x", "a.y", "a.z"], ["c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    """No module imports itself through others, at any depth: a circle hidden in a function-level import still
    makes two modules one, which neither can be read, tested or moved without."""
    graph = _import_graph()
    circles = _circles(graph)
    described = ["  " + " <-> ".join(circle) + ": " + "; ".join(
        f"{a} imports {b}" for a in circle for b in sorted(graph[a]) if b in circle) for circle in circles]
    assert not circles, "import circles:\n" + "\n".join(described)
