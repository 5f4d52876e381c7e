"""A refit from Review keeps the user's working point: their target FPR (or the FPR of a hand-set threshold) is
re-placed on the new model's normal scores, and the working point says where it came from."""

from __future__ import annotations

import pytest

from conftest import finish_jobs, new_app
from core import projects
from core.metrics import threshold_at_fpr
from core.projects.working_point import _normal_scores
from dashboard.components.models import loaded_detector


@pytest.mark.parametrize("how", ["target_fpr", "threshold"])
def test_refit_from_review_carries_the_working_point(fitted, how):
    workspace, project, model = fitted
    detector = loaded_detector(workspace, model)
    if how == "target_fpr":
        before = projects.set_working_point(workspace, model, detector, target_fpr=0.2)
        target = 0.2
    else:
        normal = projects.working_point(workspace, model, detector)
        scores = sorted(detector.train_scores_)
        before = projects.set_working_point(workspace, model, detector, threshold=float(scores[-3]))
        target = before.fpr
        assert before.source == "threshold" and normal.threshold != before.threshold

    # Review: confirm a test image as normal, then "Add 1 confirmed normals ... and refit".
    at = new_app(project.id, page="views/review.py")
    at.toggle(key="review-all").set_value(True).run()
    (verdict,) = [radio for radio in at.radio if (radio.key or "").startswith("verdict-")]
    verdict.set_value("normal").run()
    next(button for button in at.button if button.label.startswith("Add 1 confirmed normals")).click().run()
    finish_jobs(at, timeout=180)
    assert not at.exception, at.exception
    newest = max(workspace.models(project.id), key=lambda m: m.id)
    assert newest.id != model.id
    fresh = loaded_detector(workspace, newest)
    point = projects.working_point(workspace, newest, fresh)
    assert point.source == "carried" and point.carried_from == model.id
    assert point.target_fpr == pytest.approx(target)
    assert point.threshold == pytest.approx(threshold_at_fpr(_normal_scores(fresh), target))
    assert f"carried over from model #{model.id}" in point.describe()
    assert any(f"carried over from model #{model.id}" in caption.value for caption in at.caption)

