"""Adapt: train PANDA on the normal images, watch the paper's Fig. 3 curves live, compare runs."""

import time

import pandas as pd
import streamlit as st

from core.backbones import list_backbones
from core.knn import KNN_METRICS
from core.store import Run
from dashboard import state, tasks
from dashboard.components import charts
from dashboard.components.jobs import job_panel
from dashboard.components.sidebar import require_project, workspace_and_project

STRATEGIES = {
    "early": "Early — stop after a fixed number of epochs, or where held-out normal images say",
    "ses": "SES — sample-wise early stopping over snapshots",
    "ewc": "EWC — penalise changes to weights ImageNet relied on",
    "oe": "OE — push outlier images away (needs outlier images)",
}
EARLY_RULES = {"fixed": "after the epochs above (paper)", "auto": "from held-out normal images"}
EWC_STEPS = {"gradient": "in the loss (paper)", "proximal": "proximal (stable)"}
# Widget keys and their defaults (the paper's values where it gives one).
DEFAULTS = {"panda-crop": 0, "panda-epochs": 10, "panda-lr": 1e-2, "panda-batch": 32, "panda-snapshots": 0,
            "panda-lambda": 1e4, "panda-ewc-step": "gradient", "panda-early-rule": "fixed", "panda-metric": "euclidean"}
# "See collapse in a minute": measured on the Fashion-MNIST demo (100 trousers, 100 test images) on a
# loaded 2-core CPU (README, PANDA). At 64² an epoch is a few seconds; lr 1 with minibatches of 8 moves the
# weights ~100x further per epoch than the paper's 1e-2 with 32, so within 30 epochs the ROC AUC dips,
# peaks (99.1 at epochs 4-9) and the anomalous/normal distance ratio climbs to 8 (epoch 22) and falls back to
# 5.9 by epoch 30 while the ROC AUC drops to 98.2 (collapse); snapshots every 3 epochs give SES ten copies
# spread over all of it. EWC (proximal, λ 1e2, photo-pool Fisher) adapts (training distance 1266 -> 236) and
# does not collapse: ratio 2.6 -> 5.7, ROC AUC 99.0-99.1 from epoch 6 to 30. λ 1e4 holds the weights still.
PRESET = {"panda-crop": 64, "panda-epochs": 30, "panda-lr": 1.0, "panda-batch": 8, "panda-snapshots": 3,
          "panda-lambda": 1e2, "panda-ewc-step": "proximal"}
# (curve key, legend, dash): Fig. 3 of Reiss et al. plots these per epoch.
RATIO_CURVES = [("test_normal_ratio", "normal test / train distance", "solid"),
                ("test_anomalous_ratio", "anomalous test / train distance", "dash")]
DISTANCE_CURVES = [("train_distance", "normal train", "dot"), ("test_normal_distance", "normal test", "solid"),
                   ("test_anomalous_distance", "anomalous test", "dash"),
                   ("holdout_distance", "held-out normal (auto stop)", "dashdot")]
AUROC_CURVE = [("auroc", "ROC AUC", "solid")]

workspace, project = workspace_and_project()
project = require_project(project)
st.title("Adapt the features (PANDA)")
st.caption("Reiss et al., CVPR 2021: fine-tune the last blocks so normal images gather around their centre; stop "
           "before everything collapses there. Curves below follow the paper's Fig. 3.")
counts = workspace.counts(project.id)
state.default_widget_values(DEFAULTS)


def apply_preset() -> None:
    # A button callback runs before the widgets of the next run are built, so it may set their values.
    state.set_widget_values(PRESET)


