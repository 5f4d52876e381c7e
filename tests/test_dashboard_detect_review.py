"""AppTest: fitting on the Detect page, its threshold and plots; reviewing and annotating on the Review page."""

from __future__ import annotations

import json
import re

import pytest

from conftest import finish_jobs, new_app


def test_detect_page_fits_and_shows_threshold_histogram_roc_and_gallery(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/detect.py")
    assert not at.exception
    assert {box.label for box in at.selectbox} >= {"Method", "Backbone"}
    assert at.info and "No model yet" in at.info[0].value
    next(button for button in at.button if button.label == "Fit and score").click().run()
    assert at.get("progress") or at.session_state["jobs"]["fit"].status == "finished"
    finish_jobs(at)
    assert not at.exception
    (model,) = workspace.models(project.id)
    assert len(workspace.scores(model.id)) == 6

    labels = {metric.label: metric.value for metric in at.metric}
    assert labels["FPR on normal training images"].endswith("%")
    assert len(at.get("plotly_chart")) == 2  # histogram and ROC (the test set is labelled)
    assert len(at.get("image")) >= 1  # the ranked gallery

    # Moving the threshold above every score flags nothing and changes the implied FPR.
    slider = at.slider(key=f"threshold-{model.id}-6")
    slider.set_value(slider.max).run()
    labels = {metric.label: metric.value for metric in at.metric}
    assert labels["Flagged test images"] == "0 / 6"
    assert labels["FPR on normal training images"] == "0.0%"


def test_dn2_fitted_with_the_cosine_distance_keeps_it(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/detect.py")
    assert at.selectbox(key="fit-metric").value == "euclidean"  # the paper's, unless asked
    at.selectbox(key="fit-metric").set_value("cosine").run()
    next(button for button in at.button if button.label == "Fit and score").click().run()
    finish_jobs(at)
    assert not at.exception
    (model,) = workspace.models(project.id)
    assert model.settings["metric"] == "cosine"
    from core.projects import stored_settings

    assert stored_settings("dn2", model.settings).metric == "cosine"
    from dashboard.components.models import model_label

    assert "cosine" in model_label(model)


def test_stop_button_stops_a_fit(tiny_bottle):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/detect.py")
    next(button for button in at.button if button.label == "Fit and score").click().run()
    job = at.session_state["jobs"]["fit"]
    stop = [button for button in at.button if button.label == "Stop"]
    if job.running:  # on a fast machine the fit may be over already
        stop[0].click().run()
        assert job.wait(60)
        assert job.status in ("stopped", "finished")
        if job.status == "stopped":
            assert workspace.models(project.id) == []


def test_annotation_is_saved_at_once_and_seen_by_a_new_session(fitted):
    workspace, project, model = fitted
    at = new_app(project.id, page="views/review.py")
    assert not at.exception
    shown = next(block.value for block in at.markdown if block.value.startswith("**test/"))
    at.toggle(key="review-all").set_value(True).run()
    # The image under review stays on screen when the list widens (it is the one being reviewed).
    assert shown in [block.value for block in at.markdown]
    position = int(re.search(r"\*\*(\d+) / 6\*\*", " ".join(block.value for block in at.markdown)).group(1))
    first_key = next(radio.key for radio in at.radio if radio.key.startswith("verdict-"))
    image_id = int(first_key.split("-")[1])
    at.radio(key=first_key).set_value("normal").run()
    at.text_area(key=f"note-{image_id}").input("reflection on the rim").run()
    assert workspace.annotations(project.id)[image_id].note == "reflection on the rim"

    # Move on; the position is remembered.
    next(button for button in at.button if button.label == "Next").click().run()
    assert f"{position % 6 + 1} / 6" in " ".join(block.value for block in at.markdown)

    # A different browser session (new AppTest) sees the verdict, the note and the position.
    other = new_app(project.id, page="views/review.py")
    other.toggle(key="review-all").set_value(True).run()
    assert f"{position % 6 + 1} / 6" in " ".join(block.value for block in other.markdown)
    next(button for button in other.button if button.label == "Previous").click().run()
    assert other.radio(key=first_key).value == "normal"
    assert other.text_area(key=f"note-{image_id}").value == "reflection on the rim"

    # Export holds it; "add confirmed normals" grows the normal set and refits.
    exported = json.loads(workspace.export_annotations_json(project.id))
    assert exported["annotations"][0]["verdict"] == "normal"
    assert {button.label for button in other.get("download_button")} == {"Annotations (CSV)", "Annotations (JSON)"}
    next(button for button in other.button if button.label.startswith("Add 1 confirmed")).click().run()
    finish_jobs(other)
    assert workspace.counts(project.id)["normal"] == 9
    assert len(workspace.models(project.id)) == 2


def test_two_sessions_keep_their_own_project(tiny_bottle):
    workspace, project = tiny_bottle
    other_project = workspace.create_project("someone else's")
    first = new_app(project.id, page="views/data.py")
    second = new_app(other_project.id, page="views/data.py")
    first.run()
    assert first.session_state["project_id"] == project.id
    assert second.session_state["project_id"] == other_project.id
    assert first.sidebar.selectbox[0].value == project.id and second.sidebar.selectbox[0].value == other_project.id
    assert [metric.value for metric in first.metric][:2] == ["8", "6"]
    assert [metric.value for metric in second.metric][:2] == ["0", "0"]
