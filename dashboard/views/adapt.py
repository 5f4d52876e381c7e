"""Adapt: train PANDA on the normal images, watch the paper's Fig. 3 curves live, compare runs."""

import time

import pandas as pd
import streamlit as st

from core.backbones import list_backbones
from core.store import Run
from dashboard import state, tasks
from dashboard.components import charts
from dashboard.components.jobs import job_panel
from dashboard.components.sidebar import require_project, workspace_and_project

STRATEGIES = {
    "early": "Early — stop after a fixed number of epochs",
    "ses": "SES — sample-wise early stopping over snapshots",
    "ewc": "EWC — penalise changes to weights ImageNet relied on",
    "oe": "OE — push outlier images away (needs outlier images)",
}
EWC_STEPS = {"gradient": "in the loss (paper)", "proximal": "proximal (stable)"}
# (curve key, legend, dash): Fig. 3 of Reiss et al. plots these per epoch.
RATIO_CURVES = [("test_normal_ratio", "normal test / train distance", "solid"),
                ("test_anomalous_ratio", "anomalous test / train distance", "dash")]
DISTANCE_CURVES = [("train_distance", "normal train", "dot"), ("test_normal_distance", "normal test", "solid"),
                   ("test_anomalous_distance", "anomalous test", "dash")]
AUROC_CURVE = [("auroc", "ROC AUC", "solid")]

workspace, project = workspace_and_project()
project = require_project(project)
st.title("Adapt the features (PANDA)")
st.caption("Reiss et al., CVPR 2021: fine-tune the last blocks so normal images gather around their centre; stop "
           "before everything collapses there. Curves below follow the paper's Fig. 3.")
counts = workspace.counts(project.id)

# ---------------------------------------------------------------------- configure and run
with st.container(border=True):
    columns = st.columns([3, 2, 1, 1, 1, 1])
    strategy = columns[0].selectbox("Strategy", list(STRATEGIES), format_func=STRATEGIES.get, key="panda-strategy")
    backbones = list(list_backbones())
    backbone = columns[1].selectbox("Backbone", backbones, index=backbones.index("efficientnet_lite0"),
                                    key="panda-backbone")
    epochs = columns[2].number_input("Epochs", 1, 500, 10, key="panda-epochs",
                                     help="The paper trains much longer on big sets; a few epochs show the trend.")
    lr = columns[3].number_input(
        "Learning rate", 1e-5, 1.0, 1e-2, format="%.0e", key="panda-lr",
        help="1e-2 is the paper's. Gradients are clipped to norm 1e-3, so each step moves the weights by about "
             "lr/1000 and the paper needs ~2.3k minibatches for Early. To see the curves move in a short demo, "
             "raise it: at 0.3 each step goes about 30x as far (the benchmarks in the README use 0.3).")
    ewc_lambda = columns[4].number_input("EWC λ", 0.0, 1e7, 1e4, format="%.0e", key="panda-lambda",
                                         disabled=strategy != "ewc")
    ewc_step = columns[5].selectbox(
        "EWC step", list(EWC_STEPS), format_func=EWC_STEPS.get, key="panda-ewc-step", disabled=strategy != "ewc",
        help="Paper: the penalty is part of the loss. Proximal: the penalty is applied exactly after each step, "
             "which stays stable at large learning rates (a penalty gradient step would overshoot and add noise).")
    if strategy == "ewc":
        st.caption("EWC weighs each weight's change by its Fisher information. The paper measures it on ImageNet, "
                   "which this app does not have: it is estimated here on the project's normal images, with labels "
                   "drawn from the network's own predictions. That estimate is larger than an ImageNet one, so λ = 1e4 "
                   "can hold the weights almost still; the trained model's summary lists the Fisher's size.")
    problems = []
    if counts["normal"] < 4:
        problems.append("needs at least 4 normal images")
    if strategy == "oe" and counts["outlier"] == 0:
        problems.append("OE needs outlier images (import some as 'outlier' on the Data page)")
    busy = state.job_running(state.TRAIN, project.id)
    if st.button("Start training", type="primary", disabled=bool(problems) or busy):
        settings = tasks.panda_settings(strategy, backbone, int(epochs), float(lr), float(ewc_lambda),
                                        ewc_step=ewc_step)
        run_id = workspace.create_run(project.id, strategy, {"backbone": backbone, "epochs": int(epochs),
                                                             "lr": float(lr), "ewc_lambda": float(ewc_lambda),
                                                             "ewc_step": ewc_step})
        state.start_job(state.TRAIN, f"PANDA-{strategy} run #{run_id}",
                        lambda job: tasks.train_panda(workspace, project.id, settings, run_id, job), project.id)
        state.set_live_run(run_id)
        st.rerun()
    for problem in problems:
        st.caption(f"Cannot train yet: {problem}.")
    job_panel(state.job(state.TRAIN, project.id), key="train")


