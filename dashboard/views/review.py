"""Review: go through flagged images one by one, record a verdict, feed confirmed normals back."""

import numpy as np
import streamlit as st

from core import projects
from core.datasets import LABELS
from core.detectors import METHODS, methods_with
from core.images import ImageError
from core.store import VERDICTS
from dashboard import state, tasks
from dashboard.components import heatmap as view
from dashboard.components.jobs import job_panel
from dashboard.components.models import loaded_detector, pick_model
from dashboard.components.region_editor import region_editor
from dashboard.components.sidebar import require_project, workspace_and_project

IMAGE_SIDE = 420
VERDICT_ICONS = {"normal": ":material/check_circle:", "anomalous": ":material/cancel:", "unsure": ":material/help:"}

workspace, project = workspace_and_project()
project = require_project(project)
st.title("Review")

model = pick_model(workspace, project, tuple(METHODS), key="review-model")
if model is None:
    st.info("Nothing to review yet: fit a model on the **Detect** page first.")
    st.stop()
try:
    detector = loaded_detector(workspace, model)
except Exception as error:  # noqa: BLE001
    st.error(f"Cannot load model #{model.id}: {error}")
    st.stop()
test = projects.scored_test(workspace, model)
point = projects.working_point(workspace, model, detector)  # saved with the model: the same on every page
threshold = point.threshold
annotations = workspace.annotations(project.id)

show_all = st.toggle("Show every test image, not only the flagged ones", key="review-all")
flagged = test.scores > threshold
candidates = np.arange(len(test.rows)) if show_all else np.flatnonzero(flagged)
# Most suspicious first; with labels, false alarms (labelled normal yet flagged) lead: they are what a
# reviewer most needs to check, and what feeds "add confirmed normals" below.
not_false_alarm = (test.labels[candidates] != 0) if test.labels is not None else np.zeros(len(candidates), bool)
order = candidates[np.lexsort((-test.scores[candidates], not_false_alarm))]
queue = [test.rows[i] for i in order]
reviewed = sum(row.id in annotations for row in queue)
st.caption(
    f"Working point: {point.describe()} (set on the Detect page) · {int(flagged.sum())} of {len(flagged)} test "
    "images flagged"
    f" · {reviewed} of {len(queue)} in this list reviewed"
    + (" · false alarms (labelled normal) come first" if test.labels is not None else "")
)
if not queue:
    st.success("No image is above the threshold. Lower it on the Detect page, or show every test image.")
    st.stop()

# ---------------------------------------------------------------------- position (kept per model, across restarts)
ids = [row.id for row in queue]
saved = state.review_position(model.id)
index = ids.index(saved) if saved in ids else 0


def move(step: int) -> None:
    state.set_review_position(model.id, ids[(index + step) % len(ids)])


navigation = st.columns([1, 1, 4])
navigation[0].button("Previous", icon=":material/arrow_back:", on_click=move, args=(-1,), width="stretch", shortcut="Left")
navigation[1].button("Next", icon=":material/arrow_forward:", on_click=move, args=(1,), width="stretch", shortcut="Right")
navigation[2].markdown(f"**{index + 1} / {len(queue)}** — arrow keys move too")

image = queue[index]
position = order[index]
if saved != image.id:  # remembered as soon as it is shown: a restart reopens on this image
    state.set_review_position(model.id, image.id)
left, right = st.columns([3, 2])
with left:
    if st.toggle("Mark where the defect is", key=state.REGION_DRAW_WIDGET,
                 help="Draw the defect's region over the image; saved as the image's mask, it marks the image "
                      "anomalous and is the ground truth Segment outlines and measures."):
        region_editor(workspace, image)
    else:
        try:
            holder = state.segmentation_covering(workspace, project.id, image.id)
            if holder is None:
                st.image(state.display_image(str(image.path), IMAGE_SIDE), width=IMAGE_SIDE)
            else:
                view.default_view(holder, image)
        except (ImageError, OSError) as error:
            st.error(f"{image.name}: {getattr(error, 'reason', error)}")
with right:
    st.markdown(f"**{image.name}**")
    facts = st.columns(2)
    facts[0].metric("Score", f"{test.scores[position]:.4g}", delta=f"{test.scores[position] - threshold:+.3g} vs threshold",
                    delta_color="inverse")
    facts[1].metric("Label", LABELS.get(image.label, "unknown"))
    if image.group:
        st.caption(f"group: {image.group}")
    current = annotations.get(image.id)

    def save_verdict() -> None:
        verdict, note = state.review_inputs(image.id)
        if verdict is None:
            workspace.clear_annotation(image.id)
        else:
            workspace.annotate(image.id, verdict, note)

    st.radio("Verdict", VERDICTS, format_func=lambda verdict: f"{VERDICT_ICONS.get(verdict, '')} {verdict}", key=state.VERDICT_WIDGET.format(image_id=image.id), horizontal=True,
             index=VERDICTS.index(current.verdict) if current else None, on_change=save_verdict)
    st.text_area("Note", value=current.note if current else "", key=state.NOTE_WIDGET.format(image_id=image.id), on_change=save_verdict,
                 placeholder="What did you see? (saved when you click outside the box)", height=100)
    if current:
        st.caption(":material/check: saved")

# ---------------------------------------------------------------------- feed back and export
st.divider()
# Confirmed normals not yet in the normal set: once a refit took them in, the button has nothing left to do.
in_normal_set = {row.sha for row in workspace.images(project.id, "normal")}
confirmed = [row.id for row in test.rows
             if row.id in annotations and annotations[row.id].verdict == "normal" and row.sha not in in_normal_set]
columns = st.columns([2, 1, 1])
with columns[0]:
    refit_possible = model.method in methods_with(adaptation=False)
    if st.button(f"Add {len(confirmed)} confirmed normals to the normal set and refit", type="primary",
                 disabled=not confirmed or not refit_possible or state.job_running(state.FIT, project.id),
                 help=None if refit_possible else "PANDA models are retrained on the Adapt page."):
        added = workspace.add_to_normal_set(confirmed)
        settings = projects.stored_settings(model.method, model.settings)  # same method and settings, more normals
        state.start_job(state.FIT, f"Refitting {model.method} with {len(added)} more normals",
                        lambda job: tasks.refit(workspace, project.id, model, settings, point, job), project.id,
                        topic=state.REVIEW)
        state.flash("info", f"{len(added)} images added to the normal set; a new model is being fitted. Your working "
                    "point comes with it" + ("" if point.source == "fit" else
                                             f" (a {point.target_fpr if point.target_fpr is not None else point.fpr:.1%} "
                                             "target FPR, re-placed on the new model's scores)") + ".")
        st.rerun()
    # When the refit ends the page reruns on the new model (the project's current one) and says so here.
    job_panel(state.job(state.FIT, project.id), key="review-fit", topics=(state.REVIEW,))
columns[1].download_button("Annotations (CSV)", workspace.export_annotations_csv(project.id),
                           file_name=f"{project.name}-annotations.csv", mime="text/csv", width="stretch")
columns[2].download_button("Annotations (JSON)", workspace.export_annotations_json(project.id),
                           file_name=f"{project.name}-annotations.json", mime="application/json", width="stretch")
