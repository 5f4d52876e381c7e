"""PANDA feature adaptation (Reiss et al., CVPR 2021): training, strategies, curves, comparison.

Entry points:

* :func:`adapt` — train one strategy (``PandaSettings.strategy``: early, ses,
  ewc, oe) with ``on_epoch(EpochRecord)`` streaming the curves and
  ``cancel()`` polled between minibatches;
* :class:`core.detectors.panda.PandaDetector` — the same behind the detector
  contract (fit / score / save / load);
* :func:`compare_strategies` — DN2 vs Early / SES / EWC on one data set
  (the paper's Table 6) with both runs' curves;
* :func:`time_prefix_cache` — epoch time with and without the frozen-prefix cache.

Modules: ``network`` (frozen prefix / trainable top), ``prefix_cache``,
``objectives`` (losses), ``strategies`` and ``outlier_exposure`` (what a step
minimises), ``fisher`` (EWC's Fisher diagonal, files), ``schedule``,
``training`` (the loop), ``ses``, ``curves``, ``pipeline``, ``compare``.
"""

from core.adaptation.compare import CacheTiming, ComparisonResult, ComparisonRow, compare_strategies, time_prefix_cache
from core.adaptation.curves import EpochCallback, EpochRecord
from core.adaptation.fisher import FisherDiagonal, estimate_fisher, load_fisher, save_fisher
from core.adaptation.pipeline import AdaptationRun, PreparedData, adapt, prepare
from core.adaptation.schedule import Schedule, resolve_schedule
from core.adaptation.training import TrainingResult

__all__ = [
    "AdaptationRun",
    "CacheTiming",
    "ComparisonResult",
    "ComparisonRow",
    "EpochCallback",
    "EpochRecord",
    "FisherDiagonal",
    "PreparedData",
    "Schedule",
    "TrainingResult",
    "adapt",
    "compare_strategies",
    "estimate_fisher",
    "load_fisher",
    "prepare",
    "resolve_schedule",
    "save_fisher",
    "time_prefix_cache",
]
