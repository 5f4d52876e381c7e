"""Adapt: train PANDA on the normal images, watch the paper's Fig. 3 curves live, compare runs, see collapse."""

import streamlit as st

from core.projects import adaptation as service
from dashboard import state, tasks
from dashboard.components import panda
from dashboard.components.jobs import job_panel
from dashboard.components.sidebar import require_project, workspace_and_project

workspace, project = workspace_and_project()
project = require_project(project)
st.title("Adapt the features (PANDA)")
st.caption("Reiss et al., CVPR 2021: fine-tune the last blocks so normal images gather around their centre; stop "
           "before everything collapses there. If adaptation does not help — judged from normal images alone — "
           "the model keeps the pretrained network (DN2's features) and scores with the trained one beside it, "
           "weighted less (a fused model).")
counts = workspace.counts(project.id)
state.panda_form_start(service.preset("defaults"))
busy = state.job_running(state.TRAIN, project.id)

# ---------------------------------------------------------------------- configure and run
with st.container(border=True):
    problems = []
    if counts["normal"] < 4:
        problems.append("needs at least 4 normal images")
    if state.panda_form()["strategy"] == "oe" and counts["outlier"] == 0:
        problems.append("OE needs outlier images (import some as 'outlier' on the Data page)")
    values = panda.settings_form(problems)
    if st.button("Start training", type="primary", disabled=bool(problems) or busy):
        settings = service.settings_from_form(values)
        run_id = workspace.create_run(project.id, settings.strategy, service.run_record(settings))
        state.start_job(state.TRAIN, f"PANDA-{settings.strategy} run #{run_id}",
                        lambda job: tasks.train_panda(workspace, project.id, settings, run_id, job), project.id)
        state.set_live_run(run_id)
        st.rerun()
    job_panel(state.job(state.TRAIN, project.id), key="train")

# ---------------------------------------------------------------------- the lesson
lesson = service.saved_lesson(workspace, project.id)
with st.expander("The collapse lesson: adaptation helps, then collapses; SES and EWC hold (about a minute)",
                 expanded=lesson is not None):
    st.caption("Made for the Fashion-MNIST trousers demo (Start page); runs on this project's images.")
    problem = service.lesson_problem(workspace, project.id)
    if st.button("Run the lesson", key="panda-lesson", disabled=busy or problem is not None,
                 help="Trains two runs (no regularisation, EWC) on small images at a high learning rate and "
                      "scores every epoch on the labelled test images; SES is read off the first run's snapshots."):
        state.start_job(state.TRAIN, "The collapse lesson",
                        lambda job: tasks.run_lesson(workspace, project.id, job), project.id)
        st.rerun()
    if problem:
        st.caption(f"Cannot run: {problem}.")
    panda.lesson(lesson)

# ---------------------------------------------------------------------- the run being watched
runs = workspace.runs(project.id)
if not runs:
    st.info("No training run yet. Without labelled test images only the training distance is plotted.")
    st.stop()
live_id = state.live_run(runs[0].id)
STATUS = {"running": ":material/hourglass_top: running", "finished": ":material/check_circle: finished",
          "stopped": ":material/stop_circle: stopped", "failed": ":material/error: failed"}


@st.fragment(run_every=1.0 if busy else None)
def live_curves() -> None:
    # Re-reads the store each second while training: the curves grow as epochs end.
    run = workspace.run(live_id) if live_id in {r.id for r in runs} else runs[0]
    epochs_done = max((record["epoch"] for record in run.curves), default=0)
    summary = workspace.model(run.model_id).summary if run.model_id is not None else {}
    st.subheader(f"Run #{run.id}: PANDA-{run.strategy} — {STATUS[run.status]}, epoch {epochs_done}"
                 f"{panda.kept_phrase(run.stop_epoch, summary)}")
    facts = [f"model ROC AUC {summary['auroc']:.3f} on the test images"] if summary.get("auroc") is not None else []
    if summary.get("pretrained_auroc") is not None:
        facts += [f"alone: pretrained network {summary['pretrained_auroc']:.3f}, "
                  f"epoch {summary.get('adapted_epoch')} {summary['adapted_auroc']:.3f}"]
    facts += [f"Fisher: {summary['fisher_source']}"] if summary.get("fisher_source") else []
    if facts:
        st.caption(" · ".join(facts))
    if run.message:
        (st.error if run.status == "failed" else st.caption)(run.message)
    if run.curves:
        panda.draw_run(run, "live")
    else:
        st.caption("Waiting for the first epoch (the pretrained features are measured first)…")


live_curves()

# ---------------------------------------------------------------------- compare runs
st.subheader("Compare runs")
panda.runs_table(workspace, runs)
st.caption("ROC AUC is the saved model's (the same figure as on Detect and Review): for SES the best snapshot per "
           "image, for Early the epoch kept; a fused model adds the pretrained network's and the trained epoch's "
           "scores, each measured against the normal images' own. The per-epoch curves score each epoch on its own; "
           "the star marks the epoch each run's model keeps (0 = the pretrained network). Trained models appear on "
           "Detect and Review.")
panda.overlay(runs)