def curve_series(run: Run) -> dict:
    return {
        "name": f"#{run.id} {run.strategy}",
        "epochs": [record["epoch"] for record in run.curves],
        "values": {key: [record.get(key) for record in run.curves]
                   for key, _, _ in RATIO_CURVES + DISTANCE_CURVES + AUROC_CURVE},
        "stop_epoch": run.stop_epoch,
    }


def draw_run(run: Run, key: str) -> None:
    series = [curve_series(run)]
    left, right = st.columns(2)
    left.plotly_chart(charts.training_curves(series, RATIO_CURVES, "Normalised distance to the centre",
                                             "mean distance / normal-train mean"),
                      key=f"{key}-ratio", config=charts.STATIC)
    right.plotly_chart(charts.training_curves(series, AUROC_CURVE, "Test ROC AUC per epoch", "ROC AUC", (0, 1.02)),
                       key=f"{key}-auroc", config=charts.STATIC)
    with st.expander("Raw distances to the centre"):
        st.plotly_chart(charts.training_curves(series, DISTANCE_CURVES, "Mean squared distance to the centre",
                                               "distance²"), key=f"{key}-raw", config=charts.STATIC)


# ---------------------------------------------------------------------- the run being watched
runs = workspace.runs(project.id)
if not runs:
    st.info("No training run yet. Without labelled test images only the training distance is plotted.")
    st.stop()
live_id = state.live_run(runs[0].id)


@st.fragment(run_every=1.0 if busy else None)
def live_curves() -> None:
    # Re-reads the store each second while training: the curves grow as epochs end.
    run = workspace.run(live_id) if live_id in {r.id for r in runs} else runs[0]
    status = {"running": ":material/hourglass_top: running", "finished": ":material/check_circle: finished",
              "stopped": ":material/stop_circle: stopped", "failed": ":material/error: failed"}
    epochs_done = max((record["epoch"] for record in run.curves), default=0)
    st.subheader(f"Run #{run.id}: PANDA-{run.strategy} — {status[run.status]}, epoch {epochs_done}"
                 + (f", model from epoch {run.stop_epoch}" if run.stop_epoch is not None else ""))
    if run.message:
        (st.error if run.status == "failed" else st.caption)(run.message)
    if run.curves:
        draw_run(run, "live")
    else:
        st.caption("Waiting for the first epoch (the pretrained features are measured first)…")


live_curves()

# ---------------------------------------------------------------------- compare runs
st.subheader("Compare runs")


def best(run: Run, key: str):
    values = [record.get(key) for record in run.curves if record.get(key) is not None]
    return max(values) if values else None


def final(run: Run, key: str):
    values = [record.get(key) for record in run.curves if record.get(key) is not None]
    return values[-1] if values else None


def fisher_median(run: Run):
    """Median Fisher entry of an EWC run's model (what λ is weighed against), if it was saved."""
    if run.strategy != "ewc" or run.model_id is None:
        return None
    stats = workspace.model(run.model_id).summary.get("fisher_statistics") or {}
    return stats.get("median")


table = pd.DataFrame([{
    "run": run.id, "strategy": run.strategy, "status": run.status,
    "epochs": max((r["epoch"] for r in run.curves), default=0), "stop epoch": run.stop_epoch,
    "lr": run.settings.get("lr"), "λ": run.settings.get("ewc_lambda") if run.strategy == "ewc" else None,
    "EWC step": run.settings.get("ewc_step", "gradient") if run.strategy == "ewc" else None,
    "Fisher median": fisher_median(run),
    "backbone": run.settings.get("backbone"), "best ROC AUC": best(run, "auroc"),
    "final ROC AUC": final(run, "auroc"), "model": run.model_id,
    "started": time.strftime("%H:%M:%S", time.localtime(run.created)),
} for run in runs])
st.dataframe(table, hide_index=True, width="stretch",
             column_config={"Fisher median": st.column_config.NumberColumn(format="%.2e"),
                            "best ROC AUC": st.column_config.NumberColumn(format="%.3f"),
                            "final ROC AUC": st.column_config.NumberColumn(format="%.3f")})
chosen = st.multiselect("Overlay runs", [run.id for run in runs], default=[run.id for run in runs[:3]],
                        format_func=lambda i: f"#{i} {next(r.strategy for r in runs if r.id == i)}", key="compare-runs")
series = [curve_series(run) for run in runs if run.id in chosen and run.curves]
if series:
    left, right = st.columns(2)
    left.plotly_chart(charts.training_curves(series, AUROC_CURVE, "ROC AUC per epoch", "ROC AUC", (0, 1.02)),
                      key="cmp-auroc", config=charts.STATIC)
    right.plotly_chart(charts.training_curves(series, RATIO_CURVES[1:], "Anomalous / train distance",
                                              "normalised distance"), key="cmp-ratio", config=charts.STATIC)
    st.caption("The star marks the epoch each run's model comes from. Trained models appear on Detect and Review.")
