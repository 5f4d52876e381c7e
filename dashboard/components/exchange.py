"""The Data page's "Annotated set" tab: the project's images, labels and masks (drawn or imported) out as an
MVTec AD zip (anomalib reads that layout), and such a zip in."""

from __future__ import annotations

import streamlit as st

from core.projects import exchange
from core.store import Project, Workspace
from dashboard import state


def annotated_set_tab(workspace: Workspace, project: Project) -> None:
    """Export (built when clicked) and import of the annotated set."""
    marked = [image for image in workspace.images(project.id, "test") if image.label == 1 and image.mask_path]
    st.caption("MVTec AD layout: train/good (normal images), test/good, test/<defect> with "
               "ground_truth/<defect>/<name>_mask.png. Regions drawn on Review go to test/marked unless the image "
               "had a defect folder. Images are written as PNG (same pixels). Opens in anomalib's MVTec reader "
               "and comes back here unchanged.")
    st.download_button(
        f"Export the annotated set ({len(marked)} marked defects)", lambda: exchange.export_annotated(workspace, project.id),
        file_name=f"{exchange.category_name(project.name)}.zip", mime="application/zip", icon=":material/download:",
        on_click="ignore", key="annotated-export",
    )
    upload = st.file_uploader("Import an annotated set (a zip in this layout, or an MVTec AD category zipped)",
                              type=["zip"], key=f"annotated-import-{state.upload_generation()}")
    if st.button("Import the annotated set", disabled=upload is None, key="annotated-import-button"):
        try:
            with st.spinner(f"Reading {upload.name}…"):
                report = exchange.import_annotated(workspace, project.id, upload.getvalue(), upload.name)
        except ValueError as error:
            st.error(f"{upload.name}: {error}")
            return
        state.clear_uploads()
        state.set_last_import(f"Annotated set {upload.name}", report)
        st.rerun()
