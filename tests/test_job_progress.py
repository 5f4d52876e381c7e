"""The one-line progress text of a background job (folder scoring): the count once, a rate from the start."""

from __future__ import annotations


def test_progress_text_says_the_count_once_with_a_rate_from_the_first_report():
    """The folder-scoring job's first report already has a rate and time left, and its line does not repeat the
    count ("32/1,000 (32/1000, 3 %)" before)."""
    import time

    from core.scoring.runs import _Rate
    from dashboard.jobs import Job

    job = Job("Scoring line 3", lambda j: time.sleep(0.3))
    rate = _Rate(job.report)
    time.sleep(0.05)
    rate(32, 1000)
    label = job.label
    assert label.startswith("Scoring line 3 — 32/1,000 · ") and "images/s · about" in label and "left" in label
    assert label.endswith("left (3%)") and label.count("32/1") == 1
    job.wait(5)
