"""The workspace store: atomic imports, content addressing, annotations, runs, exports."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
import zipfile

import numpy as np
import pytest

from conftest import DEMO_BOTTLE, huge_png, png_bytes
from core.datasets import ImageItem, ImageSet, read_mvtec
from core.store import StoreError, Workspace, default_workspace, image_set_from_uploads


def object_files(workspace: Workspace) -> list:
    return sorted(path for path in workspace.objects.glob("*/*") if not path.name.startswith(".tmp-"))


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_default_workspace_follows_environment(workspace_dir):
    assert default_workspace() == workspace_dir
    assert Workspace().root == workspace_dir


def test_import_mvtec_layout_keeps_labels_groups_and_masks(workspace_dir):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("bottle")
    train, test = read_mvtec(DEMO_BOTTLE)
    assert workspace.import_images(project.id, train, "normal").problems == []
    report = workspace.import_images(project.id, test, "test")
    assert len(report.added) == len(test) == 20
    assert workspace.counts(project.id) == {"normal": 40, "test": 20, "outlier": 0}

    stored = workspace.image_set(project.id, "test")
    assert stored.images.has_labels and stored.images.has_masks
    assert stored.images.labels.sum() == 12
    # The stored copy decodes to the same pixels as the original file.
    first = test.items[0].load()
    assert np.array_equal(stored.images.items[0].load(), first)
    defect = next(item for item in stored.images if item.has_mask)
    assert defect.load_mask().shape == (256, 256)


def test_content_addressing_dedups_files_and_rows(workspace_dir, noise_pngs):
    workspace = Workspace(workspace_dir)
    first, second = workspace.create_project("a"), workspace.create_project("b")
    uploads = image_set_from_uploads(noise_pngs)
    assert len(workspace.import_images(first.id, uploads, "normal").added) == 5
    files_after_first = object_files(workspace)
    again = workspace.import_images(first.id, uploads, "normal")
    assert again.added == [] and len(again.duplicates) == 5
    # Another project gets its own rows but shares the same files.
    assert len(workspace.import_images(second.id, uploads, "normal").added) == 5
    assert object_files(workspace) == files_after_first
    assert [path.name for path in files_after_first] == sorted(row.sha for row in workspace.images(first.id))


def test_same_name_different_picture_gets_a_new_name(workspace_dir, noise_pngs):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("p")
    workspace.import_images(project.id, image_set_from_uploads(noise_pngs[:1]), "normal")
    renamed = [("noise_0.png", noise_pngs[1][1])]
    workspace.import_images(project.id, image_set_from_uploads(renamed), "normal")
    assert [row.name for row in workspace.images(project.id)] == ["noise_0.png", "noise_0 (2).png"]


def test_bad_uploads_are_reported_and_the_rest_imported(workspace_dir, noise_pngs):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("p")
    good = noise_pngs[0]
    files = [
        good,
        ("corrupt.png", good[1][:60]),
        ("notes.txt", b"hello"),
        ("huge.png", huge_png()),
        ("evil.zip", zip_bytes({"../escape.png": noise_pngs[1][1], "ok/inside.png": noise_pngs[2][1]})),
        ("broken.zip", b"PK not really"),
        ("fake.jpg", b"this is text, not a jpeg"),
    ]
    report = workspace.import_images(project.id, image_set_from_uploads(files), "test")
    reasons = {problem.source: problem.reason for problem in report.problems}
    assert sorted(workspace.images(project.id)[i].name for i in range(2)) == ["evil/ok/inside.png", "noise_0.png"]
    assert "truncated" in reasons["corrupt.png"] or "corrupt" in reasons["corrupt.png"]
    assert "not an image" in reasons["notes.txt"]
    assert "too large" in reasons["huge.png"]
    assert "unsafe path" in reasons["evil.zip/../escape.png"]
    assert "not a zip" in reasons["broken.zip"]
    assert "not an image" in reasons["fake.jpg"]
    # Nothing escaped the workspace.
    assert not (workspace_dir.parent / "escape.png").exists()


def test_failure_mid_import_leaves_the_project_unchanged(workspace_dir, noise_pngs, monkeypatch):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("p")
    workspace.import_images(project.id, image_set_from_uploads(noise_pngs[:2]), "normal")
    before = workspace.images(project.id)

    # A crash while files are being written (e.g. disk full on the fourth file) ...
    real_prepare, calls = Workspace._prepare, []

    def failing_prepare(self, item):
        calls.append(item.name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_prepare(self, item)

    monkeypatch.setattr(Workspace, "_prepare", failing_prepare)
    with pytest.raises(OSError):
        workspace.import_images(project.id, image_set_from_uploads(noise_pngs[2:]), "normal")
    assert workspace.images(project.id) == before
    monkeypatch.setattr(Workspace, "_prepare", real_prepare)

    # ... and one in the middle of the row inserts both leave no row behind.
    import core.store as store_module

    real_free_name, names = store_module._free_name, []

    def failing_free_name(name, taken):
        names.append(name)
        if len(names) == 2:
            raise RuntimeError("crash between two inserts")
        return real_free_name(name, taken)

    monkeypatch.setattr(store_module, "_free_name", failing_free_name)
    with pytest.raises(RuntimeError):
        workspace.import_images(project.id, image_set_from_uploads(noise_pngs[2:]), "normal")
    assert workspace.images(project.id) == before
    # Orphaned files from the failed imports are collectable, the kept ones stay.
    workspace.collect_garbage()
    assert len(object_files(workspace)) == 2
    assert all(row.path.exists() for row in before)


def test_normal_and_test_sets_import_together_or_not_at_all(workspace_dir, noise_pngs, monkeypatch):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("p")
    normal, test = image_set_from_uploads(noise_pngs[:3]), image_set_from_uploads(noise_pngs[3:], label=1)
    real_prepare = Workspace._prepare

    def fail_on_test_images(self, item):
        if item.label == 1:
            raise OSError("disk full")
        return real_prepare(self, item)

    monkeypatch.setattr(Workspace, "_prepare", fail_on_test_images)
    with pytest.raises(OSError):
        workspace.import_sets(project.id, {"normal": normal, "test": test})
    assert workspace.counts(project.id) == {"normal": 0, "test": 0, "outlier": 0}
    monkeypatch.setattr(Workspace, "_prepare", real_prepare)
    report = workspace.import_sets(project.id, {"normal": normal, "test": test})
    assert len(report.added) == 5 and workspace.counts(project.id) == {"normal": 3, "test": 2, "outlier": 0}


def test_cancelled_import_adds_nothing(workspace_dir, noise_pngs):
    from core.progress import Cancelled

    workspace = Workspace(workspace_dir)
    project = workspace.create_project("p")
    seen = []
    with pytest.raises(Cancelled):
        workspace.import_images(
            project.id, image_set_from_uploads(noise_pngs), "normal",
            progress=lambda done, total: seen.append(done), cancel=lambda: len(seen) >= 2,
        )
    assert workspace.images(project.id) == []


def test_array_items_are_encoded_and_unknown_roles_refused(workspace_dir):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("fashion")
    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    items = ImageSet([ImageItem(name="train/00001", array=pixels, label=0, group="Trouser")])
    workspace.import_images(project.id, items, "normal")
    stored = workspace.image_set(project.id, "normal").images.items[0]
    assert stored.load().shape == (28, 28, 3) and stored.group == "Trouser"
    with pytest.raises(StoreError):
        workspace.import_images(project.id, items, "training")


def test_annotations_persist_and_upsert(workspace_dir, noise_pngs):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("p")
    ids = workspace.import_images(project.id, image_set_from_uploads(noise_pngs[:2]), "test").added
    workspace.annotate(ids[0], "anomalous", "scratch near the neck")
    workspace.annotate(ids[0], "normal", "reflection, not a scratch")
    workspace.annotate(ids[1], "unsure")
    reopened = Workspace(workspace_dir)  # a new process / a restart
    found = reopened.annotations(project.id)
    assert {i: a.verdict for i, a in found.items()} == {ids[0]: "normal", ids[1]: "unsure"}
    assert found[ids[0]].note == "reflection, not a scratch"
    with pytest.raises(StoreError):
        reopened.annotate(ids[0], "maybe")
    with pytest.raises(StoreError):
        reopened.annotate(999_999, "normal")
    # Removing an image removes its annotation (foreign key cascade).
    reopened.remove_images([ids[1]])
    assert list(reopened.annotations(project.id)) == [ids[0]]


def test_export_formats(workspace_dir, noise_pngs):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("line 3")
    ids = workspace.import_images(project.id, image_set_from_uploads(noise_pngs[:2], label=1), "test").added
    workspace.annotate(ids[0], "normal", 'glare, "not" a defect, really')
    workspace.annotate(ids[1], "anomalous")

    rows = list(csv.DictReader(io.StringIO(workspace.export_annotations_csv(project.id))))
    assert [row["verdict"] for row in rows] == ["normal", "anomalous"]
    assert rows[0]["note"] == 'glare, "not" a defect, really'
    assert rows[0]["name"] == "noise_0.png" and rows[0]["label"] == "1" and len(rows[0]["sha256"]) == 64

    exported = json.loads(workspace.export_annotations_json(project.id))
    assert exported["project"] == "line 3"
    assert [entry["image_id"] for entry in exported["annotations"]] == ids
    assert exported["annotations"][1]["note"] == ""


def test_confirmed_normals_join_the_normal_set_once(workspace_dir, noise_pngs):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("p")
    ids = workspace.import_images(project.id, image_set_from_uploads(noise_pngs[:3]), "test").added
    assert len(workspace.add_to_normal_set(ids[:2])) == 2
    assert workspace.add_to_normal_set(ids[:2]) == []
    normal = workspace.image_set(project.id, "normal")
    assert len(normal) == 2 and normal.images.labels.tolist() == [0, 0]
    assert len(object_files(workspace)) == 3


def test_runs_models_scores_and_preferences(workspace_dir, noise_pngs):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("p")
    run_id = workspace.create_run(project.id, "ewc", {"epochs": 3})
    for epoch in range(2):
        workspace.append_epoch(run_id, {"epoch": epoch, "auroc": 0.5 + epoch / 10})
    workspace.finish_run(run_id, "stopped", stop_epoch=1, message="stopped by the user")
    run = Workspace(workspace_dir).run(run_id)
    assert run.status == "stopped" and run.stop_epoch == 1 and [r["epoch"] for r in run.curves] == [0, 1]

    abandoned = workspace.create_run(project.id, "early", {})
    restarted_at = time.time() + 1e-3
    time.sleep(0.01)
    current = workspace.create_run(project.id, "ses", {})
    assert workspace.mark_abandoned_runs(started_before=restarted_at) == 1
    assert workspace.run(abandoned).status == "stopped" and workspace.run(current).status == "running"

    class FakeDetector:
        def save(self, path):
            path.write_bytes(b"npz")
            return path

    model = workspace.add_model(project.id, "dn2", {"k": 2, "features": {"backbone": "efficientnet_lite0"}}, FakeDetector())
    assert model.path.exists() and model.title == "#1 dn2 efficientnet_lite0"
    ids = workspace.import_images(project.id, image_set_from_uploads(noise_pngs[:2]), "test").added
    workspace.save_scores(model.id, ids, [0.5, 2.0])
    assert workspace.scores(model.id) == {ids[0]: 0.5, ids[1]: 2.0}
    workspace.update_model_summary(model.id, auroc=0.9)
    assert workspace.model(model.id).summary == {"auroc": 0.9}
    # Deleting a model takes its maps cache with it.
    spare = workspace.add_model(project.id, "spade", {}, FakeDetector())
    spare.maps_path.write_bytes(b"maps")
    workspace.delete_model(spare.id)
    assert not spare.path.exists() and not spare.maps_path.exists()

    workspace.set_preference(project.id, "review_position", 7)
    assert Workspace(workspace_dir).preference(project.id, "review_position") == 7
    assert workspace.preference(project.id, "missing", "x") == "x"

    workspace.delete_project(project.id)
    assert not model.path.exists() and workspace.projects() == []


def test_concurrent_writers_do_not_corrupt(workspace_dir, noise_pngs):
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("p")
    ids = workspace.import_images(project.id, image_set_from_uploads(noise_pngs), "test").added
    errors = []

    def annotate_many(verdict):
        try:
            other = Workspace(workspace_dir)
            for _ in range(20):
                for image_id in ids:
                    other.annotate(image_id, verdict)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=annotate_many, args=(v,)) for v in ("normal", "anomalous")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(workspace.annotations(project.id)) == len(ids)


def test_plan_upload_keeps_paths_pairs_masks_and_names_duplicates_in_any_order(noise_pngs):
    from core.datasets import default_kind, plan_upload

    files = [
        ("line/test/scratch/000.png", noise_pngs[0][1]),
        ("line/test/dent/000.png", noise_pngs[1][1]),
        ("line/ground_truth/dent/000_mask.png", png_bytes(np.zeros((32, 32), np.uint8))),
        ("line/ground_truth/hole/009_mask.png", png_bytes(np.zeros((32, 32), np.uint8))),
        ("line/test/good/b.png", noise_pngs[2][1]),
        ("line/test/good/a.png", noise_pngs[2][1]),
        ("line/train/good/000.png", noise_pngs[3][1]),
    ]
    for order in (files, files[::-1]):
        plan = plan_upload(order)
        names = {item.name: item for item in plan.items}
        assert set(names) == {"line/test/scratch/000.png", "line/test/dent/000.png", "line/test/good/a.png",
                              "line/train/good/000.png"}
        assert names["line/test/dent/000.png"].has_mask and not names["line/test/scratch/000.png"].has_mask
        assert [(d.name, d.same_as) for d in plan.duplicates] == [("line/test/good/b.png", "line/test/good/a.png")]
        assert [p.source for p in plan.problems] == ["line/ground_truth/hole/009_mask.png"]
    kinds = {folder: default_kind(folder) for folder in plan.folders}
    assert kinds == {"line/train/good": "normal", "line/test/good": "test: normal",
                     "line/test/dent": "test: anomalous", "line/test/scratch": "test: anomalous"}
    sets = plan.sets(kinds)
    assert len(sets["normal"]) == 1 and sets["test"].labels.tolist().count(1) == 2
