"""The workspace's recipes, one call each: fit a model for a project, score, segment, adapt; its working point.

Every call takes a :class:`~core.store.Workspace` and ids, does the work
through ``core``, saves what it made in the store before returning, and
returns a typed result. The dashboard's background jobs call these; pages
keep only their widgets and figures.

* :mod:`.common`: progress by stage, the typed results, saving a model;
* :mod:`.models`: settings from the pages' choices, fit, score, scored test images;
* :mod:`.working_point`: the threshold a model flags images above, its FPR and interval, the ROC;
* :mod:`.segmentation`: SPADE fit / tune, the test maps kept beside the model, pixel thresholds, quality;
* :mod:`.adaptation`: PANDA training streamed into a run.
"""

from core.projects.adaptation import adapt
from core.projects.common import LAST_MODEL, FitResult, ScoredTest, StageProgress, last_model, remember_model
from core.projects.models import fit_model, score_missing, scored_test, settings_for, stored_settings
from core.projects.segmentation import (
    explain_pixel, fit_segmentation, ground_truth, keep_maps, pixel_threshold, restore_maps, segmentation_quality,
    tune_segmentation,
)
from core.projects.working_point import (
    CONFIDENCE, WORKING_POINT, RocSummary, WorkingPoint, clopper_pearson, roc_summary, set_working_point,
    working_point,
)

__all__ = [
    "CONFIDENCE", "LAST_MODEL", "WORKING_POINT", "FitResult", "RocSummary", "ScoredTest", "StageProgress",
    "WorkingPoint", "adapt", "clopper_pearson", "explain_pixel", "fit_model", "fit_segmentation", "ground_truth",
    "keep_maps", "last_model", "pixel_threshold", "remember_model", "restore_maps", "roc_summary", "score_missing",
    "scored_test", "segmentation_quality", "set_working_point", "settings_for", "stored_settings",
    "tune_segmentation", "working_point",
]
