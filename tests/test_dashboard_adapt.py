"""AppTest: the Adapt page trains PANDA in the background, streams curves to the store, compares runs."""

from __future__ import annotations

from conftest import finish_jobs, new_app, model_picker


def test_adapt_page_trains_streams_curves_and_keeps_the_run(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/adapt.py")
    assert not at.exception
    assert {box.label for box in at.selectbox} >= {"Strategy", "Backbone"}
    assert {field.label for field in at.number_input} >= {"Epochs", "Learning rate", "EWC λ"}
    assert "OE" in " ".join(at.selectbox(key="panda-strategy").options)
    assert at.selectbox(key="panda-ewc-step").disabled  # only EWC has a penalty step to choose
    at.selectbox(key="panda-strategy").set_value("ewc").run()
    assert not at.selectbox(key="panda-ewc-step").disabled
    assert at.selectbox(key="panda-ewc-step").options == ["in the loss (paper)", "proximal (stable)"]

    # OE without outlier images is refused with a reason.
    at.selectbox(key="panda-strategy").set_value("oe").run()
    assert any("outlier" in caption.value for caption in at.caption)
    assert next(b for b in at.button if b.label == "Start training").disabled

    at.selectbox(key="panda-strategy").set_value("early").run()
    at.number_input(key="panda-epochs").set_value(1).run()
    next(b for b in at.button if b.label == "Start training").click().run()
    (run,) = workspace.runs(project.id)
    assert run.strategy == "early"

    # Switching pages while it trains loses nothing: the thread and the store keep going.
    at.switch_page("views/data.py").run()
    at.switch_page("views/adapt.py")
    finish_jobs(at, timeout=150)
    assert not at.exception
    run = workspace.run(run.id)
    assert run.status == "finished" and run.stop_epoch == 1
    assert [record["epoch"] for record in run.curves] == [0, 1]  # epoch 0 = the pretrained features
    assert run.curves[-1]["auroc"] is not None and run.curves[-1]["test_anomalous_ratio"] is not None
    model = workspace.model(run.model_id)
    assert model.method == "panda" and len(workspace.scores(model.id)) == 6
    # Curves (ratio + ROC AUC), the comparison table and the overlay are drawn.
    assert len(at.get("plotly_chart")) >= 4
    assert at.dataframe[0].value["strategy"].tolist() == ["early"]

    # The PANDA model is offered on the Detect page.
    at.switch_page("views/detect.py").run()
    assert "PANDA" in model_picker(at, "detect-model").format_func(model_picker(at, "detect-model").value)


def test_another_session_sees_a_running_job_and_can_stop_it(tiny_bottle):
    workspace, project = tiny_bottle
    first = new_app(project.id, page="views/adapt.py")
    first.number_input(key="panda-epochs").set_value(200).run()  # long enough to still run below
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


def test_preset_snapshots_one_auroc_fisher_source_and_overlay(tiny_bottle, tmp_path, monkeypatch):
    """Issue 15 (5): the preset fills the settings, SES uses the page's snapshot interval, the run table and the
    model list show the same ROC AUC, the Fisher source is named, and each finished run joins the overlay."""
    from dashboard.components.models import model_label

    monkeypatch.setenv("ANOMALY_FISHER_CACHE", str(tmp_path / "fisher"))
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/adapt.py")
    at.button(key="panda-preset").click().run()
    preset = {"panda-crop": 64, "panda-epochs": 30, "panda-lr": 1.0, "panda-batch": 8, "panda-snapshots": 3}
    assert {key: at.number_input(key=key).value for key in preset} == preset
    assert at.selectbox(key="panda-ewc-step").value == "proximal"

    # A short SES run with the page's own snapshot interval (smaller than the preset, for the test's sake).
    at.selectbox(key="panda-strategy").set_value("ses").run()
    for key, value in {"panda-crop": 32, "panda-epochs": 2, "panda-snapshots": 1, "panda-batch": 4}.items():
        at.number_input(key=key).set_value(value).run()
    next(b for b in at.button if b.label == "Start training").click().run()
    finish_jobs(at, timeout=150)
    (ses,) = workspace.runs(project.id)
    assert ses.status == "finished" and ses.settings["snapshot_every"] == 1 and ses.settings["crop"] == 32
    model = workspace.model(ses.model_id)
    assert model.settings["snapshot_every"] == 1 and model.settings["features"]["crop"] == 32
    assert [r["snapshot"] for r in ses.curves] == [None, 0, 1]  # snapshots after epochs 1 and 2
    # One ROC AUC: the table's figure is the model's, as in the model pickers.
    row = at.dataframe[0].value.set_index("run").loc[ses.id]
    assert row["ROC AUC"] == model.summary["auroc"]
    assert f"AUROC {model.summary['auroc']:.3f}" in model_label(model)
    assert at.multiselect(key="compare-runs").value == [ses.id]

    # An EWC run: the Fisher's source is recorded with the model and shown; the new run joins the overlay.
    at.selectbox(key="panda-strategy").set_value("ewc").run()
    at.number_input(key="panda-epochs").set_value(1).run()
    next(b for b in at.button if b.label == "Start training").click().run()
    finish_jobs(at, timeout=150)
    ewc = workspace.runs(project.id)[0]
    assert ewc.strategy == "ewc" and ewc.status == "finished"
    source = workspace.model(ewc.model_id).summary["fisher_source"]
    assert source.startswith("offline photo pool")
    assert at.dataframe[0].value.set_index("run").loc[ewc.id, "Fisher"] == source
    assert any(source in caption.value for caption in at.caption)
    assert at.multiselect(key="compare-runs").value == [ewc.id, ses.id]


def train_one_run(at, workspace, project, choices: dict, epochs: int):
    """Pick ``choices`` (selectbox key -> value), train 32² for ``epochs`` and return the project's only run."""
    for key, value in choices.items():
        at.selectbox(key=key).set_value(value).run()
    at.number_input(key="panda-crop").set_value(32).run()
    at.number_input(key="panda-epochs").set_value(epochs).run()
    next(b for b in at.button if b.label == "Start training").click().run()
    finish_jobs(at, timeout=150)
    (run,) = workspace.runs(project.id)
    return run


def test_early_with_the_automatic_stop_marks_its_epoch(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/adapt.py")
    assert at.selectbox(key="panda-early-rule").value == "fixed"  # the paper's, unless asked
    run = train_one_run(at, workspace, project, {"panda-early-rule": "auto"}, epochs=3)
    assert run.settings["early_rule"] == "auto" and run.status == "finished"
    # Each epoch measured the held-out normal images; the model comes from the marked epoch (or the last).
    assert all(record["holdout_distance"] is not None for record in run.curves)
    marked = [record["epoch"] for record in run.curves if record.get("auto_stop")]
    assert run.stop_epoch == (marked[0] if marked else run.curves[-1]["epoch"])
    assert "auto stop" in at.dataframe[0].value["strategy"].iloc[0]


def test_a_run_with_the_cosine_distance_records_it(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/adapt.py")
    run = train_one_run(at, workspace, project, {"panda-metric": "cosine"}, epochs=1)
    assert run.status == "finished" and run.settings["metric"] == "cosine"
    assert at.dataframe[0].value.set_index("run").loc[run.id, "distance"] == "cosine"
    from core.projects import stored_settings

    assert stored_settings("panda", workspace.model(run.model_id).settings).metric == "cosine"
