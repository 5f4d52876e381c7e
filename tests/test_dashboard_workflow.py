"""AppTest: results follow the action, and the working point is the model's (issue 15, parts 2 and 3)."""

from __future__ import annotations

import threading

import pytest

from conftest import finish_jobs, new_app, model_picker
from core import projects
from core.config import settings_for
from core.detectors import METHODS
from dashboard import state, tasks
from dashboard.jobs import Job

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fit(workspace, project, method):
    settings = settings_for(METHODS[method].settings_type, backbone="efficientnet_lite0")
    job = Job("fit", lambda j: tasks.fit_and_score(workspace, project.id, method, settings, j))
    assert job.wait(120) and job.status == "finished", job.error
    return workspace.model(job.result)


def click(at, label_start):
    next(button for button in at.button if button.label.startswith(label_start)).click().run()


def test_detect_shows_the_model_just_fitted(tiny_bottle):
    """A Gaussian fit after a DN2 fit must show the Gaussian's numbers, not stay on DN2."""
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/detect.py")
    click(at, "Fit and score")
    finish_jobs(at)
    (dn2,) = workspace.models(project.id)
    assert model_picker(at, "detect-model").value == dn2.id
    at.selectbox(key="fit-method").set_value("gaussian").run()
    click(at, "Fit and score")
    finish_jobs(at)
    gaussian = workspace.models(project.id, "gaussian")[0]
    assert model_picker(at, "detect-model").value == gaussian.id
    assert any(f"model #{gaussian.id}" in caption.value for caption in at.caption)


def test_segment_page_does_not_report_a_detect_fit(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/detect.py")
    click(at, "Fit and score")
    finish_jobs(at)
    at.switch_page("views/segment.py").run()
    assert not at.exception
    shown = [block.value for kind in ("success", "warning", "error") for block in getattr(at, kind)]
    assert not any("Fitting" in text for text in shown), shown


def test_sidebar_progress_reads_as_the_page_panel(tiny_bottle):
    workspace, project = tiny_bottle
    release = threading.Event()

    def work(job):
        job.report(3, 10, "learning 8 normal images")
        release.wait(30)

    at = new_app(project.id, page="views/detect.py")
    job = Job("Fitting DN2 (test)", work, project_id=project.id, topic=state.DETECT)
    try:
        while job.progress.total != 10:
            pass
        at.session_state["jobs"] = {state.FIT: job}
        at.run()
        page = [bar.proto.text for bar in at.get("progress")]
        sidebar = [caption.value for caption in at.sidebar.caption]
        assert page == [job.label]
        assert any(job.label in line for line in sidebar), (page, sidebar)
        assert "(3/10, 30%)" in job.label
    finally:
        release.set()
        job.wait(10)


def test_review_refit_ends_on_the_new_model_with_a_done_message(tiny_bottle):
    workspace, project = tiny_bottle
    first = fit(workspace, project, "dn2")
    at = new_app(project.id, page="views/review.py")
    at.toggle(key="review-all").set_value(True).run()
    image_id = next(row.id for row in workspace.images(project.id, "test") if row.label == 0)
    workspace.annotate(image_id, "normal")
    at.run()
    click(at, "Add 1 confirmed")
    job = at.session_state["jobs"][state.FIT]
    refit = next(button for button in at.button if button.label.startswith("Add"))
    assert refit.disabled or not job.running  # no second refit while the first runs
    finish_jobs(at)
    assert not at.exception
    newest = workspace.models(project.id)[0]
    assert newest.id != first.id
    assert model_picker(at, "review-model").value == newest.id
    assert any("done" in success.value for success in at.success)
    # The confirmed normal is in the normal set now: nothing is left to add.
    assert next(button for button in at.button if button.label.startswith("Add")).disabled


def test_threshold_is_saved_with_the_model_across_sessions_and_restarts(tiny_bottle):
    workspace, project = tiny_bottle
    model = fit(workspace, project, "dn2")
    at = new_app(project.id, page="views/detect.py")
    # Eight normal images cannot support a 5 % FPR: the page says so, with the interval.
    warnings = " ".join(warning.value for warning in at.warning)
    assert "Only 8 normal images back this threshold" in warnings and "Clopper-Pearson" in warnings
    at.number_input(key=f"target-fpr-{model.id}").set_value(0.25).run()
    click(at, "Set for this FPR")
    saved = projects.working_point(workspace, model, state.detector(str(workspace.root), model.id, str(model.path)))
    assert saved.source == "target_fpr" and saved.false_alarms == 2 and saved.n_normal == 8

    # A "restart": every process cache gone, a fresh browser session.
    state.detector.clear()
    state._open_workspace.clear()
    other = new_app(project.id, page="views/detect.py")
    slider = other.slider(key=f"threshold-{model.id}-6")
    assert slider.value == pytest.approx(saved.threshold)
    assert any(f"{saved.threshold:.4g}" in caption.value for caption in other.caption)
    other.switch_page("views/review.py").run()
    assert any(f"threshold {saved.threshold:.4g}" in caption.value for caption in other.caption)

    # Moving the slider is saved too.
    other.switch_page("views/detect.py").run()
    other.slider(key=f"threshold-{model.id}-6").set_value(slider.max).run()
    assert workspace.model(model.id).summary["working_point"]["source"] == "threshold"


def test_review_opens_on_the_model_last_used(tiny_bottle):
    workspace, project = tiny_bottle
    older = fit(workspace, project, "dn2")
    fit(workspace, project, "gaussian")
    at = new_app(project.id, page="views/detect.py")
    model_picker(at, "detect-model").set_value(older.id).run()
    other = new_app(project.id, page="views/review.py")  # another browser, later
    assert model_picker(other, "review-model").value == older.id
