"""AppTest: the Adapt page trains PANDA in the background, streams curves to the store, compares runs."""

from __future__ import annotations

from conftest import finish_jobs, new_app


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
    assert "PANDA" in at.selectbox(key="detect-model").format_func(at.selectbox(key="detect-model").value)


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
