"""A folder outside the configured roots can be allowed from the page: only after an explicit confirmation,
kept in the workspace's settings across sessions, listed, and revocable."""

from __future__ import annotations

import shutil

import pytest

from conftest import DEMO_BOTTLE, new_app
from core.paths import FolderNotAllowed
from core.projects import folders
from core.store import Workspace


def test_allow_import_and_revoke_a_folder_from_the_data_page(workspace_dir, tmp_path, monkeypatch):
    elsewhere = tmp_path / "line-data" / "bottle"
    shutil.copytree(DEMO_BOTTLE, elsewhere)
    monkeypatch.setenv("ANOMALY_FOLDER_ROOTS", str(tmp_path / "only-here"))
    workspace = Workspace(workspace_dir)
    project = workspace.create_project("elsewhere")
    at = new_app(project.id, page="views/data.py")
    next(field for field in at.text_input if field.label == "Folder path").input(str(elsewhere)).run()
    assert any("outside the folders this app may use" in error.value for error in at.error)
    importing = next(button for button in at.button if button.label == "Import folder")
    allowing = next(button for button in at.button if button.label == "Allow this folder")
    assert importing.disabled and allowing.disabled  # nothing without the confirmation
    with pytest.raises(FolderNotAllowed):
        folders.check_folder(workspace, elsewhere)

    at.checkbox(key="folder-tab-confirm-allow").check().run()
    next(button for button in at.button if button.label == "Allow this folder").click().run()
    assert folders.allowed_folders(workspace) == [str(elsewhere.resolve())]
    next(button for button in at.button if button.label == "Import folder").click().run()
    assert not at.exception, at.exception
    assert workspace.counts(project.id)["normal"] == 40

    # Kept for a new session (a restart), listed there, and revocable.
    other = new_app(project.id, page="views/data.py")
    assert any(str(elsewhere.resolve()) in block.value for block in other.code)
    next(button for button in other.button if button.key == "folder-tab-revoke-0").click().run()
    assert folders.allowed_folders(workspace) == []
    with pytest.raises(FolderNotAllowed):
        folders.check_folder(workspace, elsewhere / "train")


def test_only_existing_folders_can_be_allowed(workspace_dir, tmp_path):
    workspace = Workspace(workspace_dir)
    with pytest.raises(NotADirectoryError, match="not a folder"):
        folders.allow_folder(workspace, tmp_path / "missing")
    assert folders.allowed_folders(workspace) == []
