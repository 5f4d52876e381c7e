"""A live panel for a background job: progress bar, stage, Stop button, outcome."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from dashboard import state
from dashboard.jobs import Job

POLL_SECONDS = 1.0


def job_panel(job: Job | None, key: str, on_finished: Callable[[Job], None] | None = None,
              quiet_when_done: bool = False, topics: tuple[str, ...] | None = None) -> None:
    """Show ``job``; while it runs, refresh every second without rerunning the whole page.

    When the job ends the whole page is rerun once, so that its results appear.
    ``quiet_when_done``: say nothing about a job that finished well (pages that did not start it).
    ``topics``: show only jobs about these (a page's own work), None = any.
    """
    if job is None or (quiet_when_done and job.status == "finished"):
        return
    if topics is not None and job.topic not in topics:
        return

    @st.fragment(run_every=POLL_SECONDS if job.running else None)
    def panel() -> None:
        if job.running:
            columns = st.columns([5, 1])
            columns[0].progress(job.progress.fraction, text=job.label)
            if columns[1].button("Stop", key=f"{key}-stop", type="secondary", width="stretch"):
                job.stop()
                st.toast("Stopping at the next safe point…")
            state.mark_job_watched(key, True)
            return
        if state.mark_job_watched(key, False):
            if on_finished is not None:
                on_finished(job)
            st.rerun()  # full page: the results of the job are now in the store
        if job.status == "finished":
            st.success(f"{job.title}: done in {job.elapsed:.1f} s.")
        elif job.status == "stopped":
            st.warning(f"{job.title}: stopped after {job.elapsed:.1f} s. Completed results were kept.")
        elif job.status == "failed":
            st.error(f"{job.title} failed: {job.error}")

    panel()


def sidebar_jobs(jobs: list[Job]) -> None:
    """This session's running jobs in the sidebar, refreshed with the page's panel and worded the same."""
    if not jobs:
        return

    @st.fragment(run_every=POLL_SECONDS)
    def lines() -> None:
        for job in jobs:
            if job.running:
                st.caption(f":material/hourglass_top: {job.label}")
            else:
                st.caption(f":material/check: {job.title}: {job.status}")

    lines()
