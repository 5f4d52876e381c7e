"""Data: create or pick a project, import images (uploads, zips, folders), browse and remove them."""

from pathlib import Path

import pandas as pd
import streamlit as st

from core.datasets import (
    FASHION_MNIST_CLASSES,
    KINDS,
    FASHION_MNIST_DIR,
    default_kind,
    list_classes,
    plan_upload,
    read_class_folders,
    read_fashion_mnist,
    read_folder,
    read_mvtec,
)
from core.paths import FolderNotAllowed, allowed_folder, folder_roots
from core.store import ImportReport, StoreError
from dashboard import state
from dashboard.components.gallery import gallery, paged
from dashboard.components.sidebar import workspace_and_project

ROLE_HELP = {
    "normal": "normal: what a good product looks like — the model learns from these",
    "test": "test: images to check (labels optional: they let the app measure accuracy)",
    "outlier": "outlier: unrelated images, only used by PANDA-OE",
}
LABELS = {"unknown": None, "normal": 0, "anomalous": 1}

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


def show_report(report: ImportReport, what: str) -> None:
    """Say what was imported, and list every refused file with its reason."""
    if report.added:
        st.success(f"{what}: imported {len(report.added)} images.")
    if report.duplicates:
        st.info(f"{what}: {len(report.duplicates)} duplicates (same bytes as an image already there) were skipped.")
        st.dataframe(pd.DataFrame([{"file": name, "same bytes as": report.duplicate_of.get(name, "")}
                                   for name in report.duplicates]), hide_index=True, width="stretch",
                     key="import-duplicates")
    if report.renamed:
        st.info(f"{what}: {len(report.renamed)} images had a name already used by a different picture and were "
                "kept under a numbered name.")
        st.dataframe(pd.DataFrame([{"file": old, "stored as": new} for old, new in report.renamed.items()]),
                     hide_index=True, width="stretch", key="import-renamed")
    if report.problems:
        st.error(f"{what}: {len(report.problems)} files could not be used:")
        st.dataframe(pd.DataFrame([{"file": p.source, "reason": p.reason} for p in report.problems]),
                     hide_index=True, width="stretch", key="import-problems")
    if not (report.added or report.duplicates or report.problems):
        st.warning(f"{what}: nothing to import.")


st.subheader(f"Import into “{project.name}”")
upload_tab, folder_tab, fashion_tab = st.tabs(["Upload files or zips", "Folder on this machine", "Fashion-MNIST"])
with upload_tab:
    whole_folder = st.toggle("Upload a whole folder (keeps its sub-folders: MVTec's test/<defect>/ and ground_truth/)",
                             key="upload-folder-mode")
    files = st.file_uploader(
        "A folder of images" if whole_folder else "Images (PNG, JPEG, BMP, TIFF, WebP) or zip archives of them",
        accept_multiple_files="directory" if whole_folder else True,
        key=f"uploader-{'folder' if whole_folder else 'files'}-{state.upload_generation()}",
        help="Folders and zips keep their paths, so files named alike in different folders stay apart.",
    )
    columns = st.columns(2)
    role = columns[0].radio("Add them as", list(ROLE_HELP), format_func=ROLE_HELP.get, key="upload-role")
    label = columns[1].radio("Label", list(LABELS), key="upload-label", disabled=role != "test",
                             help="Known labels let Detect draw an ROC curve; normal images are labelled normal.")
    plan = plan_upload([(file.name, file.getvalue()) for file in files]) if files else None
    kinds: dict = {}
    if plan is not None:
        folders = plan.folders
        st.caption(f"{len(plan.items)} images in {sum(f is not None for f in folders)} folders"
                   + (f" · {plan.masks} defect masks paired (ground_truth/)" if plan.masks else "")
                   + (f" · {len(plan.duplicates)} duplicates (same bytes)" if plan.duplicates else "")
                   + (f" · {len(plan.renamed)} renamed (name taken by another picture)" if plan.renamed else ""))
        for folder, count in folders.items():
            default = default_kind(folder, role, LABELS[label])
            if folder is None:
                kinds[None] = default  # loose files follow the two choices above
                continue
            choices = list(KINDS)
            kinds[folder] = st.selectbox(
                f"{folder}/ ({count} images)", choices, index=choices.index(default),
                # The key holds the defaults' inputs: changing "Add them as" resets the folders' defaults.
                key=f"upload-kind-{state.upload_generation()}-{role}-{label}-{folder}",
                help="good → normal, any other folder → anomalous; train/ → the normal set. Change it here.",
            )
    if st.button("Import uploads", type="primary", disabled=not files):
        sets = plan.sets(kinds)
        with st.spinner(f"Checking and storing {len(plan.items)} images…"):
            report = workspace.import_sets(project.id, sets) if sets else ImportReport()
        report.problems[:0] = plan.problems
        for duplicate in plan.duplicates:
            report.duplicates.append(duplicate.name)
            report.duplicate_of[duplicate.name] = f"{duplicate.same_as} (same upload)"
        report.renamed.update(dict(plan.renamed))
        state.clear_uploads()
        state.set_last_import("Upload", report)
        st.rerun()

