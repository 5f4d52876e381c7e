"""Folders the user allowed from the page, beside the configured roots (``core.paths``).

The roots (``$ANOMALY_FOLDER_ROOTS``, else home and the workspace) bound what
a browser may make the server read. A folder outside them can be allowed from
the page, once, with an explicit confirmation: it is kept in the workspace's
settings (so it survives a restart), listed, and revocable. The allowing
itself goes through the app's own session, which Streamlit protects against
other web pages (XSRF tokens and the allowed hosts of .streamlit/config.toml).
"""

from __future__ import annotations

import os
from pathlib import Path

from core.paths import allowed_folder, folder_roots
from core.store import Workspace

ALLOWED_FOLDERS = "allowed_folders"
"""Workspace setting: the folders the user allowed (resolved paths, as text)."""


def allowed_folders(workspace: Workspace) -> list[str]:
    """The folders the user allowed from the page, in the order they were allowed."""
    return list(workspace.setting(ALLOWED_FOLDERS, []))


def allow_folder(workspace: Workspace, path: str | os.PathLike) -> Path:
    """Allow an existing folder (resolved, links followed) for imports and scoring; returns it."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise NotADirectoryError(f"{path}: not a folder on this machine")
    folders = allowed_folders(workspace)
    if str(resolved) not in folders:
        workspace.set_setting(ALLOWED_FOLDERS, [*folders, str(resolved)])
    return resolved


def revoke_folder(workspace: Workspace, path: str) -> None:
    """Forget a folder the user allowed (the configured roots are not touched)."""
    workspace.set_setting(ALLOWED_FOLDERS, [folder for folder in allowed_folders(workspace) if folder != path])


def workspace_roots(workspace: Workspace) -> tuple[Path, ...] | None:
    """The configured roots and the folders the user allowed; None when every folder is allowed."""
    roots = folder_roots()
    if roots is None:
        return None
    return (*roots, *(Path(folder) for folder in allowed_folders(workspace)))


def check_folder(workspace: Workspace, path: str | os.PathLike) -> Path:
    """``path`` resolved when it lies under a root or an allowed folder; else ``core.paths.FolderNotAllowed``."""
    return allowed_folder(path, workspace_roots(workspace))
