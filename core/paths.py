"""Which folders the app may read from or create: those under configured roots.

A browser user of the dashboard types folder paths ("Folder path" on the Data
page, "Workspace folder" in the sidebar) that the *server* then reads or
creates. On a shared machine that would reach any folder the server's user
can; so such paths must lie under an allowed root.

Roots: ``$ANOMALY_FOLDER_ROOTS`` (folders separated by ``os.pathsep``, ``:``
on Linux) when set, else the user's home folder and the default workspace
(``$ANOMALY_WORKSPACE`` or ``~/.anomaly-workspace``). ``ANOMALY_FOLDER_ROOTS=*``
opts out: any folder is allowed (a single-user desktop install).
Symbolic links are resolved first, so a link under a root cannot lead outside it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

ROOTS_ENV = "ANOMALY_FOLDER_ROOTS"
ANY_FOLDER = "*"
WORKSPACE_ENV = "ANOMALY_WORKSPACE"


def default_workspace() -> Path:
    """``$ANOMALY_WORKSPACE`` when set, else ``~/.anomaly-workspace``."""
    configured = os.environ.get(WORKSPACE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".anomaly-workspace"


class FolderNotAllowed(ValueError):
    """A folder outside the allowed roots; the message says which roots and how to widen them."""


def folder_roots() -> tuple[Path, ...] | None:
    """The allowed roots (resolved), or None when every folder is allowed (``ANOMALY_FOLDER_ROOTS=*``)."""
    configured = os.environ.get(ROOTS_ENV, "").strip()
    if configured == ANY_FOLDER:
        return None
    if configured:
        roots = [Path(part).expanduser() for part in configured.split(os.pathsep) if part.strip()]
    else:
        roots = [Path.home(), default_workspace()]
    return tuple(root.resolve() for root in roots)


def allowed_folder(path: str | os.PathLike, roots: Sequence[Path] | None = ()) -> Path:
    """``path`` resolved, when it lies under one of ``roots``; else :class:`FolderNotAllowed`.

    ``roots``: the allowed folders; the default ``()`` reads :func:`folder_roots`;
    None allows every folder.
    """
    if roots == ():
        roots = folder_roots()
    resolved = Path(path).expanduser().resolve()
    if roots is None:
        return resolved
    for root in roots:
        root = Path(root).expanduser().resolve()
        if resolved == root or root in resolved.parents:
            return resolved
    listed = ", ".join(str(root) for root in roots) or "none"
    raise FolderNotAllowed(
        f"{path}: outside the folders this app may use ({listed}); set {ROOTS_ENV} to other folders "
        f"(separated by '{os.pathsep}') or to '{ANY_FOLDER}' to allow any folder, and restart the app"
    )