with folder_tab:
    folder = st.text_input("Folder path", placeholder="/data/mvtec_ad/bottle",
                           help="A folder on the machine running the app, under your home folder or the "
                           "folders in $ANOMALY_FOLDER_ROOTS ('*' = any folder).")
    layout = st.radio(
        "Layout",
        ["mvtec", "classes", "plain"],
        format_func={
            "mvtec": "MVTec AD category (train/good, test/<type>, ground_truth/)",
            "classes": "One folder per class (one class is normal, the others anomalies)",
            "plain": "Plain folder of images",
        }.get,
        horizontal=False,
    )
    normal_class, plain_role = None, "normal"
    if layout == "classes" and folder and Path(folder).is_dir():
        try:
            normal_class = st.selectbox("Normal class", list_classes(allowed_folder(folder)))
        except (OSError, FolderNotAllowed) as error:
            st.error(str(error))
    if layout == "plain":
        plain_role = st.radio("Add them as", list(ROLE_HELP), format_func=ROLE_HELP.get, key="folder-role")
    if st.button("Import folder", type="primary", disabled=not folder):
        try:
            allowed_folder(folder)  # only folders under the configured roots (core/paths.py)
            roots = folder_roots()  # ... and only files under them: a link inside the folder is checked too
            with st.spinner("Reading and checking the folder…"):
                if layout == "plain":
                    report = workspace.import_images(
                        project.id, read_folder(folder, label=0 if plain_role == "normal" else None, roots=roots),
                        plain_role,
                    )
                else:
                    if layout == "mvtec":
                        train, test = read_mvtec(folder, roots=roots)
                    else:
                        if normal_class is None:
                            raise ValueError("pick the normal class first")
                        train, test = read_class_folders(folder, normal_class, roots=roots)
                    report = workspace.import_sets(project.id, {"normal": train, "test": test})
            state.set_last_import(f"Folder {folder}", report)
            st.rerun()
        except (OSError, ValueError) as error:
            st.error(f"Cannot import {folder}: {error}")

with fashion_tab:
    st.caption(f"The one-class protocol on Fashion-MNIST (IDX files of the Debian package dataset-fashion-mnist, "
               f"read from {FASHION_MNIST_DIR}): one class is normal, the nine others are anomalies.")
    columns = st.columns(3)
    fashion_class = columns[0].selectbox("Normal class", FASHION_MNIST_CLASSES, index=1, key="fashion-class")
    max_train = columns[1].number_input("Normal training images", 10, 6000, 200, step=50, key="fashion-train")
    max_test = columns[2].number_input("Test images (all classes)", 10, 10000, 200, step=50, key="fashion-test")
    if st.button("Import Fashion-MNIST", type="primary"):
        try:
            with st.spinner("Reading the IDX files…"):
                train, test = read_fashion_mnist(normal_class=fashion_class, max_train=int(max_train),
                                                 max_test=int(max_test))
                report = workspace.import_sets(project.id, {"normal": train, "test": test})
            state.set_last_import(f"Fashion-MNIST ({fashion_class} normal)", report)
            st.rerun()
        except (OSError, ValueError) as error:
            st.error(f"Cannot read Fashion-MNIST: {error}")

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
            tag = {0: " · normal", 1: " · anomalous"}.get(image.label, "") if image.role == "test" else ""
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