# ---------------------------------------------------------------------- configure and run
with st.container(border=True):
    top = st.columns([3, 2, 2, 3])
    strategy = top[0].selectbox("Strategy", list(STRATEGIES), format_func=STRATEGIES.get, key="panda-strategy")
    backbones = list(list_backbones())
    backbone = top[1].selectbox("Backbone", backbones, index=backbones.index("efficientnet_lite0"),
                                key="panda-backbone")
    metric = top[2].selectbox(
        "Distance", list(KNN_METRICS), format_func=KNN_METRICS.get, key="panda-metric",
        help="The kNN distance of every score (epoch 0 = DN2, Early, SES, EWC). Euclidean is the paper's; cosine "
             "compares directions only: on Fashion-MNIST (Lite2, 224²) it lifted DN2 from 94.5 to 95.3 (README).")
    top[3].button("Preset: see collapse in a minute", on_click=apply_preset, key="panda-preset", width="stretch",
                  help="Small images, a high learning rate and frequent snapshots: on the Fashion-MNIST demo the "
                       "curves move within a minute. Train Early, SES and EWC with it and overlay them below.")
    columns = st.columns(4)
    crop = columns[0].number_input("Image size", 0, 512, key="panda-crop", step=16,
                                   help="Square input side in pixels; 0 = the backbone's own (224 for Lite0). "
                                        "Smaller trains much faster.")
    epochs = columns[1].number_input("Epochs", 1, 500, key="panda-epochs",
                                     help="The paper trains much longer on big sets; a few epochs show the trend. "
                                          "With the automatic Early rule: the most it trains.")
    lr = columns[2].number_input(
        "Learning rate", 1e-5, 10.0, format="%.0e", key="panda-lr",
        help="1e-2 is the paper's. Gradients are clipped to norm 1e-3, so each step moves the weights by about "
             "lr/1000 and the paper needs ~2.3k minibatches for Early. To see the curves move in a short demo, "
             "raise it: at 0.3 each step goes about 30x as far (the benchmarks in the README use 0.3).")
    batch = columns[3].number_input("Minibatch", 2, 256, key="panda-batch",
                                    help="Images per step (paper: 32). The clip makes a step's length independent "
                                         "of it, so smaller minibatches take more steps per epoch.")
    columns = st.columns(4)
    snapshots = columns[0].number_input(
        "SES snapshot every (epochs)", 0, 100, key="panda-snapshots", disabled=strategy != "ses",
        help="SES scores each image with the snapshot that separates it best. 0 = the paper's interval "
             "(25k images, scaled to this set); with fewer epochs than that there is only the final snapshot "
             "and SES cannot differ from Early.")
    early_rule = columns[1].selectbox(
        "Early stops", list(EARLY_RULES), format_func=EARLY_RULES.get, key="panda-early-rule",
        disabled=strategy != "early",
        help="Paper: after a fixed length. Held-out: 10 % of the normal images are kept out of training and "
             "training stops once their distance to the centre is a tenth of the pretrained one (no test labels "
             "used; the star on the curves marks it).")
    ewc_lambda = columns[2].number_input("EWC λ", 0.0, 1e7, format="%.0e", key="panda-lambda",
                                         disabled=strategy != "ewc")
    ewc_step = columns[3].selectbox(
        "EWC step", list(EWC_STEPS), format_func=EWC_STEPS.get, key="panda-ewc-step", disabled=strategy != "ewc",
        help="Paper: the penalty is part of the loss. Proximal: the penalty is applied exactly after each step, "
             "which stays stable at large learning rates (a penalty gradient step would overshoot and add noise).")
    if strategy == "ewc":
        st.caption("EWC weighs each weight's change by its Fisher information on the pretraining task. ImageNet is "
                   "not available here, so the Fisher is measured on an offline pool of natural photos (many "
                   "augmented crops of the project's sample photos), labelled by the network's own top-1 class, "
                   "as the paper's Eq. 3 over 100 minibatches of 32; λ = 1e4 then means what it did in the paper. "
                   "It is computed once per backbone and image size (a minute or two) and reused; the run table "
                   "names the source.")
    if strategy == "ses" and snapshots and epochs < 2 * snapshots:
        st.caption(f"Only {int(epochs) // int(snapshots)} snapshot(s) fit in {int(epochs)} epochs: SES will be "
                   "close to Early. Lower the interval or train longer.")
    problems = []
    if counts["normal"] < 4:
        problems.append("needs at least 4 normal images")
    if strategy == "oe" and counts["outlier"] == 0:
        problems.append("OE needs outlier images (import some as 'outlier' on the Data page)")
    busy = state.job_running(state.TRAIN, project.id)
    if st.button("Start training", type="primary", disabled=bool(problems) or busy):
        options = {"batch_size": int(batch), "snapshot_every": int(snapshots), "early_rule": early_rule,
                   "metric": metric}
        settings = tasks.panda_settings(strategy, backbone, int(epochs), float(lr), float(ewc_lambda),
                                        ewc_step=ewc_step, crop=int(crop) or None, **options)
        run_id = workspace.create_run(project.id, strategy, {
            "backbone": backbone, "epochs": int(epochs), "lr": float(lr), "ewc_lambda": float(ewc_lambda),
            "ewc_step": ewc_step, "crop": int(crop) or None, **options})
        state.start_job(state.TRAIN, f"PANDA-{strategy} run #{run_id}",
                        lambda job: tasks.train_panda(workspace, project.id, settings, run_id, job), project.id)
        state.set_live_run(run_id)
        st.rerun()
    for problem in problems:
        st.caption(f"Cannot train yet: {problem}.")
    job_panel(state.job(state.TRAIN, project.id), key="train")


