"""AppTest: the Adapt page trains PANDA in the background, streams curves to the store, compares runs, and
offers the measured defaults, the paper's settings and the collapse lesson."""

from __future__ import annotations

import pytest

from conftest import finish_jobs, new_app, model_picker
from core.config import KEEP_RULES
from core.projects import adaptation as service
from dashboard.state import PANDA_FORM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"panda-backbone": "efficientnet_lite0", "panda-crop": 32}
"""What every training test sets first: the smallest backbone at 32² (the defaults are Lite2 at 224²)."""


@pytest.fixture(autouse=True)
def _private_fisher_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_FISHER_CACHE", str(tmp_path / "fisher"))


def set_form(at, values: dict) -> None:
    for key, value in values.items():
        widget = at.selectbox(key=key) if key in {b.key for b in at.selectbox} else at.number_input(key=key)
        widget.set_value(value).run()


def train_one_run(at, workspace, project, choices: dict, epochs: int):
    """Set ``choices`` (widget key -> value) at 32² for ``epochs``, train, return the project's newest run."""
    set_form(at, {**SMALL, **choices, "panda-epochs": epochs})
    next(b for b in at.button if b.label == "Start training").click().run()
    finish_jobs(at, timeout=150)
    return workspace.runs(project.id)[0]


def test_adapt_page_trains_streams_curves_and_keeps_the_run(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/adapt.py")
    assert not at.exception
    assert {box.label for box in at.selectbox} >= {"Strategy", "Backbone", "Distance", "Keep"}
    assert {field.label for field in at.number_input} >= {"Epochs", "Learning rate", "EWC λ"}
    assert "OE" in " ".join(at.selectbox(key="panda-strategy").options)
    at.selectbox(key="panda-strategy").set_value("ewc").run()
    assert not at.selectbox(key="panda-ewc-step").disabled
    assert at.selectbox(key="panda-ewc-step").options == ["in the loss (paper)", "proximal (stable)"]

    # OE without outlier images is refused with a reason.
    at.selectbox(key="panda-strategy").set_value("oe").run()
    assert any("outlier" in caption.value for caption in at.caption)
    assert next(b for b in at.button if b.label == "Start training").disabled

    run = train_one_run(at, workspace, project, {"panda-strategy": "early", "panda-early-rule": "fixed"}, epochs=1)
    assert run.strategy == "early" and run.status == "finished"
    assert [record["epoch"] for record in run.curves] == [0, 1]  # epoch 0 = the pretrained features
    assert run.curves[-1]["auroc"] is not None and run.curves[-1]["test_anomalous_ratio"] is not None
    # The normal-only signal was measured each epoch; the run's model epoch is the one the choice kept.
    assert all(record["signal"] is not None for record in run.curves)
    model = workspace.model(run.model_id)
    assert run.stop_epoch == model.summary["kept_epoch"] in (0, 1) and model.summary["kept_reason"]
    assert run.message == model.summary["kept_reason"]
    assert model.method == "panda" and len(workspace.scores(model.id)) == 6
    # Curves (ROC AUC + signal), the comparison table and the overlay are drawn; the table names the choice.
    assert len(at.get("plotly_chart")) >= 4
    row = at.dataframe[0].value.iloc[0]
    assert row["strategy"] == "early" and row["kept"] == model.summary["kept_reason"]

    # Switching pages loses nothing; the PANDA model is offered on the Detect page.
    at.switch_page("views/detect.py").run()
    assert "PANDA" in model_picker(at, "detect-model").format_func(model_picker(at, "detect-model").value)


def test_another_session_sees_a_running_job_and_can_stop_it(tiny_bottle):
    workspace, project = tiny_bottle
    first = new_app(project.id, page="views/adapt.py")
    set_form(first, {**SMALL, "panda-epochs": 200})  # long enough to still run below
    next(b for b in first.button if b.label == "Start training").click().run()
    (job,) = first.session_state["jobs"].values()
    assert job.running

    # An inspector in another browser on the same project: the job is shown, starting a second one is not offered.
    second = new_app(project.id, page="views/adapt.py")
    assert not second.exception, second.exception
    assert next(b for b in second.button if b.label == "Start training").disabled
    stop = next(b for b in second.button if b.label == "Stop")
    stop.click().run()
    assert job.wait(60) and job.status == "stopped"
    (run,) = workspace.runs(project.id)
    assert workspace.run(run.id).status == "stopped"


def test_defaults_and_the_papers_settings_are_one_click_each(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/adapt.py")
    def shown() -> dict:
        return {name: at.session_state[key] for name, key in PANDA_FORM.items()}

    assert shown() == service.preset("defaults")  # the page opens on the measured defaults
    assert shown()["backbone"] == "efficientnet_lite2" and shown()["metric"] == "cosine" and shown()["crop"] == 224
    assert shown()["strategy"] == "ses" and shown()["keep_rule"] == "signal" and shown()["lr"] == 0.1
    at.button(key="panda-preset-paper").click().run()
    paper = shown()
    assert paper == service.preset("paper")
    assert paper["metric"] == "euclidean" and paper["keep_rule"] == "last" and paper["lr"] == 1e-2
    assert paper["epochs"] == 0 and paper["early_rule"] == "fixed" and paper["backbone"] == "efficientnet_lite0"
    at.button(key="panda-preset-defaults").click().run()
    assert shown() == service.preset("defaults")

    # A run trained from the paper's button stores exactly what the settings say (typed once).
    at.button(key="panda-preset-paper").click().run()
    run = train_one_run(at, workspace, project, {"panda-strategy": "ses", "panda-snapshots": 1}, epochs=2)
    model = workspace.model(run.model_id)
    assert run.settings["snapshot_every"] == 1 and run.settings["crop"] == 32 and run.settings["keep_rule"] == "last"
    assert model.settings["snapshot_every"] == 1 and model.settings["features"]["crop"] == 32
    assert model.settings["keep_rule"] == "last" and model.summary["kept_epoch"] == 2  # no comparison: SES kept
    assert [r["snapshot"] for r in run.curves] == [None, 0, 1]
    row = at.dataframe[0].value.set_index("run").loc[run.id]
    assert row["ROC AUC"] == model.summary["auroc"]  # one figure: the model's
    assert at.multiselect(key="compare-runs").value == [run.id]


def test_an_ewc_run_names_its_fisher_and_joins_the_overlay(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/adapt.py")
    first = train_one_run(at, workspace, project, {"panda-strategy": "early", "panda-metric": "cosine"}, epochs=1)
    assert first.settings["metric"] == "cosine"
    assert at.dataframe[0].value.set_index("run").loc[first.id, "distance"] == "cosine"
    ewc = train_one_run(at, workspace, project, {"panda-strategy": "ewc", "panda-ewc-step": "proximal"}, epochs=1)
    assert ewc.strategy == "ewc" and ewc.status == "finished"
    source = workspace.model(ewc.model_id).summary["fisher_source"]
    assert source.startswith("offline photo pool")
    assert at.dataframe[0].value.set_index("run").loc[ewc.id, "Fisher"] == source
    assert any(source in caption.value for caption in at.caption)
    assert at.multiselect(key="compare-runs").value == [ewc.id, first.id]


def test_early_with_the_automatic_rule_keeps_the_best_signal(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/adapt.py")
    run = train_one_run(at, workspace, project, {"panda-strategy": "early", "panda-early-rule": "auto"}, epochs=3)
    assert run.settings["early_rule"] == "auto" and run.status == "finished"
    best = max(run.curves, key=lambda record: record["signal"])
    # The model comes from the best signal's epoch (0 = the pretrained network) and the star marks it.
    assert run.stop_epoch == best["epoch"] == workspace.model(run.model_id).summary["kept_epoch"]
    assert "auto stop" in at.dataframe[0].value["strategy"].iloc[0]


def test_a_fused_model_says_so_and_shows_each_networks_roc_auc(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/adapt.py")
    assert at.selectbox(key="panda-keep-rule").options == list(KEEP_RULES.values())
    run = train_one_run(at, workspace, project, {"panda-strategy": "early", "panda-early-rule": "fixed",
                                                 "panda-keep-rule": "fuse"}, epochs=1)
    assert run.settings["keep_rule"] == "fuse" and run.status == "finished"
    summary = workspace.model(run.model_id).summary
    assert summary["fused"] is True and "keep_rule=fuse" in summary["kept_reason"]
    assert 0.0 <= summary["pretrained_auroc"] <= 1.0 and 0.0 <= summary["adapted_auroc"] <= 1.0
    header = " ".join(element.value for element in at.subheader)
    assert "model: epoch 1 fused with epoch 0" in header
    captions = " ".join(caption.value for caption in at.caption)
    assert f"alone: pretrained network {summary['pretrained_auroc']:.3f}" in captions
    # The saved scores are the fused model's: the Detect page reads them as for any model.
    assert len(workspace.scores(run.model_id)) == 6


def test_the_collapse_lesson_runs_and_draws_three_curves(workspace_dir, monkeypatch):
    import dataclasses

    import core.adaptation.lesson as lesson
    from core.store import Workspace
    from dashboard import tasks

    # The lesson's own settings, shortened for the test (the full one is a benchmark command: adapt --lesson).
    monkeypatch.setattr(lesson, "LESSON_SETTINGS", dataclasses.replace(lesson.LESSON_SETTINGS, epochs=3))
    # The app computes with one thread per core; the lesson's tiny operations must not (core.threads).
    import torch

    threads_seen = []
    train = lesson.adapt

    def counting_adapt(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return train(*args, **kwargs)

    monkeypatch.setattr(lesson, "adapt", counting_adapt)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    workspace = Workspace(workspace_dir)
    project, _ = tasks.import_demo(workspace, "fashion")
    at = new_app(project.id, page="views/adapt.py")
    assert not at.exception
    at.button(key="panda-lesson").click().run()
    finish_jobs(at, timeout=150)
    saved = service.saved_lesson(workspace, project.id)
    assert set(saved.curves) == {"unregularised", "ses", "ewc"} and saved.epochs == [0, 1, 2, 3]
    assert all(0.0 <= value <= 1.0 for value in saved.auroc.values()) and saved.seconds > 0
    assert threads_seen == [1, 1] and torch.get_num_threads() == 2  # one thread inside, the app's count after
    torch.set_num_threads(before)
    assert "SES" in " ".join(m.value for m in at.markdown)
    assert {metric.label for metric in at.metric} >= {"no regularisation, last epoch", "EWC, last epoch"}
    # After a restart (a new session) the lesson is still there.
    again = new_app(project.id, page="views/adapt.py")
    assert {metric.label for metric in again.metric} >= {"SES (snapshots so far), last epoch"}
