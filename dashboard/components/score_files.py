"""Score a folder or a large upload with the chosen model: a background job that streams rows into a file.

The work is :func:`core.scoring.runs.run_scoring` (the streaming path of the
CLI): images are decoded once, scored in batches, and every batch is appended
to the run's ``results.csv`` before the next one, so the page shows progress,
rate and time left, Stop keeps what was scored, and a server restart in the
middle leaves a run the panel offers to resume.
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from core.datasets import IMAGE_EXTENSIONS
from core.paths import FolderNotAllowed
from core.projects import folders
from core.scoring import read_results
from core.scoring.runs import ScoringRun, list_runs, new_run, run_scoring
from dashboard import state
from dashboard.components.allowed_folders import allowed_list, offer_to_allow
from dashboard.components.jobs import job_panel

SCORE_JOB = "score-files"
"""Job kind: one folder-scoring job per session (another session may run one on another project)."""

UPLOAD_TYPES = ["zip", *sorted(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)]  # what the readers take
SHOWN_ROWS = 20


def _root(workspace) -> Path:
    return Path(workspace.root) / "scoring"


def _save_uploads(workspace, files) -> list[str]:
    """Write the uploaded files under the workspace once; returns the inputs to score.

    Images go into one folder; zips stay zips beside it (their members are read lazily while scoring).
    """
    folder = _root(workspace) / "uploads" / time.strftime("%Y%m%d-%H%M%S")
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    inputs = [str(images)]
    for position, upload in enumerate(files):
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(upload.name).name) or "upload"
        is_zip = name.lower().endswith(".zip")
        target = (folder if is_zip else images) / f"{position:04d}_{name}"
        target.write_bytes(upload.getvalue())
        if is_zip:
            inputs.append(str(target))
    return inputs


def _live_run(project_id: int) -> str | None:
    job = state.job(SCORE_JOB, project_id)
    return job.subject if job is not None and job.running else None


def _start(run: ScoringRun, project_id: int, resume: bool) -> None:
    title = f"{'Resuming' if resume else 'Scoring'} {run.title}"
    # The run's folder as the job's subject lets the panel tell the live run from an interrupted one.
    state.start_job(SCORE_JOB, title, lambda job: run_scoring(run, resume, job.report, job.cancelled),
                    project_id, topic=state.DETECT, subject=run.folder)
    st.rerun()


def _results_table(run: ScoringRun) -> None:
    rows = read_results(run.results)
    scored = [row for row in rows if not row.get("error")]
    failed = [row for row in rows if row.get("error")]
    flagged = sum(row.get("anomalous") == "1" for row in scored)
    st.caption(f"{len(scored):,} scored · {flagged:,} above the threshold · {len(failed):,} could not be read")
    if scored:
        top = sorted(scored, key=lambda row: -float(row["score"]))[:SHOWN_ROWS]
        st.dataframe([{"file": r["file"], "score": float(r["score"]), "anomalous": r["anomalous"] == "1"} for r in top],
                     hide_index=True, width="stretch")
    if failed:
        with st.expander(f"{len(failed)} files could not be scored"):
            st.dataframe([{"file": r["file"], "why": r["error"]} for r in failed[:200]], hide_index=True, width="stretch")
    st.download_button("Download results (CSV)", run.results.read_bytes(), file_name=f"{Path(run.folder).name}.csv",
                       mime="text/csv", key=f"download-{run.folder}")


def _past_runs(workspace, model, project_id: int) -> None:
    runs = list_runs(_root(workspace), model.id)[:5]
    live = _live_run(project_id)
    for index, run in enumerate(runs):
        if run.folder == live:
            continue  # the job panel above shows it
        written = run.rows_written() if run.results.exists() else 0
        with st.container(border=True):
            label = f"**{run.title}** · {time.strftime('%Y-%m-%d %H:%M', time.localtime(run.started))}"
            if run.status == "finished":
                st.markdown(f"{label} · done, {written:,} files")
            else:
                if run.status == "failed":
                    st.markdown(f"{label} · failed after {written:,} of {run.total:,} files (they are kept): "
                                f"{run.error}")
                else:
                    why = "stopped" if run.status == "stopped" else "interrupted (the app stopped while it ran)"
                    st.markdown(f"{label} · {why} after {written:,} of {run.total:,} files; they are kept")
                # Whatever ended it (a full disk, a moved model), the rows written are good: offer to go on.
                if st.button("Resume", key=f"resume-{run.folder}", disabled=state.job_running(SCORE_JOB, project_id),
                             help="Scores the remaining files; rows already written are kept, none is written twice."):
                    _start(run, project_id, resume=True)
            if written and (index == 0 or st.toggle("Show results", key=f"show-{run.folder}")):
                _results_table(run)


def score_files_panel(workspace, project, model) -> None:
    """The Detect page's "score a folder or a large upload" section for ``model`` (a StoredModel)."""
    with st.expander("Score a folder or a large upload — in the background, results saved as they arrive"):
        st.caption("For thousands of images: each is read once and scored in batches; rows are written to a "
                   "results file as they finish, so Stop, a closed tab or a restart of the app lose nothing. "
                   "These images are not added to the project.")
        source = st.radio("Images from", ("folder", "upload"), horizontal=True, key="score-files-source",
                          format_func={"folder": "A folder on this computer", "upload": "Uploaded files or zips"}.get)
        folder, uploads = "", []
        refused = None
        if source == "folder":
            folder = st.text_input("Folder (sub-folders included)", key="score-files-folder").strip()
            try:
                if folder:
                    folders.check_folder(workspace, folder)
            except FolderNotAllowed as error:
                refused = error
                offer_to_allow(workspace, folder, error, key="score-files")
        else:
            uploads = st.file_uploader("Images or zip archives", type=UPLOAD_TYPES, accept_multiple_files=True,
                                       key=f"score-files-upload-{state.upload_generation()}")
        busy = state.job_running(SCORE_JOB, project.id)
        if st.button("Score in the background", type="primary", disabled=busy or not (folder or uploads)
                     or refused is not None, key="score-files-start"):
            try:
                inputs = [str(folders.check_folder(workspace, folder))] if folder else _save_uploads(workspace, uploads)
                if folder and not Path(inputs[0]).is_dir():
                    raise NotADirectoryError(f"{folder}: not a folder")
            except (FolderNotAllowed, OSError) as error:
                st.error(str(error))
            else:
                title = Path(folder).name if folder else f"{len(uploads)} uploaded files"
                run = new_run(_root(workspace), model.id, model.path, inputs, f"{title} · model #{model.id}")
                _start(run, project.id, resume=False)
        allowed_list(workspace, key="score-files")
        job_panel(state.job(SCORE_JOB, project.id), key="score-files", topics=(state.DETECT,))
        _past_runs(workspace, model, project.id)
