"""The Adapt page's widgets: the settings form, a run's curves, the runs table, the collapse lesson."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import streamlit as st

from core.backbones import list_backbones
from core.config import KEEP_RULES, PANDA_STRATEGIES
from core.knn import KNN_METRICS
from core.projects import adaptation as service
from core.store import Run, Workspace
from dashboard import state, tasks
from dashboard.components import charts

EARLY_RULES = {"fixed": "after the epochs above (paper)", "auto": "at the best signal (normal images only)"}
EWC_STEPS = {"gradient": "in the loss (paper)", "proximal": "proximal (stable)"}
# (curve key, legend, dash): Fig. 3 of Reiss et al. plots these per epoch.
RATIO_CURVES = [("test_normal_ratio", "normal test / train distance", "solid"),
                ("test_anomalous_ratio", "anomalous test / train distance", "dash")]
DISTANCE_CURVES = [("train_distance", "normal train", "dot"), ("test_normal_distance", "normal test", "solid"),
                   ("test_anomalous_distance", "anomalous test", "dash"),
                   ("holdout_distance", "held-out normal (collapse guard)", "dashdot")]
AUROC_CURVE = [("auroc", "ROC AUC", "solid")]
SIGNAL_CURVE = [("signal", "held-out normal vs probe images", "solid")]
LESSON_NAMES = {"unregularised": "no regularisation", "ses": "SES (snapshots so far)", "ewc": "EWC"}
LESSON_TEXT = (
    "**What you see.** PANDA pulls the features of normal images towards their centre. At first this helps: "
    "normal images gather, anomalies stay away, and the ROC AUC climbs. Trained on without a brake, the network "
    "learns the trivial answer — *every* image at the centre — and the ROC AUC collapses to chance. **SES** keeps "
    "snapshots along the way and scores each image with the snapshot that separates it best, so the collapsed "
    "late snapshots cannot pull it down. **EWC** penalises moving the weights that mattered for ImageNet "
    "(measured by their Fisher information), so the features keep their variety and never collapse. The lesson "
    "trains hard on purpose (32² input, learning rate 5, 20 epochs) so that all of this happens within a minute.")


def settings_form(disabled_reasons: list[str]) -> dict[str, Any]:
    """Draw the settings widgets (their values live in ``state.PANDA_FORM``) and return their values."""
    keys = state.PANDA_FORM
    strategy = state.panda_form()["strategy"]
    top = st.columns([3, 2, 2, 3])
    top[0].selectbox("Strategy", list(PANDA_STRATEGIES), format_func=PANDA_STRATEGIES.get, key=keys["strategy"])
    top[1].selectbox("Backbone", list(list_backbones()), key=keys["backbone"])
    top[2].selectbox("Distance", list(KNN_METRICS), format_func=KNN_METRICS.get, key=keys["metric"],
                     help="The kNN distance of every score (epoch 0 = DN2, Early, SES, EWC). Cosine compares "
                          "directions only; it is the default (measured best on Fashion-MNIST and bottle).")
    with top[3]:
        presets = st.columns(2)
        for column, (name, label) in zip(presets, (("defaults", "Defaults"), ("paper", "Paper settings"))):
            column.button(label, key=f"panda-preset-{name}", width="stretch",
                          on_click=state.set_panda_form, args=(service.preset(name),),
                          help="The protocol measured best here: Lite2 224², cosine, SES over 16 epochs at lr 0.1, "
                               "the signal's choice (docs/RESULTS-panda.md)" if name == "defaults" else
                               "Reiss et al.'s protocol: Lite0 at its own size, Euclidean, lr 1e-2, the paper's "
                               "minibatch counts, fixed Early, always the trained network")
    columns = st.columns(4)
    columns[0].number_input("Image size", 0, 512, key=keys["crop"], step=16,
                            help="Square input side in pixels; 0 = the backbone's own. Smaller trains faster.")
    columns[1].number_input("Epochs", 0, 500, key=keys["epochs"],
                            help="0 = the paper's minibatch count for the strategy, scaled to the normal set. "
                                 "With the automatic Early rule: the most it trains.")
    columns[2].number_input("Learning rate", 1e-5, 10.0, format="%.0e", key=keys["lr"],
                            help="Gradients are clipped to norm 1e-3, so a step moves the weights about lr/1000: "
                                 "the paper's 1e-2 needs thousands of minibatches; 0.1 covers that in 16 epochs.")
    columns[3].number_input("Minibatch", 2, 256, key=keys["batch_size"], help="Images per step (paper: 32).")
    columns = st.columns(5)
    columns[0].number_input("SES snapshot every (epochs)", 0, 100, key=keys["snapshot_every"],
                            disabled=strategy != "ses", help="0 = the paper's interval (25k images, scaled).")
    columns[1].selectbox("Early stops", list(EARLY_RULES), format_func=EARLY_RULES.get, key=keys["early_rule"],
                         disabled=strategy != "early")
    columns[2].selectbox(
        "Keep", list(KEEP_RULES), format_func=KEEP_RULES.get, key=keys["keep_rule"], disabled=strategy == "oe",
        help="The signal: 10 % of the normal images are held out of training; each epoch measures how well the "
             "features tell them from probe images that are surely not normal (blends of two normal images). "
             "If adaptation did not improve that, the model keeps the pretrained network (DN2's features) and "
             "scores with the trained one too, weighted towards the pretrained one. 'Both networks' always "
             "scores with both. No test image or label is read.")
    columns[3].number_input("EWC λ", 0.0, 1e7, format="%.0e", key=keys["ewc_lambda"], disabled=strategy != "ewc")
    columns[4].selectbox("EWC step", list(EWC_STEPS), format_func=EWC_STEPS.get, key=keys["ewc_step"],
                         disabled=strategy != "ewc")
    for reason in disabled_reasons:
        st.caption(f"Cannot train yet: {reason}.")
    return state.panda_form()


def kept_phrase(stop_epoch: int | None, summary: dict) -> str:
    """The run header's words for what its model is: an epoch, the pretrained network, or both fused."""
    if stop_epoch is None:
        return ""
    if summary.get("fused"):
        adapted = summary.get("adapted_epoch")
        lead = "the pretrained network" if stop_epoch == 0 else f"epoch {stop_epoch}"
        return f", model: {lead} fused with " + ("epoch 0" if stop_epoch != 0 else f"epoch {adapted}")
    return ", model from the pretrained network (epoch 0)" if stop_epoch == 0 else f", model from epoch {stop_epoch}"


