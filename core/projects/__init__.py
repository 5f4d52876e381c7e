"""The workspace's recipes, one call each: import images, fit a model for a project, score, segment, adapt.

Every call takes a :class:`~core.store.Workspace` and ids, does the work
through ``core``, saves what it made in the store before returning, and
returns a typed result. The dashboard's pages and background jobs call these;
pages keep only their widgets and figures. (The CLI works on files, not on a
workspace: it shares the layers below, e.g. ``core.config.settings_for`` and
``core.scoring``, not these recipes.)

* :mod:`.common`: progress by stage, the typed results, saving a model;
* :mod:`.data`: images into a project (folder layouts, Fashion-MNIST, uploads);
* :mod:`.models`: fit, score, scored test images, a stored model's settings;
* :mod:`.working_point`: the threshold a model flags images above, its FPR and interval, the ROC;
* :mod:`.segmentation`: SPADE fit / tune (with marked defects too), the test maps kept beside the model, heatmaps,
  pixel thresholds, quality and the figures on the user's own marked images;
* :mod:`.regions`: regions drawn on test images -> masks; :mod:`.exchange`: the annotated set as an MVTec zip;
* :mod:`.adaptation`: PANDA training streamed into a run.
"""

from core.projects.adaptation import adapt
from core.projects.common import LAST_MODEL, FitResult, ScoredTest, StageProgress, last_model, remember_model
from core.projects.data import LAYOUTS, import_fashion_mnist, import_folder, import_upload
from core.projects.models import fit_model, score_missing, scored_test, stored_settings
from core.projects.segmentation import (
    Heatmaps, LineFigures, default_heatmap, evaluable, explain_pixel, fit_segmentation, ground_truth, heatmaps,
    keep_maps, line_figures, marked_evidence, peak_scores, pixel_threshold, restore_maps, segmentation_quality,
    tune_segmentation,
)
from core.projects.working_point import (
    CONFIDENCE, WORKING_POINT, RocSummary, WorkingPoint, carry_working_point, clopper_pearson, roc_summary,
    set_working_point, working_point,
)

__all__ = [
    "CONFIDENCE", "LAST_MODEL", "LAYOUTS", "WORKING_POINT", "FitResult", "Heatmaps", "RocSummary", "ScoredTest",
    "LineFigures", "StageProgress", "WorkingPoint", "adapt", "carry_working_point", "clopper_pearson", "default_heatmap", "evaluable", "explain_pixel", "fit_model",
    "fit_segmentation", "ground_truth", "heatmaps", "import_fashion_mnist", "import_folder", "import_upload",
    "keep_maps", "last_model", "line_figures", "marked_evidence", "peak_scores", "pixel_threshold", "remember_model", "restore_maps", "roc_summary",
    "score_missing", "scored_test", "segmentation_quality", "set_working_point", "stored_settings",
    "tune_segmentation", "working_point",
]
