"""Every ``st.session_state`` key and every ``st.cache_*`` function of the dashboard.

Why one module: two browser sessions must never see each other's state, so
what is per-session (the chosen project, running jobs, the review position)
lives in ``st.session_state`` under the keys below, and what is shared by all
sessions of the process (the workspace handle, loaded models, thumbnails) is
in ``st.cache_*`` and keyed by everything that identifies it (workspace
folder, project, model id). Seeing both lists in one place makes that easy to
check. Jobs are the one bridge: each belongs to the session that started it,
and a process-wide index by (workspace, project, kind) lets another session
on the same project see it running and stop it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import streamlit as st

from core.config import SpadeSettings
from core.store import ImportReport, Project, Workspace, WorkspaceDatabaseError, default_workspace
from dashboard.jobs import Job

if TYPE_CHECKING:
    from core.detectors import Detector
    from core.detectors.spade import Explanation, SpadeDetector

PROCESS_STARTED = time.time()

# ---------------------------------------------------------------------- session keys
WORKSPACE_PATH = "workspace_path"  # str: folder of the workspace this session uses
PROJECT_ID = "project_id"  # int | None: the project this session works on
JOBS = "jobs"  # dict[str, Job]: background work of this session, by kind (FIT or TRAIN)
FLASH = "flash"  # list[[kind, text, first shown or None]]: messages shown on the page runs of FLASH_SECONDS
UPLOAD_GENERATION = "upload_generation"  # int: bumped to empty the file uploader after an import
REVIEW_POSITION = "review_position"  # dict[model_id, image_id]: where the reviewer is, per model
LAST_IMPORT = "last_import"  # (what, ImportReport): the Data page's last import, shown once after the rerun
LIVE_RUN = "live_run"  # int: the PANDA run the Adapt page follows
OVERLAY_SEEN = "overlay_seen"  # set[run id]: finished runs the Adapt page's "Overlay runs" list already offered
SEGMENT_METRICS = "segment_metrics"  # dict[(model, stages, sigma), (pixel AUROC, PRO)]: already evaluated
MAPS_AUTO_LOADED = "maps_auto_loaded"  # set[model_id]: saved heatmaps this session already tried to load by itself
WATCHED_JOBS = "watched_jobs"  # set[str]: job panels that saw their job running (to rerun once it ends)
MODELS_SEEN = "models_seen"  # dict[picker key, model id]: the project's current model when that picker last looked
DRAWN_PICKERS = "model_picker_widgets"  # dict[picker key, widget key]: the widget each model picker was drawn with last

# Widget keys whose values a page reads or sets outside the widget (a widget's key is its session_state key).
PICKER_WIDGET = "{picker}-{newest}"  # a model picker's selectbox: a new one whenever a newer model joins the list
THRESHOLD_WIDGET = "threshold-{model_id}-{n_scores}"  # Detect's threshold slider (more scores may widen its range)
VERDICT_WIDGET = "verdict-{image_id}"  # the Review page's verdict radio for one image
NOTE_WIDGET = "note-{image_id}"  # the Review page's note box for one image
OVERLAY_RUNS_WIDGET = "compare-runs"  # the Adapt page's "Overlay runs" multiselect
WORKSPACE_FIELD_WIDGET = "workspace-folder-field"  # the sidebar's "Workspace folder" text field


def _session_default(key: str, factory: Callable[[], Any]) -> Any:
    if key not in st.session_state:
        st.session_state[key] = factory()
    return st.session_state[key]


# ---------------------------------------------------------------------- widget values
def widget_value(key: str) -> Any:
    """The value the widget ``key`` holds (None before it is drawn): what a page reads in an ``on_change``."""
    return st.session_state.get(key)


def set_widget_value(key: str, value: Any) -> None:
    """Set a widget's value before it is drawn in this run (or from a button's callback)."""
    st.session_state[key] = value


def default_widget_values(defaults: Mapping[str, Any]) -> None:
    """Give widgets their first values once per session (later runs keep what the user chose)."""
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)


def set_widget_values(values: Mapping[str, Any]) -> None:
    """Set several widgets at once (a preset button's callback)."""
    st.session_state.update(values)


def follow_store(key: str, stored: Any, shown: Any) -> str:
    """Widget ``key``, made to show ``shown`` whenever it does not hold the store's value ``stored``.

    The store is the truth: another browser, or a button, may have changed the
    value since this session drew the widget. ``shown`` is ``stored`` as the
    widget can show it (e.g. clamped to a slider's range). Returns ``key``.
    """
    if st.session_state.get(key) != stored:
        st.session_state[key] = shown
    return key


# ---------------------------------------------------------------------- workspace and project
@st.cache_resource(show_spinner=False)
def _open_workspace(folder: str) -> Workspace:
    """One handle per workspace folder per process (it only holds paths; connections are per call)."""
    workspace = Workspace(folder)
    # Runs left 'running' by a previous process can never finish; say so once, at open.
    workspace.mark_abandoned_runs(started_before=PROCESS_STARTED)
    return workspace


def workspace_path() -> str:
    return _session_default(WORKSPACE_PATH, lambda: str(default_workspace().expanduser().resolve()))


def set_workspace_path(folder: str) -> Workspace:
    """Switch this session to another workspace folder (created if missing); raises OSError (the session
    keeps its workspace when the new one's database is damaged)."""
    try:
        workspace = _open_workspace(str(Path(folder).expanduser().resolve()))
    except WorkspaceDatabaseError as error:
        raise OSError(str(error)) from error
    st.session_state[WORKSPACE_PATH] = str(workspace.root)
    st.session_state[PROJECT_ID] = None
    return workspace


def workspace() -> Workspace:
    """The session's workspace; when its database cannot be used, a message naming the file and what to do,
    and the page stops there (every page would fail on it), leaving the folder field to choose another."""
    try:
        opened = _open_workspace(workspace_path())
        opened.check(writable=False)  # damaged since it was opened (a read: never waits for a running job)
    except (WorkspaceDatabaseError, OSError) as error:
        st.error(f"This workspace cannot be opened. {error}", icon=":material/database:")
        st.stop()
    return opened


def project_id() -> int | None:
    return st.session_state.get(PROJECT_ID)


def set_project(project: Project | int | None) -> None:
    st.session_state[PROJECT_ID] = project.id if isinstance(project, Project) else project


def current_project() -> Project | None:
    chosen = project_id()
    if chosen is None:
        return None
    for project in workspace().projects():
        if project.id == chosen:
            return project
    st.session_state[PROJECT_ID] = None  # deleted meanwhile (e.g. by another session)
    return None


# ---------------------------------------------------------------------- jobs
# Job kinds. One model fit at a time per session (a laptop CPU has no spare cores), and one PANDA run.
FIT = "fit"
TRAIN = "train"
# Job topics: which pages report a job (Detect reports every fit: the demo's SPADE fit lands there).
DETECT = "detect"
SEGMENT = "segment"
REVIEW = "review"


def jobs() -> dict[str, Job]:
    return _session_default(JOBS, dict)


@st.cache_resource(show_spinner=False)
def _shared_jobs() -> dict[tuple[str, int, str], Job]:
    """The latest job of every session of this process, by (workspace folder, project, kind).

    Jobs belong to the session that started them, but their work lands in the
    shared workspace: another browser on the same project sees their progress
    and can stop them (an inspector need not find the tab that started a fit).
    """
    return {}


def _others_running(kind: str, project: int) -> Job | None:
    found = _shared_jobs().get((workspace_path(), project, kind))
    return found if found is not None and found.running and found is not jobs().get(kind) else None


def job(kind: str, project: int | None = None) -> Job | None:
    """This session's latest job of a kind (for a project, when given), else another session's running one."""
    found = jobs().get(kind)
    if found is not None and project is not None and found.project_id != project:
        found = None
    if project is not None and (found is None or not found.running):
        found = _others_running(kind, project) or found
    return found


def job_running(kind: str, project: int | None = None) -> bool:
    """Whether this session runs a job of a kind, or (given a project) another session runs one on it."""
    found = jobs().get(kind)
    if found is not None and found.running:
        return True
    return project is not None and _others_running(kind, project) is not None


@st.cache_resource(show_spinner=False)
def apply_thread_setting() -> None:
    """Use the CPU thread count ``ANOMALY_THREADS`` asks for, once per server process: set again on every
    page run it would undo a running job's own count (the collapse lesson computes with one thread).
    ValueError naming the variable when it is not a positive whole number (not cached: asked again next run)."""
    from core.threads import apply_threads

    apply_threads()


_START_LOCK = threading.Lock()
"""Sessions run their scripts in parallel threads: checking for a running job and starting one is one step."""


def start_job(kind: str, title: str, work: Callable[[Job], object], project: int, topic: str = "",
              subject: str | None = None, quiet_if_running: bool = False) -> Job | None:
    """Start ``work(job)`` in the background unless this session already runs a job of that kind, or another
    session one of that kind on ``project``.

    ``topic`` says which pages report it (see ``components.jobs.job_panel``); ``subject`` is
    what it works on (:attr:`Job.subject`). ``quiet_if_running``: when a job is already running, return None
    without a warning (for work a page starts by itself, which the running job's panel already reports).
    """
    with _START_LOCK:
        running = jobs()[kind] if job_running(kind) else _others_running(kind, project)
        if running is None:
            jobs()[kind] = _shared_jobs()[(workspace_path(), project, kind)] = Job(
                title, work, project_id=project, topic=topic, subject=subject)
            return jobs()[kind]
    if not quiet_if_running:
        elsewhere = ("was started on this project in another browser session and "
                     if running is not jobs().get(kind) else "")
        flash("warning", f"“{running.title}” {elsewhere}is still running: wait for it or stop it first.")
    return None


def any_job_running() -> bool:
    return any(j.running for j in jobs().values())


# ---------------------------------------------------------------------- one-shot messages
FLASH_SECONDS = 4.0
"""How long a flash message stays: every page run within this time of its first showing shows it again. A
component often reruns the page right after an action (the region editor does after Save): a message shown
only once then vanished before anyone could read it."""


def flash(kind: str, text: str) -> None:
    """Show ``text`` (st.success/info/warning/error by ``kind``) on the next run of any page, and on every run
    within :data:`FLASH_SECONDS` after that."""
    _session_default(FLASH, list).append([kind, text, None])


def take_flashes() -> list[tuple[str, str]]:
    """The (kind, text) messages to show on this page run; forgets those shown longer than FLASH_SECONDS ago."""
    now = time.time()
    showing = []
    for message in _session_default(FLASH, list):
        if message[2] is None:
            message[2] = now
        if now - message[2] < FLASH_SECONDS:
            showing.append(message)
    st.session_state[FLASH] = showing
    return [(kind, text) for kind, text, _ in showing]


# ---------------------------------------------------------------------- small per-session values
def upload_generation() -> int:
    return _session_default(UPLOAD_GENERATION, int)


def clear_uploads() -> None:
    st.session_state[UPLOAD_GENERATION] = upload_generation() + 1


def model_seen(picker: str) -> int | None:
    return _session_default(MODELS_SEEN, dict).get(picker)


def set_model_seen(picker: str, model_id: int | None) -> None:
    _session_default(MODELS_SEEN, dict)[picker] = model_id


def picker_widget(picker: str, ids: Sequence[int]) -> str:
    """The widget key of model picker ``picker`` over models ``ids``, recorded as the one it was drawn with last.

    A new key per newest model: when a fit adds a model, a real browser still
    sends the previous widget's choice back once, and only the widget drawn
    last may change the current model (:func:`is_drawn_picker`).
    """
    widget = PICKER_WIDGET.format(picker=picker, newest=max(ids))
    _session_default(DRAWN_PICKERS, dict)[picker] = widget
    return widget


def is_drawn_picker(picker: str, widget: str) -> bool:
    """Whether ``widget`` is the one model picker ``picker`` was drawn with last (not a stale widget's callback)."""
    return _session_default(DRAWN_PICKERS, dict).get(picker) == widget


def review_position(model_id: int) -> int | None:
    """The image id the reviewer was at for this model: this session's, else the saved one."""
    positions = _session_default(REVIEW_POSITION, dict)
    if model_id not in positions:
        project = project_id()
        saved = None
        if project is not None:  # a model not reviewed yet (a refit) opens on the image the reviewer was last at
            saved = workspace().preference(project, f"review_position/{model_id}",
                                           workspace().preference(project, "review_position/last"))
        positions[model_id] = saved
    return positions[model_id]


def set_review_position(model_id: int, image_id: int) -> None:
    _session_default(REVIEW_POSITION, dict)[model_id] = image_id
    project = project_id()
    if project is not None:
        workspace().set_preference(project, f"review_position/{model_id}", image_id)
        workspace().set_preference(project, "review_position/last", image_id)


def set_last_import(what: str, report: ImportReport) -> None:
    st.session_state[LAST_IMPORT] = (what, report)


def take_last_import() -> tuple[str, ImportReport] | None:
    return st.session_state.pop(LAST_IMPORT, None)


def live_run(default: int) -> int:
    return st.session_state.get(LIVE_RUN, default)


def set_live_run(run_id: int) -> None:
    st.session_state[LIVE_RUN] = run_id


# ---------------------------------------------------------------------- the Adapt page (PANDA)
PANDA_FORM = {  # PandaSettings value (core.projects.adaptation.FORM_FIELDS) -> the Adapt page widget holding it
    "strategy": "panda-strategy", "backbone": "panda-backbone", "metric": "panda-metric", "crop": "panda-crop",
    "epochs": "panda-epochs", "lr": "panda-lr", "batch_size": "panda-batch", "snapshot_every": "panda-snapshots",
    "early_rule": "panda-early-rule", "keep_rule": "panda-keep-rule", "ewc_lambda": "panda-lambda",
    "ewc_step": "panda-ewc-step",
}


def panda_form_start(values: dict[str, Any]) -> None:
    """Give the Adapt page's settings widgets their first values (once per session; the user's choices stay)."""
    for name, value in values.items():
        st.session_state.setdefault(PANDA_FORM[name], value)


def set_panda_form(values: dict[str, Any]) -> None:
    """Fill the settings widgets (from a button's callback, which runs before the widgets are drawn)."""
    st.session_state.update({PANDA_FORM[name]: value for name, value in values.items()})


def panda_form() -> dict[str, Any]:
    """The values the Adapt page's settings widgets hold now."""
    return {name: st.session_state.get(key) for name, key in PANDA_FORM.items()}


def overlay_runs_widget(ids: Sequence[int], finished: set[int]) -> str:
    """The Adapt page's "Overlay runs" widget key, its choice updated: runs that finished since this session
    last looked join it, selected (newest first); at first the three newest runs are."""
    seen = st.session_state.get(OVERLAY_SEEN)
    if OVERLAY_RUNS_WIDGET not in st.session_state:
        st.session_state[OVERLAY_RUNS_WIDGET] = list(ids[:3])
    else:
        fresh = [i for i in ids if i in finished and seen is not None and i not in seen]
        kept = [i for i in st.session_state[OVERLAY_RUNS_WIDGET] if i in ids and i not in fresh]
        st.session_state[OVERLAY_RUNS_WIDGET] = fresh + kept
    st.session_state[OVERLAY_SEEN] = finished
    return OVERLAY_RUNS_WIDGET


def segment_metrics() -> dict[tuple[int, tuple[str, ...], float], tuple[float, float]]:
    return _session_default(SEGMENT_METRICS, dict)


def mark_job_watched(key: str, watched: bool) -> bool:
    """Record whether a job panel saw its job running; returns whether it had before this call."""
    seen = _session_default(WATCHED_JOBS, set)
    before = key in seen
    (seen.add if watched else seen.discard)(key)
    return before


def review_inputs(image_id: int) -> tuple[str | None, str]:
    """The verdict and note the reviewer has entered for an image (read inside their on_change callback)."""
    return (st.session_state.get(VERDICT_WIDGET.format(image_id=image_id)),
            st.session_state.get(NOTE_WIDGET.format(image_id=image_id), ""))


# ---------------------------------------------------------------------- shared caches
@st.cache_data(show_spinner=False, max_entries=4000)
def thumbnail(path: str, side: int = 160) -> np.ndarray:
    """A decoded, shrunk copy of a workspace image; keyed by its content-addressed path, so never stale."""
    from core.images import decode_image, to_display

    return to_display(decode_image(path), side)


@st.cache_data(show_spinner=False, max_entries=256)
def display_image(path: str, side: int) -> np.ndarray:
    """A workspace image squashed to ``side`` x ``side``: every view shows images at one size."""
    import cv2

    from core.images import decode_image

    return cv2.resize(decode_image(path), (side, side), interpolation=cv2.INTER_AREA)


@st.cache_data(show_spinner=False, max_entries=512)
def model_view(path: str, resize: int, crop: int, pad: bool, side: int, is_mask: bool = False) -> np.ndarray:
    """The part of a workspace image (or mask) a model saw, ``side`` pixels square; decoded once."""
    from core.images import ImageSize, as_model_sees, decode_image, decode_mask, mask_as_model_sees

    size = ImageSize(resize, crop, pad)
    if is_mask:
        return mask_as_model_sees(decode_mask(path), size, side)
    return as_model_sees(decode_image(path), size, side)


@st.cache_resource(show_spinner=False, max_entries=8)
def detector(workspace_folder: str, model_id: int, model_file: str) -> Detector:
    """A saved model loaded once per process. ``model_file`` is part of the key so a replaced file reloads."""
    from core.detectors import load_detector

    return load_detector(model_file)


@dataclass
class SegmentationCache:
    """A fitted SPADE detector holding the raw maps of a project's test images (``image_ids``, in order).

    ``ready`` turns True once the maps are computed; until then the page
    offers to compute them (one backbone pass) instead of blocking.
    """

    detector: SpadeDetector | None = None
    image_ids: list[int] | None = None
    ready: bool = False
    # Fitted in this process: the detector still holds its normal pixels, so an exact nearest-normal
    # search costs no backbone pass (a model loaded from its file would re-read normal images).
    fitted_here: bool = False
    # (image index, stages, y, x, exact) -> Explanation: a σ or opacity move that keeps the peak costs nothing.
    explanations: dict[tuple[int, tuple[str, ...], int, int, bool], Explanation] = field(default_factory=dict)
    default_peaks: np.ndarray | None = None  # (N,) peak of each image's default heatmap: the page's stable ordering


@st.cache_resource(show_spinner=False, max_entries=4)
def segmentation(workspace_folder: str, project: int, model_id: int) -> SegmentationCache:
    """Keyed by workspace + project + model, shared by every slider move (and every session on that model).

    Only an empty holder is created here; a background job fills it, so the
    page never blocks on a cache miss.
    """
    return SegmentationCache()


def segmentation_covering(workspace_: Workspace, project: int, image_id: int) -> SegmentationCache | None:
    """A SPADE model of this project whose heatmaps are in memory and cover the image, else None."""
    from core.detectors import methods_with

    for model in workspace_.models(project):
        if model.method in methods_with(segmentation=True):
            holder = segmentation(str(workspace_.root), project, model.id)
            if holder.ready and image_id in holder.image_ids:
                return holder
    return None


def segmentation_ready(workspace_folder: str, project: int, model_id: int, detector: SpadeDetector,
                       image_ids: list[int], fitted_here: bool = False) -> None:
    """Called by the fitting/computing job (in its thread) when a detector's maps are ready."""
    holder = segmentation(workspace_folder, project, model_id)
    holder.detector, holder.image_ids, holder.default_peaks = detector, list(image_ids), None
    holder.fitted_here, holder.explanations = fitted_here, {}
    holder.ready = True  # last: a page reading the holder meanwhile sees it whole or not at all


@st.cache_data(show_spinner=False, ttl=300)
def backbone_offline(name: str) -> bool:
    """Whether a backbone's weights are on this machine (checked at most every 5 minutes)."""
    from core.backbones import get_spec, locate_weights

    try:
        return locate_weights(get_spec(name)) is not None
    except Exception:  # noqa: BLE001 - a broken weights package just means "not available"
        return False


def start_segmentation_fit(workspace_: Workspace, project: int, backbone: str, settings: SpadeSettings | None = None,
                           tune: bool = False, with_marked: bool = False) -> Job | None:
    """Fit SPADE in the background; its heatmaps land in :func:`segmentation` the moment they exist.

    One backbone pass over the normal and the test images gives both the
    image scores and the raw maps every slider recombines. ``settings`` (None =
    the defaults for ``backbone``) are used as given, or with ``tune`` only as
    the base the tuner starts from: it chooses input size, aspect handling,
    stages, σ and the image score from the normal images first; ``with_marked``: the project's marked test
    images join its evidence (``core.projects.tune_segmentation``).
    """
    from core.config import settings_for
    from dashboard import tasks

    folder = str(workspace_.root)
    settings = settings if settings is not None else settings_for(SpadeSettings, backbone=backbone)

    def on_ready(model_id: int, found: SpadeDetector, ids: list[int]) -> None:
        segmentation_ready(folder, project, model_id, found, ids, True)  # fitted here: its normal pixels are in memory

    if tune:
        evidence = "synthetic defects and your marked images" if with_marked else "synthetic defects in normal images"
        return start_job(
            FIT, f"Tuning SPADE ({backbone}) on {evidence}, then fitting",
            lambda job: tasks.tune_segmentation(workspace_, project, settings, job, on_ready=on_ready,
                                                with_marked=with_marked),
            project, topic=SEGMENT,
        )
    return start_job(
        FIT, f"Fitting SPADE ({backbone}): image scores and heatmaps",
        lambda job: tasks.fit_segmentation(workspace_, project, settings, job, on_ready=on_ready),
        project, topic=SEGMENT,
    )


def first_auto_load(model_id: int) -> bool:
    """True the first time this session asks for a model: the Segment page loads saved maps unasked only once
    (if that fails, its button stays the way to retry)."""
    tried = _session_default(MAPS_AUTO_LOADED, set)
    if model_id in tried:
        return False
    tried.add(model_id)
    return True


def start_heatmaps(workspace_: Workspace, project: int, model_id: int, automatic: bool = False) -> Job | None:
    """Bring a saved SPADE model's test maps back (after a restart): from its maps file, else one backbone pass.
    ``automatic``: the page asked by itself; if another session is already loading, no warning (its panel shows
    that job)."""
    from dashboard import tasks

    def work(job: Job) -> None:
        found, image_ids = tasks.restore_maps(workspace_, project, model_id, job)
        segmentation_ready(str(workspace_.root), project, model_id, found, image_ids)

    saved = workspace_.model(model_id).maps_path.exists()
    return start_job(FIT, "Loading saved heatmaps" if saved else "Computing heatmaps", work, project, topic=SEGMENT,
                     quiet_if_running=automatic)


# ====================================================================== issue 23: regions drawn on images
# (one block, kept apart so that it merges cleanly with other branches' keys)
REGION_DRAW_WIDGET = "region-draw"  # Review's toggle: draw the defect's region instead of the heatmap
REGION_DRAW_SEGMENT_WIDGET = "region-draw-segment"  # Segment's toggle: the same editor under the pictures
REGION_TOOL_WIDGET = "region-tool"  # the drawing tool (brush, rectangle, polygon), kept across images
REGION_WIDTH_WIDGET = "region-width"  # the brush's width in screen pixels
REGION_CANVAS_WIDGET = "region-{image_id}-{version}"  # one image's drawing canvas; a new one after each save
LINE_FIGURES = "line_figures"  # dict[(model, stages, sigma, marked images), LineFigures]: Segment's own-line figures


def line_figures() -> dict[tuple[Any, ...], Any]:
    """Segment's figures on the user's marked images, by what they rest on (kept for the session)."""
    return _session_default(LINE_FIGURES, dict)


def region_canvas_widget(image_id: int, version: float) -> str:
    """The canvas of one image's drawing; ``version`` (the saved drawing's time) remounts it on what was saved."""
    return REGION_CANVAS_WIDGET.format(image_id=image_id, version=f"{version:.6f}")


@st.cache_data(show_spinner=False, max_entries=64)
def region_background(path: str, width: int, height: int) -> np.ndarray:
    """A workspace image resized to the drawing canvas (``width`` x ``height``, its aspect kept by the caller)."""
    import cv2

    from core.images import decode_image

    image = decode_image(path)
    shrink = width < image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_NEAREST)
