"""Folder scoring from the Detect page: a streaming background job whose rows survive a stop or a restart."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import finish_jobs, new_app
from core.scoring import read_results
from core.scoring.runs import list_runs, load_run, new_run, run_scoring

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def shift(tmp_path, monkeypatch):
    """A folder of 40 small images plus one broken file, inside the folders the app may read."""
    folder = tmp_path / "shift"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    monkeypatch.setenv("ANOMALY_FOLDER_ROOTS", str(tmp_path))
    return folder


def test_a_stopped_run_keeps_its_rows_and_resumes_without_duplicates(fitted, shift, tmp_path):
    workspace, project, model = fitted
    run = new_run(tmp_path / "runs", model.id, model.path, [str(shift)], "shift")
    seen = []

    def cancel() -> bool:  # stop once the first batch was written
        return any(done > 0 for done, _, _ in seen)

    stopped = run_scoring(run, status=lambda done, total, text: seen.append((done, total, text)), cancel=cancel)
    assert stopped.status == "stopped" and 0 < stopped.rows_written() < 41
    assert seen[0][1] == 41 and "/41" in seen[-1][2]
    finished = run_scoring(load_run(run.folder), resume=True)
    rows = read_results(finished.results)
    assert finished.status == "finished" and len(rows) == 41 and len({r["file"] for r in rows}) == 41
    assert [r for r in rows if r["error"]][0]["file"].endswith("broken.png")
    assert list_runs(tmp_path / "runs", model.id)[0].status == "finished"


def test_detect_page_scores_a_folder_in_the_background_and_offers_to_resume(fitted, shift):
    workspace, project, model = fitted
    at = new_app(project.id, page="views/detect.py")
    assert not at.exception
    at.text_input(key="score-files-folder").set_value(str(shift)).run()
    at.button(key="score-files-start").click().run()
    assert not at.exception
    finish_jobs(at)
    assert not at.exception
    (run,) = list_runs(workspace.root / "scoring", model.id)
    assert run.status == "finished" and run.rows_written() == 41
    assert any("40 scored" in caption.value for caption in at.caption)
    assert any(button.label == "Download results (CSV)" for button in at.get("download_button"))

    # A run the app was killed in the middle of: its manifest still says "running", half its rows are there.
    interrupted = new_run(workspace.root / "scoring", model.id, model.path, [str(shift)], "night shift")
    rows = read_results(run.results)
    header = run.results.read_text().splitlines()[0]
    interrupted.results.write_text("\n".join([header] + run.results.read_text().splitlines()[1:21]) + "\n")
    at = new_app(project.id, page="views/detect.py")
    assert any("interrupted" in markdown.value for markdown in at.markdown)
    resume = [button for button in at.button if button.label == "Resume"]
    assert resume
    resume[0].click().run()
    finish_jobs(at)
    done = load_run(interrupted.folder)
    assert done.status == "finished" and done.rows_written() == len(rows) == 41
    assert len({r["file"] for r in read_results(done.results)}) == 41


def test_a_run_that_failed_or_was_cut_by_the_app_exiting_is_offered_for_resume(fitted, shift, monkeypatch):
    from dataclasses import replace

    import core.scoring.runs as runs
    from core.scoring.decode_processes import SHUTTING_DOWN, DecodingShutDown

    workspace, project, model = fitted
    # The app exits mid-run: the decoding pool refuses work. The run is left "running" (= interrupted), not failed.
    def exiting(*args, **kwargs):
        raise DecodingShutDown(SHUTTING_DOWN)

    with monkeypatch.context() as patched:
        patched.setattr(runs, "score_files", exiting)
        cut = runs.run_scoring(new_run(workspace.root / "scoring", model.id, model.path, [str(shift)], "cut shift"))
    assert load_run(cut.folder).status == "running"
    # A run that failed (here: a full disk) keeps its rows and can be resumed too.
    failed = new_run(workspace.root / "scoring", model.id, model.path, [str(shift)], "failed shift")
    replace(failed, status="failed", error="OSError: [Errno 28] No space left on device").save()
    at = new_app(project.id, page="views/detect.py")
    assert any("failed after" in m.value and "No space left" in m.value for m in at.markdown)
    assert len([button for button in at.button if button.label == "Resume"]) == 2
    for folder in (failed.folder, cut.folder):
        at = new_app(project.id, page="views/detect.py")
        at.button(key=f"resume-{folder}").click().run()
        finish_jobs(at)
        assert load_run(folder).status == "finished" and load_run(folder).rows_written() == 41


def test_uploads_are_saved_once_and_scored_from_the_workspace(fitted, tmp_path):
    import io
    import zipfile

    from dashboard.components.score_files import _save_uploads

    workspace, project, model = fitted

    class Upload:  # what st.file_uploader hands over
        def __init__(self, name: str, data: bytes) -> None:
            self.name, self._data = name, data

        def getvalue(self) -> bytes:
            return self._data

    image = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image, "PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("a/b.png", image.getvalue())
    inputs = _save_uploads(workspace, [Upload("../x.png", image.getvalue()), Upload("batch.zip", archive.getvalue())])
    run = run_scoring(new_run(tmp_path / "runs", model.id, model.path, inputs, "upload"))
    rows = read_results(run.results)
    assert run.status == "finished" and len(rows) == 2 and not any(r["error"] for r in rows)
    assert all(str(workspace.root) in path for path in inputs) and any("batch.zip!a/b.png" in r["file"] for r in rows)
