"""Data: create or pick a project, import images (uploads, zips, folders), browse and remove them."""

import streamlit as st

from core.datasets import LABELS
from core.store import StoreError
from dashboard import state
from dashboard.components.exchange import annotated_set_tab
from dashboard.components.gallery import gallery, paged
from dashboard.components.imports import fashion_tab, folder_tab, show_report, upload_tab
from dashboard.components.sidebar import workspace_and_project

workspace, project = workspace_and_project()
st.title("Data")

# ---------------------------------------------------------------------- projects
with st.expander("New project", expanded=project is None):
    with st.form("new-project", clear_on_submit=True, border=False):
        name = st.text_input("Project name", placeholder="e.g. bottle line 3")
        if st.form_submit_button("Create project", type="primary"):
            try:
                state.set_project(workspace.create_project(name))
                st.rerun()
            except StoreError as error:
                st.error(str(error))
if project is None:
    st.stop()


st.subheader(f"Import into “{project.name}”")
upload, folder, fashion, annotated = st.tabs(["Upload files or zips", "Folder on this machine", "Fashion-MNIST",
                                              "Annotated set (MVTec zip)"])
with upload:
    upload_tab(workspace, project)
with folder:
    folder_tab(workspace, project)
with fashion:
    fashion_tab(workspace, project)
with annotated:
    annotated_set_tab(workspace, project)

last_import = state.take_last_import()
if last_import is not None:
    show_report(last_import[1], last_import[0])

# ---------------------------------------------------------------------- browse and remove
st.subheader("Images")
counts = workspace.counts(project.id)
metric_columns = st.columns(4)
for column, role_name in zip(metric_columns, counts):
    column.metric(f"{role_name} images", counts[role_name])
labelled = [image for image in workspace.images(project.id, "test") if image.label is not None]
metric_columns[3].metric("test images labelled anomalous", f"{sum(i.label == 1 for i in labelled)} of {len(labelled)}",
                         help="Only labelled test images count; labels let Detect draw an ROC curve.")

tabs = st.tabs([f"{role_name} ({counts[role_name]})" for role_name in counts])
for tab, role_name in zip(tabs, counts):
    with tab:
        rows = workspace.images(project.id, role_name)
        if not rows:
            st.caption("None yet.")
            continue
        shown = paged(rows, 24, key=f"page-{role_name}")

        def caption(image):
            # Every normal image is labelled normal; only test labels say something.
            tag = f" · {LABELS[image.label]}" if image.role == "test" and image.label in LABELS else ""
            return f"{image.name}{tag}"

        ticked = gallery(shown, caption, columns=6, selectable_key=f"pick-{role_name}")
        if st.button(f"Remove {len(ticked)} selected", key=f"remove-{role_name}", disabled=not ticked):
            removed = workspace.remove_images(ticked)
            state.flash("success", f"Removed {removed} images from {role_name}.")
            st.rerun()

with st.expander("Delete this project"):
    st.warning("Deletes the project's images list, models, runs and annotations (files shared with other "
               "projects stay).")
    if st.checkbox(f"Yes, delete “{project.name}”", key="confirm-delete"):
        if st.button("Delete project", type="primary"):
            workspace.delete_project(project.id)
            workspace.collect_garbage()
            state.set_project(None)
            st.rerun()
