"""The dashboard's background work: the demos, and ``core.projects``'s recipes run as jobs.

Plain Python (no Streamlit), so it runs in a :class:`~dashboard.jobs.Job`
thread and tests can call it directly. The recipes (import, fit, score,
segment, adapt) are ``core.projects`` calls; here they only get the job's
progress and Stop, and return the new model's id as the job's result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core import projects
from core.config import MethodSettings, PandaSettings, SpadeSettings
from core.detectors import Detector
from core.store import ImportReport, Project, StoredModel, Workspace
from dashboard.jobs import Job

if TYPE_CHECKING:
    from core.detectors.spade import SpadeDetector

MapsReady = Callable[[int, "SpadeDetector", list[int]], None]
"""``on_ready(model_id, detector, image_ids)``: a fit's test maps handed to the Segment page's cache."""

DEMO_ROOT = Path(__file__).resolve().parents[1] / "assets" / "demo"


@dataclass(frozen=True)
class Demo:
    key: str
    project_name: str
    title: str
    description: str
    folder: Path
    layout: str  # a key of core.projects.LAYOUTS: "mvtec" or "classes"
    first_model: str  # "spade" where there are masks to segment, else "dn2"
    normal_class: str | None = None


DEMOS = {
    demo.key: demo
    for demo in (
        Demo(
            "bottle",
            "demo: MVTec bottle",
            "Bottles seen from above (MVTec AD)",
            "40 good bottles to learn from; 20 test bottles — 8 good, 12 broken or contaminated, "
            "with defect masks. Detection and segmentation.",
            DEMO_ROOT / "bottle",
            "mvtec",
            "spade",
        ),
        Demo(
            "fashion",
            "demo: Fashion-MNIST trousers",
            "Clothing thumbnails (Fashion-MNIST)",
            "100 trousers are 'normal'; 100 test images of all ten classes — anything that is not a "
            "trouser is an anomaly. One-class detection, no masks.",
            DEMO_ROOT / "fashion",
            "classes",
            "dn2",
            "Trouser",
        ),
    )
}


def import_demo(workspace: Workspace, key: str) -> tuple[Project, ImportReport]:
    """Create (or reuse) the demo's project and import its sets; importing twice adds nothing."""
    demo = DEMOS[key]
    project = workspace.get_or_create_project(demo.project_name)
    return project, projects.import_folder(workspace, project.id, demo.folder, demo.layout, demo.normal_class)


# ---------------------------------------------------------------------- core.projects, run as jobs


def job_progress(job: Job) -> projects.StageProgress:
    return lambda stage, done, total: job.report(done, total, stage)


def fit_and_score(workspace: Workspace, project_id: int, method: str, settings: MethodSettings, job: Job) -> int:
    """Fit ``method`` on the project's normal images, score its test images, save both. Returns the model id."""
    return projects.fit_model(workspace, project_id, method, settings, job_progress(job), job.cancelled).model.id


def refit(workspace: Workspace, project_id: int, model: StoredModel, settings: MethodSettings,
          point: projects.WorkingPoint, job: Job) -> int:
    """Fit ``model``'s method again (more normals), carrying the user's working point over (re-placed on the new
    model's scores); returns the new model's id."""
    result = projects.fit_model(workspace, project_id, model.method, settings, job_progress(job), job.cancelled)
    projects.carry_working_point(workspace, result.model, result.detector, point, model.id)
    return result.model.id


def score_missing(workspace: Workspace, model_id: int, detector: Detector, job: Job) -> int:
    """Score the test images added after a model was fitted; returns how many were scored."""
    return projects.score_missing(workspace, model_id, detector, job_progress(job), job.cancelled)


def train_panda(workspace: Workspace, project_id: int, settings: PandaSettings, run_id: int, job: Job) -> int:
    """Train PANDA into run ``run_id`` (a Stop keeps the weights trained so far); returns the model id."""
    return projects.adapt(workspace, project_id, settings, run_id, job_progress(job), job.cancelled).model.id


def run_lesson(workspace: Workspace, project_id: int, job: Job) -> float:
    """The collapse lesson on the project's images, kept with the project; returns its wall time in seconds."""
    from core.projects import adaptation

    return adaptation.run_lesson(workspace, project_id, job_progress(job), job.cancelled).seconds


def fit_segmentation(workspace: Workspace, project_id: int, settings: SpadeSettings, job: Job,
                     on_ready: MapsReady | None = None) -> int:
    """Fit SPADE with the test set's maps; ``on_ready(model_id, detector, image_ids)`` hands them to the page's cache."""
    result = projects.fit_segmentation(workspace, project_id, settings, job_progress(job), job.cancelled)
    if on_ready is not None:
        on_ready(result.model.id, result.detector, result.image_ids)
    return result.model.id


def tune_segmentation(workspace: Workspace, project_id: int, base: SpadeSettings, job: Job,
                      on_ready: MapsReady | None = None, with_marked: bool = False) -> int:
    """Choose SPADE's settings from the normal images (and, ``with_marked``, the project's marked test images),
    fit with them; as :func:`fit_segmentation` otherwise."""
    result = projects.tune_segmentation(workspace, project_id, base, job_progress(job), job.cancelled,
                                        with_marked=with_marked)
    if on_ready is not None:
        on_ready(result.model.id, result.detector, result.image_ids)
    return result.model.id


def restore_maps(workspace: Workspace, project_id: int, model_id: int, job: Job) -> tuple[SpadeDetector, list[int]]:
    """A saved SPADE model with its test maps (from its maps file, else one backbone pass)."""
    return projects.restore_maps(workspace, model_id, job_progress(job), job.cancelled)
