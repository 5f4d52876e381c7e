"""The weak cases of a new user's bad inputs: folders outside the allowed roots, concurrent demo
imports, images padded with megabytes of other data, zip problems that name the archive."""

from __future__ import annotations

import io
import multiprocessing
import zipfile

import numpy as np
import pytest

from core.images import ImageError, decode_image
from core.paths import FolderNotAllowed, allowed_folder, folder_roots
from tests.conftest import png_bytes


def test_folders_must_lie_under_a_root(tmp_path, monkeypatch):
    inside, outside = tmp_path / "data" / "bottle", tmp_path / "elsewhere"
    inside.mkdir(parents=True)
    outside.mkdir()
    monkeypatch.setenv("ANOMALY_FOLDER_ROOTS", str(tmp_path / "data"))
    assert allowed_folder(inside) == inside.resolve()
    assert allowed_folder(tmp_path / "data") == (tmp_path / "data").resolve()
    with pytest.raises(FolderNotAllowed, match=f"{outside}: outside the folders this app may use .*ANOMALY_FOLDER_ROOTS"):
        allowed_folder(outside)
    with pytest.raises(FolderNotAllowed):
        allowed_folder(inside / ".." / ".." / "elsewhere")
    (inside / "link").symlink_to(outside)  # a link under a root cannot lead outside it
    with pytest.raises(FolderNotAllowed):
        allowed_folder(inside / "link")
    monkeypatch.setenv("ANOMALY_FOLDER_ROOTS", "*")
    assert folder_roots() is None and allowed_folder(outside) == outside.resolve()


def test_default_roots_are_home_and_the_workspace(workspace_dir, monkeypatch):
    from pathlib import Path

    monkeypatch.delenv("ANOMALY_FOLDER_ROOTS", raising=False)
    assert folder_roots() == (Path.home().resolve(), workspace_dir.resolve())
    assert allowed_folder(workspace_dir / "sub") == (workspace_dir / "sub").resolve()


def _import_demo(root: str, barrier) -> tuple[int, int]:
    from dashboard.tasks import import_demo

    from core.store import Workspace

    barrier.wait()
    project, report = import_demo(Workspace(root), "fashion")
    return project.id, len(report.added)


def test_two_processes_importing_the_demo_at_once(workspace_dir):
    from core.store import Workspace

    Workspace(workspace_dir)  # schema created once, as the app does at start
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(2)
    with context.Pool(2) as pool:
        results = pool.starmap(_import_demo, [(str(workspace_dir), barrier)] * 2)
    workspace = Workspace(workspace_dir)
    assert len({project_id for project_id, _ in results}) == 1 and len(workspace.projects()) == 1
    counts = workspace.counts(results[0][0])
    # Every image once: the second import found the first's rows.
    assert sum(added for _, added in results) == counts["normal"] + counts["test"] > 0


def test_image_padded_with_other_data_is_refused_with_a_message():
    image = png_bytes(np.zeros((64, 64, 3), dtype=np.uint8))
    assert decode_image(image + bytes(1000)).shape == (64, 64, 3)  # a little trailing data is tolerated
    with pytest.raises(ImageError, match="upload.png: file is 9,437,.* bytes, far more than a 64x64 image needs"):
        decode_image(image + bytes(9 * 2**20), name="upload.png")


def test_zip_inputs_name_the_archive(tmp_path):
    from core.cli import read_images

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("good.png", png_bytes(np.zeros((16, 16, 3), dtype=np.uint8)))
        handle.writestr("notes.txt", "hello")
    images = read_images(archive)
    assert images.names == [f"{archive}!good.png"]
    assert [str(problem) for problem in images.problems] == [f"{archive}!notes.txt: not an image file type (.txt); skipped"]
    from core.datasets import read_zip

    with pytest.raises(ValueError, match="upload.zip: not a zip archive"):
        read_zip(io.BytesIO(b"not a zip").getvalue())


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_says_which_model_file_is_damaged(tmp_path, capsys):
    from core.__main__ import main
    from core.config import DN2Settings, FeatureSettings
    from core.detectors import make_detector
    from tests.conftest import synthetic_images

    settings = DN2Settings(features=FeatureSettings(weights="random", resize=32, crop=32, device="cpu"))
    model = make_detector("dn2", settings).fit(synthetic_images(6, 0, "n", 0)).save(tmp_path / "model.npz")
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(np.zeros((32, 32, 3), dtype=np.uint8)))
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(model.read_bytes()[:-40])
    for command in (["score", "--model", str(damaged), str(image)],
                    ["segment", "--model", str(damaged), str(image), "--out", str(tmp_path / "out")],
                    ["segment", "--model", str(model), str(image), "--out", str(tmp_path / "out")]):
        assert main(command) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"error: {command[2]}: "), error
        assert "Traceback" not in error