def run_name(run: Run) -> str:
    rule = " (auto stop)" if run.strategy == "early" and run.settings.get("early_rule") == "auto" else ""
    return f"#{run.id} {run.strategy}{rule}"


def curve_series(run: Run, name: str | None = None) -> dict[str, Any]:
    keys = RATIO_CURVES + DISTANCE_CURVES + AUROC_CURVE + SIGNAL_CURVE
    return {"name": name or run_name(run), "epochs": [record["epoch"] for record in run.curves],
            "values": {key: [record.get(key) for record in run.curves] for key, _, _ in keys},
            "stop_epoch": run.stop_epoch}


def draw_run(run: Run, key: str) -> None:
    """A run's ROC AUC and signal per epoch (the star: the epoch its model keeps), ratios and distances below."""
    series = [curve_series(run)]
    left, right = st.columns(2)
    left.plotly_chart(charts.training_curves(series, AUROC_CURVE, "Test ROC AUC per epoch", "ROC AUC", (0, 1.02)),
                      key=f"{key}-auroc", config=charts.STATIC)
    right.plotly_chart(charts.training_curves(series, SIGNAL_CURVE, "Signal per epoch (normal images only)",
                                              "separation"), key=f"{key}-signal", config=charts.STATIC)
    with st.expander("Distances to the centre (the paper's Fig. 3)"):
        st.plotly_chart(charts.training_curves(series, RATIO_CURVES, "Normalised distance to the centre",
                                               "mean distance / normal-train mean"), key=f"{key}-ratio",
                        config=charts.STATIC)
        st.plotly_chart(charts.training_curves(series, DISTANCE_CURVES, "Mean squared distance to the centre",
                                               "distance²"), key=f"{key}-raw", config=charts.STATIC)


