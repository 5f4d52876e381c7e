"""The Data page's import tabs (uploads, a folder on this machine, Fashion-MNIST) and the report of an import.

Each tab gathers the user's choices and hands them to ``core.projects.data``;
the report is shown once, after the rerun that follows an import.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core import projects
from core.datasets import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, KINDS, LABELS, default_kind, list_classes, plan_upload,
)
from core.paths import FolderNotAllowed
from core.projects import folders
from core.store import ROLE_DESCRIPTIONS, ROLES, ImportReport, Project, Workspace
from dashboard import state
from dashboard.components.allowed_folders import allowed_list, offer_to_allow

def show_report(report: ImportReport, what: str) -> None:
    """Say what was imported, and list every refused file with its reason."""
    if report.added:
        st.success(f"{what}: imported {len(report.added)} image{'s' if len(report.added) != 1 else ''}.")
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


def upload_tab(workspace: Workspace, project: Project) -> None:
    """Files, zips or a whole folder from the browser; each folder's images get a kind the user may change."""
    whole_folder = st.toggle("Upload a whole folder (keeps its sub-folders: MVTec's test/<defect>/ and ground_truth/)",
                             key="upload-folder-mode")
    files = st.file_uploader(
        "A folder of images" if whole_folder else "Images (PNG, JPEG, BMP, TIFF, WebP) or zip archives of them",
        accept_multiple_files="directory" if whole_folder else True,
        key=f"uploader-{'folder' if whole_folder else 'files'}-{state.upload_generation()}",
        help="Folders and zips keep their paths, so files named alike in different folders stay apart.",
    )
    plan = plan_upload([(file.name, file.getvalue()) for file in files]) if files else None
    # Images in folders take each folder's kind (chosen below); these two choices are for loose files only.
    loose = plan is None or None in plan.folders
    columns = st.columns(2)
    role = columns[0].radio("Add them as", ROLES, format_func=ROLE_DESCRIPTIONS.get, key="upload-role",
                            disabled=not loose, help=None if loose else "Every image is in a folder: each folder's "
                            "kind below says what its images become.")
    label = columns[1].radio("Label", [None, *LABELS], format_func=lambda value: LABELS.get(value, "unknown"),
                             key="upload-label", disabled=role != "test" or not loose,
                             help="Known labels let Detect draw an ROC curve; normal images are labelled normal.")
    kinds: dict[str | None, str] = {}
    if plan is not None:
        folders = plan.folders
        st.caption(f"{len(plan.items)} images in {sum(f is not None for f in folders)} folders"
                   + (f" · {plan.masks} defect masks paired (ground_truth/)" if plan.masks else "")
                   + (f" · {len(plan.duplicates)} duplicates (same bytes)" if plan.duplicates else "")
                   + (f" · {len(plan.renamed)} renamed (name taken by another picture)" if plan.renamed else ""))
        for folder, count in folders.items():
            default = default_kind(folder, role, label)
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
        with st.spinner(f"Checking and storing {len(plan.items)} images…"):
            report = projects.import_upload(workspace, project.id, plan, kinds)
        state.clear_uploads()
        state.set_last_import("Upload", report)
        st.rerun()


def folder_tab(workspace: Workspace, project: Project) -> None:
    """A folder on the machine running the app (under the allowed roots, or allowed here), in a known layout."""
    folder = st.text_input("Folder path", placeholder="/data/mvtec_ad/bottle",
                           help="A folder on the machine running the app, under your home folder, the folders in "
                           "$ANOMALY_FOLDER_ROOTS ('*' = any folder), or a folder you allowed here.").strip()
    refused = None
    if folder:
        try:
            folders.check_folder(workspace, folder)
        except FolderNotAllowed as error:
            refused = error
    if refused is not None:
        offer_to_allow(workspace, folder, refused, key="folder-tab")
    layout = st.radio("Layout", list(projects.LAYOUTS), format_func=projects.LAYOUTS.get, horizontal=False)
    normal_class, plain_role = None, "normal"
    if layout == "classes" and folder and refused is None and Path(folder).is_dir():
        try:
            normal_class = st.selectbox("Normal class", list_classes(folders.check_folder(workspace, folder)))
        except (OSError, FolderNotAllowed) as error:
            st.error(str(error))
    if layout == "plain":
        plain_role = st.radio("Add them as", ROLES, format_func=ROLE_DESCRIPTIONS.get, key="folder-role")
    if st.button("Import folder", type="primary", disabled=not folder or refused is not None):
        try:
            folders.check_folder(workspace, folder)  # only folders under the roots or allowed here ...
            with st.spinner("Reading and checking the folder…"):
                # ... and only files under them: a link inside the folder is checked too.
                report = projects.import_folder(workspace, project.id, folder, layout, normal_class, plain_role,
                                                roots=folders.workspace_roots(workspace))
            state.set_last_import(f"Folder {folder}", report)
            st.rerun()
        except (OSError, ValueError) as error:
            st.error(f"Cannot import {folder}: {error}")
    allowed_list(workspace, key="folder-tab")


def fashion_tab(workspace: Workspace, project: Project) -> None:
    """Fashion-MNIST's one-class protocol from the IDX files on this machine."""
    st.caption(f"The one-class protocol on Fashion-MNIST (IDX files of the Debian package dataset-fashion-mnist, "
               f"read from {FASHION_MNIST_DIR}): one class is normal, the nine others are anomalies.")
    columns = st.columns(3)
    fashion_class = columns[0].selectbox("Normal class", FASHION_MNIST_CLASSES, index=1, key="fashion-class")
    max_train = columns[1].number_input("Normal training images", 10, 6000, 200, step=50, key="fashion-train")
    max_test = columns[2].number_input("Test images (all classes)", 10, 10000, 200, step=50, key="fashion-test")
    if st.button("Import Fashion-MNIST", type="primary"):
        try:
            with st.spinner("Reading the IDX files…"):
                report = projects.import_fashion_mnist(workspace, project.id, fashion_class, int(max_train),
                                                       int(max_test))
            state.set_last_import(f"Fashion-MNIST ({fashion_class} normal)", report)
            st.rerun()
        except (OSError, ValueError) as error:
            st.error(f"Cannot read Fashion-MNIST: {error}")
