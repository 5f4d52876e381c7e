"""Allow a folder outside the configured roots from the page (with a confirmation), and list / revoke them."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.paths import FolderNotAllowed
from core.projects import folders
from core.store import Workspace


def offer_to_allow(workspace: Workspace, folder: str, error: FolderNotAllowed, key: str) -> None:
    """Say why ``folder`` was refused and, when it exists, let the user allow it after ticking a confirmation."""
    st.error(str(error))
    if not Path(folder).expanduser().is_dir():
        return
    resolved = Path(folder).expanduser().resolve()
    confirmed = st.checkbox(f"I allow this app to read every file under {resolved}", key=f"{key}-confirm-allow")
    if st.button("Allow this folder", key=f"{key}-allow", disabled=not confirmed,
                 help="Kept in the workspace's settings (also after a restart); listed under 'Folders you allowed', "
                      "where you can revoke it."):
        folders.allow_folder(workspace, resolved)
        st.rerun()


def allowed_list(workspace: Workspace, key: str) -> None:
    """The folders the user allowed, each with a Revoke button."""
    allowed = folders.allowed_folders(workspace)
    if not allowed:
        return
    with st.expander(f"Folders you allowed ({len(allowed)})"):
        for index, folder in enumerate(allowed):
            columns = st.columns([5, 1])
            columns[0].code(folder, language=None)
            if columns[1].button("Revoke", key=f"{key}-revoke-{index}"):
                folders.revoke_folder(workspace, folder)
                st.rerun()