def model_summary(run: Run) -> dict:
    """The saved model's summary: the one place a run's ROC AUC and Fisher source are read from."""
    return workspace.model(run.model_id).summary if run.model_id is not None else {}


def run_name(run: Run) -> str:
    rule = " (auto stop)" if run.strategy == "early" and run.settings.get("early_rule") == "auto" else ""
    return f"#{run.id} {run.strategy}{rule}"


def curve_series(run: Run) -> dict:
    return {
        "name": run_name(run),
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
    summary = model_summary(run) if run.status != "running" else {}
    facts = []
    if summary.get("auroc") is not None:
        facts.append(f"model ROC AUC {summary['auroc']:.3f} on the test images")
    if any(record.get("auto_stop") for record in run.curves):
        facts.append("stop chosen from held-out normal images (no test labels)")
    if summary.get("fisher_source"):
        facts.append(f"Fisher: {summary['fisher_source']}")
    if facts:
        st.caption(" · ".join(facts))
    if run.message:
        (st.error if run.status == "failed" else st.caption)(run.message)
    if run.curves:
        draw_run(run, "live")
    else:
        st.caption("Waiting for the first epoch (the pretrained features are measured first)…")


live_curves()

# ---------------------------------------------------------------------- compare runs
st.subheader("Compare runs")


def fisher_median(summary: dict):
    """Median Fisher entry of an EWC model (what λ is weighed against), if it was saved."""
    return (summary.get("fisher_statistics") or {}).get("median")


summaries = {run.id: model_summary(run) for run in runs}
table = pd.DataFrame([{
    "run": run.id, "strategy": run_name(run).split(" ", 1)[1], "status": run.status,
    "epochs": max((r["epoch"] for r in run.curves), default=0), "model epoch": run.stop_epoch,
    # One figure everywhere: the saved model's ROC AUC on the test images, as in every model list.
    "ROC AUC": summaries[run.id].get("auroc"),
    "image size": run.settings.get("crop"), "lr": run.settings.get("lr"),
    "snapshots every": run.settings.get("snapshot_every") if run.strategy == "ses" else None,
    "λ": run.settings.get("ewc_lambda") if run.strategy == "ewc" else None,
    "EWC step": run.settings.get("ewc_step", "gradient") if run.strategy == "ewc" else None,
    "Fisher": summaries[run.id].get("fisher_source"), "Fisher median": fisher_median(summaries[run.id]),
    "distance": run.settings.get("metric", "euclidean"),  # runs from before the choice were Euclidean
    "backbone": run.settings.get("backbone"), "model": run.model_id,
    "started": time.strftime("%H:%M:%S", time.localtime(run.created)),
} for run in runs])
st.dataframe(table, hide_index=True, width="stretch",
             column_config={"Fisher median": st.column_config.NumberColumn(format="%.2e"),
                            "ROC AUC": st.column_config.NumberColumn(format="%.3f")})
st.caption("ROC AUC is the saved model's (the same figure as on Detect and Review): for SES the best snapshot "
           "per image, for Early the stopping epoch. The per-epoch curves score each epoch on its own.")

# Runs that finished since this session last looked join the overlay, selected (newest first).
ids = [run.id for run in runs]
finished = {run.id for run in runs if run.status != "running"}
chosen = st.multiselect("Overlay runs", ids, format_func=lambda i: run_name(next(r for r in runs if r.id == i)),
                        key=state.overlay_runs_widget(ids, finished))
series = [curve_series(run) for run in runs if run.id in chosen and run.curves]
if series:
    left, right = st.columns(2)
    left.plotly_chart(charts.training_curves(series, AUROC_CURVE, "ROC AUC per epoch", "ROC AUC", (0, 1.02)),
                      key="cmp-auroc", config=charts.STATIC)
    right.plotly_chart(charts.training_curves(series, RATIO_CURVES[1:], "Anomalous / train distance",
                                              "normalised distance"), key="cmp-ratio", config=charts.STATIC)
    st.caption("The star marks the epoch each run's model comes from. Trained models appear on Detect and Review.")
