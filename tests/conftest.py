"""Shared fixtures: a throw-away workspace and a few small synthetic images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_BOTTLE = REPO_ROOT / "assets" / "demo" / "bottle"


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def huge_png() -> bytes:
    """A 20001-pixel-wide image: compresses to almost nothing but breaks the side limit."""
    buffer = io.BytesIO()
    Image.new("L", (20_001, 8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny 32x32 batches gain nothing from more threads, and two OpenMP threads on a busy
    two-core machine spin against each other; modules opt in with ``pytestmark``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_images(n: int, brightness: int, prefix: str, seed: int):
    """An ImageSet of ``n`` 24x24 noise images; ``brightness`` > 0 shifts them and labels them anomalous."""
    from core.datasets import ImageItem, ImageSet

    rng = np.random.default_rng(seed)
    label = 1 if brightness else 0
    return ImageSet(
        [ImageItem(name=f"{prefix}{i}", array=(rng.integers(0, 80, (24, 24, 3)) + brightness).astype(np.uint8), label=label)
         for i in range(n)]
    )


@pytest.fixture
def workspace_dir(tmp_path, monkeypatch) -> Path:
    """An empty workspace folder, also exported as ANOMALY_WORKSPACE for code that reads the default."""
    folder = tmp_path / "workspace"
    monkeypatch.setenv("ANOMALY_WORKSPACE", str(folder))
    return folder


@pytest.fixture
def noise_pngs() -> list[tuple[str, bytes]]:
    """Five distinct 32x32 RGB noise images as (name, PNG bytes)."""
    rng = np.random.default_rng(0)
    return [(f"noise_{i}.png", png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))) for i in range(5)]


# ---------------------------------------------------------------------- dashboard (AppTest) helpers
APP_FILE = str(REPO_ROOT / "dashboard" / "app.py")


@pytest.fixture
def tiny_bottle(workspace_dir):
    """A workspace with a small labelled project (8 normal, 6 test bottles with masks) from the demo assets."""
    from core.datasets import read_mvtec
    from core.store import Workspace

    workspace = Workspace(workspace_dir)
    project = workspace.create_project("tiny bottle")
    train, test = read_mvtec(DEMO_BOTTLE)
    workspace.import_images(project.id, train.subset(range(8)), "normal")
    chosen = [i for i, item in enumerate(test) if item.group == "good"][:3] + [
        i for i, item in enumerate(test) if item.group != "good"
    ][:3]
    workspace.import_images(project.id, test.subset(chosen), "test")
    return workspace, project


@pytest.fixture
def fitted(tiny_bottle):
    """The tiny bottle project with one DN2 model fitted directly (not through the page): (workspace, project, model)."""
    from core.config import DN2Settings, settings_for
    from dashboard import tasks
    from dashboard.jobs import Job

    workspace, project = tiny_bottle
    settings = settings_for(DN2Settings, backbone="efficientnet_lite0")
    job = Job("fit", lambda j: tasks.fit_and_score(workspace, project.id, "dn2", settings, j))
    assert job.wait(120) and job.status == "finished", job.error
    return workspace, project, workspace.model(job.result)


def new_app(project_id=None, page=None, timeout=120):
    """An AppTest of the whole app (a fresh browser session), optionally on a project and page."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP_FILE, default_timeout=timeout)
    if project_id is not None:
        at.session_state["project_id"] = project_id
    at.run()
    if page is not None:
        at.switch_page(page).run()
    return at


def model_picker(at, key):
    """The model picker ``key`` (detect-model, review-model, segment-model): its widget key ends in the newest model's id."""
    (box,) = [box for box in at.selectbox if (box.key or "").startswith(f"{key}-")]
    return box


def finish_jobs(at, timeout=120.0):
    """Wait for the session's background jobs, then rerun the page so it shows their results."""
    import time

    deadline = time.time() + timeout
    for job in (at.session_state["jobs"] if "jobs" in at.session_state else {}).values():
        assert job.wait(max(0.0, deadline - time.time())), f"job {job.title!r} did not finish in {timeout} s"
        assert job.status == "finished", f"{job.title}: {job.status} {job.error}"
    at.run()
    return at