def runs_table(workspace: Workspace, runs: list[Run]) -> None:
    """One row per run; ROC AUC is the saved model's, as in every model list."""
    summaries = {run.id: workspace.model(run.model_id).summary if run.model_id is not None else {} for run in runs}
    table = pd.DataFrame([{
        "run": run.id, "strategy": run_name(run).split(" ", 1)[1], "status": run.status,
        "epochs": max((r["epoch"] for r in run.curves), default=0), "model epoch": run.stop_epoch,
        "ROC AUC": summaries[run.id].get("auroc"), "kept": summaries[run.id].get("kept_reason"),
        "image size": run.settings.get("crop"), "lr": run.settings.get("lr"),
        "snapshots every": run.settings.get("snapshot_every") if run.strategy == "ses" else None,
        "λ": run.settings.get("ewc_lambda") if run.strategy == "ewc" else None,
        "EWC step": run.settings.get("ewc_step", "gradient") if run.strategy == "ewc" else None,
        "Fisher": summaries[run.id].get("fisher_source"),
        "Fisher median": (summaries[run.id].get("fisher_statistics") or {}).get("median"),
        "distance": run.settings.get("metric", "euclidean"),  # runs from before the choice were Euclidean
        "backbone": run.settings.get("backbone"), "model": run.model_id,
        "started": time.strftime("%H:%M:%S", time.localtime(run.created)),
    } for run in runs])
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"Fisher median": st.column_config.NumberColumn(format="%.2e"),
                                "ROC AUC": st.column_config.NumberColumn(format="%.3f")})


def overlay(runs: list[Run]) -> None:
    """The chosen runs' ROC AUC and anomalous/train ratio on one chart each."""
    ids = [run.id for run in runs]
    chosen = st.multiselect("Overlay runs", ids, format_func=lambda i: run_name(next(r for r in runs if r.id == i)),
                            key=state.overlay_runs_widget(ids, {run.id for run in runs if run.status != "running"}))
    series = [curve_series(run) for run in runs if run.id in chosen and run.curves]
    if series:
        left, right = st.columns(2)
        left.plotly_chart(charts.training_curves(series, AUROC_CURVE, "ROC AUC per epoch", "ROC AUC", (0, 1.02)),
                          key="cmp-auroc", config=charts.STATIC)
        right.plotly_chart(charts.training_curves(series, SIGNAL_CURVE, "Signal per epoch", "separation"),
                           key="cmp-signal", config=charts.STATIC)


def lesson(result: Any) -> None:
    """The lesson's three ROC AUC curves, each strategy's final ROC AUC and the explanation."""
    st.markdown(LESSON_TEXT)
    if result is None:
        return
    series = [{"name": LESSON_NAMES[name], "epochs": result.epochs, "values": {"auroc": values}, "stop_epoch": None}
              for name, values in result.curves.items()]
    st.plotly_chart(charts.training_curves(series, AUROC_CURVE, "The collapse lesson: test ROC AUC per epoch",
                                           "ROC AUC", (0.4, 1.02)), key="lesson-auroc", config=charts.STATIC)
    columns = st.columns(len(result.auroc) + 1)
    for column, (name, value) in zip(columns, result.auroc.items()):
        column.metric(f"{LESSON_NAMES[name]}, last epoch", f"{value:.3f}")
    columns[-1].metric("wall time", f"{result.seconds:.0f} s")
