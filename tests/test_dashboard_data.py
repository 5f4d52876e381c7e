"""AppTest: the Start page (demo) and the Data page (projects, uploads, bad files, folders)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from conftest import DEMO_BOTTLE, huge_png, new_app
from core.store import Workspace


def test_start_page_explains_methods_and_offers_both_demos(workspace_dir):
    at = new_app()
    assert not at.exception
    text = " ".join(block.value for block in at.markdown)
    for method in ("DN2", "Gaussian", "PANDA", "SPADE"):
        assert method in text
    assert "Reiss et al." in " ".join(caption.value for caption in at.caption)
    assert {button.key for button in at.button} >= {"demo-bottle", "demo-fashion"}


def test_demo_imports_a_project_and_starts_its_first_fit(workspace_dir):
    # The full demo fit is the browser test's job; here: import, the fit starts, Stop works, no rework.
    at = new_app()
    at.button(key="demo-bottle").click().run()
    assert not at.exception
    workspace = Workspace(workspace_dir)
    (project,) = workspace.projects()
    assert workspace.counts(project.id) == {"normal": 40, "test": 20, "outlier": 0}
    assert at.title[0].value == "Detect"  # the demo opens the Detect page with the fit under way
    job = at.session_state["jobs"]["fit"]
    assert "SPADE" in job.title  # one pass gives image scores and heatmaps
    if job.running:
        next(button for button in at.button if button.label == "Stop").click().run()
    assert job.wait(60) and job.status in ("stopped", "finished")
    at.run()
    assert not at.exception
    # Clicking the demo again reuses the project: no duplicate images.
    at.switch_page("views/start.py").run()
    at.button(key="demo-bottle").click().run()
    assert len(workspace.projects()) == 1 and workspace.counts(project.id)["normal"] == 40
    for job in at.session_state["jobs"].values():  # no fit left running into the next test
        job.stop()
        job.wait(60)


def test_data_page_creates_a_project_and_lists_bad_uploads(workspace_dir, noise_pngs):
    at = new_app(page="views/data.py")
    assert not at.exception
    next(field for field in at.text_input if field.label == "Project name").input("line 3")
    next(button for button in at.button if button.label == "Create project").click().run()
    workspace = Workspace(workspace_dir)
    (project,) = workspace.projects()
    assert project.name == "line 3"

    evil_zip = io.BytesIO()
    with zipfile.ZipFile(evil_zip, "w") as archive:
        archive.writestr("../../outside.png", noise_pngs[3][1])
        archive.writestr("good/inside.png", noise_pngs[4][1])
    at.file_uploader[0].set_value([
        (noise_pngs[0][0], noise_pngs[0][1], "image/png"),
        (noise_pngs[1][0], noise_pngs[1][1], "image/png"),
        ("corrupt.png", noise_pngs[2][1][:50], "image/png"),
        ("readme.txt", b"not an image", "text/plain"),
        ("huge.png", huge_png(), "image/png"),
        ("evil.zip", evil_zip.getvalue(), "application/zip"),
    ])
    at.run()
    next(button for button in at.button if button.label == "Import uploads").click().run()
    assert not at.exception
    errors = " ".join(error.value for error in at.error)
    assert "4 files could not be used" in errors
    table = at.dataframe[0].value
    assert set(table["file"]) == {"corrupt.png", "readme.txt", "huge.png", "evil.zip/../../outside.png"}
    assert "too large" in table.set_index("file").loc["huge.png", "reason"]
    assert [row.name for row in workspace.images(project.id)] == ["noise_0.png", "noise_1.png", "evil/good/inside.png"]
    assert any("imported 3 images" in success.value for success in at.success)
    assert not (workspace_dir.parent / "outside.png").exists()

    # Removing an image from the gallery.
    first = workspace.images(project.id)[0]
    at.checkbox(key=f"pick-normal-{first.id}").check().run()
    next(button for button in at.button if button.label == "Remove 1 selected").click().run()
    assert [row.name for row in workspace.images(project.id)] == ["noise_1.png", "evil/good/inside.png"]


def test_folder_import_in_mvtec_layout(workspace_dir, monkeypatch):
    monkeypatch.setenv("ANOMALY_FOLDER_ROOTS", str(DEMO_BOTTLE.parent))
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("from folder")
    at = new_app(project.id, page="views/data.py")
    folder_input = next(field for field in at.text_input if field.label == "Folder path")
    folder_input.input(str(DEMO_BOTTLE)).run()
    next(button for button in at.button if button.label == "Import folder").click().run()
    assert not at.exception
    assert workspace.counts(project.id) == {"normal": 40, "test": 20, "outlier": 0}

    missing = next(field for field in at.text_input if field.label == "Folder path")
    missing.input(str(DEMO_BOTTLE / "nope")).run()
    next(button for button in at.button if button.label == "Import folder").click().run()
    assert any("Cannot import" in error.value for error in at.error)
    assert workspace.counts(project.id)["normal"] == 40

    outside = next(field for field in at.text_input if field.label == "Folder path")
    outside.input(str(DEMO_BOTTLE.parents[2] / "tests")).run()
    # Refused as soon as it is typed: the import waits for the user to allow it (tests/test_allowed_folders.py).
    assert any("outside the folders this app may use" in error.value for error in at.error)
    assert next(button for button in at.button if button.label == "Import folder").disabled


def test_fashion_mnist_tab_imports_the_one_class_protocol(workspace_dir):
    from core.datasets import FASHION_MNIST_DIR

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"Fashion-MNIST IDX files not installed at {FASHION_MNIST_DIR} (Debian dataset-fashion-mnist)")
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("fashion")
    at = new_app(project.id, page="views/data.py")
    at.selectbox(key="fashion-class").set_value("Sneaker")
    at.number_input(key="fashion-train").set_value(20)
    at.number_input(key="fashion-test").set_value(30).run()
    next(button for button in at.button if button.label == "Import Fashion-MNIST").click().run()
    assert not at.exception
    assert workspace.counts(project.id) == {"normal": 20, "test": 30, "outlier": 0}
    test = workspace.image_set(project.id, "test").images
    assert {item.group for item in test if item.label == 0} == {"Sneaker"}


def _demo_file(relative: str, as_name: str | None = None):
    return (as_name or f"bottle/{relative}", (DEMO_BOTTLE / relative).read_bytes(), "image/png")


def test_folder_upload_keeps_colliding_names_labels_per_folder_and_pairs_masks(workspace_dir):
    """Issue 15.1: three different '000.jpg' from three defect folders all arrive, in their folders, with masks."""
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("uploaded folders")
    at = new_app(project.id, page="views/data.py")
    at.toggle(key="upload-folder-mode").set_value(True).run()
    defects = ("broken_large", "broken_small", "contamination")
    files = [_demo_file(f"test/{defect}/000.jpg") for defect in defects]
    files += [_demo_file(f"ground_truth/{defect}/000_mask.png") for defect in defects]
    good = sorted((DEMO_BOTTLE / "test" / "good").iterdir())[:2]
    files += [_demo_file(f"test/good/{path.name}") for path in good]
    files.append(_demo_file(f"test/good/{good[0].name}", "bottle/test/good/copy of the first.png"))  # same bytes
    at.file_uploader[0].set_value(files).run()
    assert not at.exception, at.exception
    boxes = {box.label: box for box in at.selectbox if box.key and box.key.startswith("upload-kind-")}
    assert boxes["bottle/test/good/ (2 images)"].value == "test: normal"
    assert boxes["bottle/test/broken_large/ (1 images)"].value == "test: anomalous"
    boxes["bottle/test/contamination/ (1 images)"].set_value("test: unlabelled").run()  # editable before import
    next(button for button in at.button if button.label == "Import uploads").click().run()
    assert not at.exception, at.exception

    rows = {row.name: row for row in workspace.images(project.id, "test")}
    assert set(rows) == {f"bottle/test/{d}/000.jpg" for d in defects} | {f"bottle/test/good/{p.name}" for p in good}
    assert rows["bottle/test/broken_large/000.jpg"].label == 1 and rows["bottle/test/broken_large/000.jpg"].mask_path
    assert rows["bottle/test/contamination/000.jpg"].label is None
    assert all(rows[f"bottle/test/good/{p.name}"].label == 0 for p in good)
    assert all(rows[f"bottle/test/{d}/000.jpg"].mask_path is not None for d in defects)
    assert workspace.counts(project.id)["normal"] == 0
    # The true duplicate is reported as such, naming the file it repeats; nothing else is refused.
    assert not at.error
    duplicates = next(frame.value for frame in at.dataframe if "same bytes as" in frame.value.columns)
    assert list(duplicates["file"]) == ["bottle/test/good/copy of the first.png"]
    assert f"bottle/test/good/{good[0].name}" in duplicates["same bytes as"].iloc[0]


def test_loose_files_with_the_same_name_are_both_kept(workspace_dir, noise_pngs):
    """Issue 15.1: two different pictures both called 000.png (browsers send base names) are never dropped."""
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("loose files")
    at = new_app(project.id, page="views/data.py")
    at.file_uploader[0].set_value([("000.png", noise_pngs[0][1], "image/png"),
                                   ("000.png", noise_pngs[1][1], "image/png")]).run()
    next(button for button in at.button if button.label == "Import uploads").click().run()
    assert not at.exception and not at.error
    assert sorted(row.name for row in workspace.images(project.id, "normal")) == ["000 (2).png", "000.png"]
    assert any("numbered name" in info.value for info in at.info)


def test_add_them_as_is_off_when_every_image_is_in_a_folder(workspace_dir, noise_pngs):
    """Folders get their own kinds; 'Add them as' (for loose files) no longer pretends to apply to them."""
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("folders")
    at = new_app(project.id, page="views/data.py")
    assert not at.radio(key="upload-role").disabled
    at.file_uploader[0].set_value([(f"bottle/test/broken/{name}", data, "image/png") for name, data in noise_pngs[:2]])
    at.run()
    assert not at.exception, at.exception
    assert at.radio(key="upload-role").disabled and at.radio(key="upload-label").disabled
    at.file_uploader[0].set_value([(noise_pngs[0][0], noise_pngs[0][1], "image/png")])
    at.run()
    assert not at.radio(key="upload-role").disabled
