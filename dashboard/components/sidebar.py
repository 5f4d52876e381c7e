"""The sidebar every page starts with: workspace folder, project picker, one-shot messages."""

from __future__ import annotations

import streamlit as st

from core.paths import FolderNotAllowed, allowed_folder
from core.store import Project, Workspace
from dashboard import state
from dashboard.components.jobs import sidebar_jobs


def _show_flashes() -> None:
    for kind, text in state.take_flashes():
        getattr(st, kind)(text)


def workspace_and_project() -> tuple[Workspace, Project | None]:
    """Render the sidebar; return the session's workspace and project (None when none is chosen)."""
    with st.sidebar:
        folder = st.text_input(
            "Workspace folder",
            value=state.workspace_path(),
            # A fixed key: without one the field is a new widget whenever its value changes, and every second
            # edit was lost.
            key=state.WORKSPACE_FIELD_WIDGET,
            help="Where projects, images and models are kept (SQLite + files). "
            "Default: ~/.anomaly-workspace or $ANOMALY_WORKSPACE. Only folders under your home folder or "
            "$ANOMALY_FOLDER_ROOTS ('*' = any folder) may be used.",
        )
        if folder.strip() and folder.strip() != state.workspace_path():
            try:
                allowed_folder(folder.strip())  # only folders under the configured roots (core/paths.py)
                state.set_workspace_path(folder.strip())
            except (OSError, FolderNotAllowed) as error:
                st.error(f"Cannot use {folder!r} as a workspace: {error}")
        workspace = state.workspace()

        projects = workspace.projects()
        if projects:
            ids = [project.id for project in projects]
            current = state.project_id()
            chosen = st.selectbox(
                "Project",
                ids,
                index=ids.index(current) if current in ids else 0,
                format_func=lambda i: next(p.name for p in projects if p.id == i),
            )
            state.set_project(chosen)
            counts = workspace.counts(chosen)
            st.caption(f"{counts['normal']} normal · {counts['test']} test · {counts['outlier']} outlier images")
        else:
            state.set_project(None)
            st.caption("No project yet: run the demo on **Start**, or create one on **Data**.")

        sidebar_jobs([job for job in state.jobs().values() if job.running])
    _show_flashes()
    return workspace, state.current_project()


def require_project(project: Project | None) -> Project:
    """Stop the page with a pointer to where a project comes from."""
    if project is None:
        st.info("No project yet. Run the one-click demo on the **Start** page, or create a project on **Data**.")
        st.page_link("views/start.py", label="Go to Start", icon=":material/rocket_launch:")
        st.stop()
    return project
