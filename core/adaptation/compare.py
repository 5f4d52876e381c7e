"""DN2 vs PANDA-Early / SES / EWC on the same data, like the paper's Table 6, plus the cache timing.

:func:`compare_strategies` builds the prefix caches once and trains twice:

1. an unregularised (compactness-only) run, long enough for SES's span and
   beyond if asked: its epoch 0 is DN2, its ``early_epoch`` is PANDA-Early,
   its snapshots are PANDA-SES, its last epoch shows what long training
   without regularisation does (the collapse of Fig. 3);
2. an EWC run on the same caches.

Rows "DN2 + epoch N (fused)" and "DN2 + PANDA-EWC (fused)" score with the
pretrained network and that epoch's together (:mod:`core.adaptation.fusion`),
as a fused model does.

:func:`time_prefix_cache` trains the same epoch twice from the same weights
and seed, once from the cached prefix and once through the whole network,
and reports both times and how far the results differ.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from core.adaptation.curves import EpochRecord, curves_to_list
from core.adaptation.fisher import FisherDiagonal
from core.adaptation.fusion import ScoreFusion
from core.adaptation.network import TrainableNetwork, resolve_trainable
from core.adaptation.pipeline import PreparedData, adapt, optimiser_for, prepare, with_strategy
from core.adaptation.signals import KeptChoice, keep_choice
from core.adaptation.prefix_cache import build_image_inputs, build_prefix_cache, peak_memory_bytes
from core.adaptation.schedule import Schedule, resolve_schedule, snapshot_epochs, snapshot_interval
from core.adaptation.ses import SesScorer
from core.adaptation.stopping import BestSignal
from core.adaptation.strategies import CompactnessObjective
from core.adaptation.training import train
from core.config import PandaSettings
from core.datasets import ImageSet
from core.features import extractor_for, image_size_for
from core.knn import KnnIndex
from core.metrics import image_auroc
from core.progress import CancelFn, ProgressFn

RunCallback = Callable[[str, EpochRecord], None]
"""Called with (run name, record): run names are "unregularised" and "ewc"."""


@dataclass(frozen=True)
class ComparisonRow:
    """One line of the table: test ROC AUC of a method and where along training it was read."""

    method: str
    auroc: float | None
    epoch: int | None
    minibatches: int | None
    note: str = ""


@dataclass
class ComparisonResult:
    """Table rows, the curves of both runs, SES details and timings."""

    rows: list[ComparisonRow]
    curves: dict[str, list[EpochRecord]]
    ses_snapshot_epochs: list[int]
    ses_choice_counts: list[int]
    timing: dict[str, Any] = field(default_factory=dict)

    def auroc(self, method: str) -> float | None:
        for row in self.rows:
            if row.method == method:
                return row.auroc
        raise KeyError(method)

    def table(self) -> str:
        """Plain-text table: method, ROC AUC %, epoch, minibatches, note."""
        lines = [f"{'method':<28}{'ROC AUC %':>10}{'epoch':>8}{'minibatches':>13}  note"]
        for row in self.rows:
            auc = "-" if row.auroc is None else f"{100 * row.auroc:.1f}"
            epoch = "-" if row.epoch is None else str(row.epoch)
            mb = "-" if row.minibatches is None else str(row.minibatches)
            lines.append(f"{row.method:<28}{auc:>10}{epoch:>8}{mb:>13}  {row.note}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "curves": {name: curves_to_list(records) for name, records in self.curves.items()},
            "ses_snapshot_epochs": self.ses_snapshot_epochs,
            "ses_choice_counts": self.ses_choice_counts,
            "timing": self.timing,
        }


def _record(records: list[EpochRecord], epoch: int) -> EpochRecord | None:
    return records[epoch] if 0 <= epoch < len(records) else None


COMPARE_STRATEGIES = ("early", "auto", "ses", "ewc")
"""What :func:`compare_strategies` can run beside DN2 and the long run; "auto" = Early at the signal's epoch."""


def compare_strategies(
    train_set: ImageSet,
    test_set: ImageSet,
    settings: PandaSettings = PandaSettings(),
    epochs: int | None = None,
    early_epoch: int | None = None,
    ewc_epochs: int | None = None,
    strategies: tuple[str, ...] = COMPARE_STRATEGIES,
    fisher: FisherDiagonal | None = None,
    fisher_reference: ImageSet | None = None,
    prepared: PreparedData | None = None,
    ewc_curves: bool = True,
    on_epoch: RunCallback | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> ComparisonResult:
    """Train and score DN2 / Early / SES / EWC on ``train_set`` (normal) and labelled ``test_set``.

    ``epochs``: length of the unregularised run (default: the longer of the
    Early and SES schedules; longer values show collapse). ``early_epoch``:
    where Early stops (default: the paper's 2.3k minibatches, scaled).
    SES uses the snapshots within its own span (150k samples, scaled) or
    ``epochs``, whichever is shorter. ``ewc_epochs``: length of the EWC run
    (default: the paper's 7.8k minibatches, scaled); ``ewc_curves=False``
    evaluates it only at its ends (cheaper; no EWC curve). ``settings`` gives the
    backbone, optimiser and the other knobs; its ``strategy`` is ignored.

    With "auto" in ``strategies`` or ``settings.keep_rule == "signal"`` the runs
    train on all but ``settings.stop_holdout`` of the normal images (the
    held-out ones still join every kNN gallery, DN2's included) and every
    epoch gets the normal-only signal (:mod:`core.adaptation.signals`). Then
    "PANDA-Early (auto)" is the long run's best-signal epoch (epoch 0 included),
    SES and EWC each fall back, when the signal says adaptation did not help,
    to the pretrained network fused with what they trained (the paper's rows,
    without that fallback, are kept as "... (paper)").

    "Automatic choice" is what a user who reads no test label gets from
    ``settings.strategy`` and ``settings.keep_rule``: that strategy's row as
    kept (with "fuse": its fused row). No choice reads the test labels.
    """
    if not test_set.has_labels or len(np.unique(test_set.labels)) < 2:
        raise ValueError("compare_strategies needs a test set with normal and anomalous labels")
    signal = "auto" in strategies or settings.keep_rule == "signal"
    prepared = prepared or prepare(train_set, settings, test_set, None, None, cancel,
                                   holdout=settings.stop_holdout if signal else 0.0)
    signal = signal and prepared.holdout is not None
    fallback = signal and settings.keep_rule == "signal"  # SES and EWC may then give back DN2
    n = len(prepared.normal)
    early_schedule = resolve_schedule(settings, n, "early")
    ses_schedule = resolve_schedule(settings, n, "ses")
    early_at = early_epoch or early_schedule.epochs
    long_epochs = epochs or max(early_at, ses_schedule.epochs)
    early_at = min(early_at, long_epochs)
    ses_span = min(ses_schedule.epochs, long_epochs)
    ses_epochs = snapshot_epochs(ses_span, snapshot_interval(settings, n))
    labels = prepared.test_labels
    timing: dict[str, Any] = {"prepare_seconds": prepared.seconds, "cache": None}

    def relay(name: str):
        return None if on_epoch is None else (lambda record: on_epoch(name, record))

    plain = with_strategy(settings, "ses")
    unregularised = adapt(
        None, plain, prepared=prepared,
        schedule=Schedule(long_epochs, early_schedule.batches_per_epoch, ses_epochs if "ses" in strategies else ()),
        early_epoch=early_at if "early" in strategies else None, keep_epoch_zero=True,
        on_epoch=relay("unregularised"), progress=progress, cancel=cancel,
        stop_rule=BestSignal(settings.stop_fraction) if signal else None,
    )
    records = unregularised.result.records
    timing["cache"] = unregularised.result.cache
    timing["unregularised_epoch_seconds"] = unregularised.result.mean_epoch_seconds
    dn2 = records[0]
    rows = [ComparisonRow("DN2", dn2.auroc, 0, 0, "pretrained features")]
    snapshots = unregularised.result.snapshots
    both = _Fused(snapshots[0], settings, labels) if 0 in snapshots else None
    fused_rows: dict[int, ComparisonRow] = {}  # DN2 + an epoch of the unregularised run, by epoch
    if both is not None:
        for epoch in sorted({early_at} | set(ses_epochs[-1:])):
            if epoch in snapshots:
                fused_rows[epoch] = both.row(f"DN2 + epoch {epoch} (fused)", snapshots[epoch], records[epoch])
    by_strategy: dict[str, ComparisonRow] = {}
    if "early" in strategies and _record(records, early_at) is not None:
        r = records[early_at]
        by_strategy["early"] = ComparisonRow("PANDA-Early", r.auroc, r.epoch, r.minibatches)
        rows.append(by_strategy["early"])
    if "auto" in strategies and signal:
        by_strategy["auto"] = _auto_row(unregularised.result, settings)
        rows.append(by_strategy["auto"])
    choice_counts: list[int] = []
    kept = [e for e in ses_epochs if e in snapshots]
    if "ses" in strategies and kept:
        snaps = [snapshots[e] for e in kept]
        scorer = SesScorer(settings.k, settings.ses_holdout, settings.seed, settings.metric).fit([s.train_features for s in snaps])
        found = scorer.score([s.test_features for s in snaps])
        choice_counts = np.bincount(found.choice, minlength=len(kept)).tolist()
        last = records[kept[-1]]
        ses_auroc = image_auroc(labels, found.scores)
        row = ComparisonRow("PANDA-SES", ses_auroc, last.epoch, last.minibatches, f"max over {len(kept)} snapshots")
        ses_rows = _with_fallback(row, unregularised.kept if fallback else None, fused_rows.get(kept[-1]))
        rows.extend(ses_rows)
        by_strategy["ses"] = ses_rows[0]
    last = records[-1]
    rows.append(ComparisonRow("Unregularised (last epoch)", last.auroc, last.epoch, last.minibatches,
                              "compactness only, no stopping"))
    aurocs = [(r.auroc, r.epoch) for r in records if r.auroc is not None]
    if aurocs:
        best, best_epoch = max(aurocs)
        rows.append(ComparisonRow("Unregularised (best epoch)", best, best_epoch, records[best_epoch].minibatches,
                                  "oracle: picked with test labels"))
    rows.extend(fused_rows.values())
    curves = {"unregularised": records}
    if "ewc" in strategies and not unregularised.result.cancelled:
        ewc_settings = with_strategy(settings, "ewc")
        ewc_len = ewc_epochs or resolve_schedule(settings, n, "ewc").epochs
        ewc = adapt(
            None, ewc_settings, prepared=prepared, fisher=fisher, fisher_reference=fisher_reference,
            schedule=Schedule(ewc_len, early_schedule.batches_per_epoch), on_epoch=relay("ewc"),
            evaluate=ewc_curves, progress=progress, cancel=cancel,
        )
        r = ewc.result.records[-1]  # the last epoch is always evaluated
        note = f"lambda={settings.ewc_lambda:g}, Fisher: {ewc.fisher.source}" if ewc.fisher else ""
        row = ComparisonRow("PANDA-EWC", r.auroc, r.epoch, r.minibatches, note)
        ewc_last = ewc.result.snapshots.get(r.epoch)
        ewc_fused = None if both is None or ewc_last is None else both.row("DN2 + PANDA-EWC (fused)", ewc_last, r)
        ewc_rows = _with_fallback(row, ewc.kept if fallback else None, ewc_fused)
        rows.extend(ewc_rows)
        by_strategy["ewc"] = ewc_rows[0]
        if ewc_fused is not None:
            rows.append(ewc_fused)
            by_strategy["ewc-fused"] = ewc_fused
        timing["fisher"] = None if ewc.fisher is None else {"source": ewc.fisher.source, **ewc.fisher.statistics()}
        curves["ewc"] = ewc.result.records
        timing["ewc_epoch_seconds"] = ewc.result.mean_epoch_seconds
    automatic = _automatic_row(settings, by_strategy, fused_rows, early_at, ses_epochs)
    if automatic is not None:
        rows.append(automatic)
    timing["peak_memory_bytes"] = peak_memory_bytes(prepared.extractor.device)
    return ComparisonResult(rows, curves, kept, choice_counts, timing)


class _Fused:
    """The pretrained network's (epoch 0's) kNN scores, fused with another epoch's for a table row."""

    def __init__(self, zero, settings: PandaSettings, labels: np.ndarray) -> None:
        self.settings, self.labels = settings, labels
        index = KnnIndex(settings.k, metric=settings.metric).fit(zero.train_features)
        self.normal, self.test = index.train_scores(), index.score(zero.test_features)

    def row(self, method: str, snapshot, record: EpochRecord) -> ComparisonRow:
        """``method``'s row: the pretrained and ``snapshot``'s kNN scores fused as a fused model scores."""
        index = KnnIndex(self.settings.k, metric=self.settings.metric).fit(snapshot.train_features)
        fusion = ScoreFusion.of_normal(self.normal, index.train_scores())
        auroc = image_auroc(self.labels, fusion.fuse(self.test, index.score(snapshot.test_features)))
        return ComparisonRow(method, auroc, record.epoch, record.minibatches,
                             f"both networks' standardised kNN scores, epoch {record.epoch}'s weight "
                             f"{fusion.adapted_weight:g}")


def _auto_row(result, settings: PandaSettings) -> ComparisonRow:
    """Early (auto): the long run's best-signal epoch, kept only if it beats epoch 0 by the margin."""
    records = result.records
    best = result.auto_stop_epoch if result.auto_stop_epoch is not None else 0
    signals = result.signals()
    margin = settings.keep_margin if settings.keep_rule == "signal" else float("-inf")
    choice = keep_choice(signals.get(0), signals.get(best), best, f"epoch {best}", margin)
    r = records[choice.epoch]
    return ComparisonRow("PANDA-Early (auto)", r.auroc, r.epoch, r.minibatches, choice.reason)


def _with_fallback(row: ComparisonRow, kept: KeptChoice | None, fused: ComparisonRow | None) -> list[ComparisonRow]:
    """The strategy's row; with a signal choice, the row as kept and the paper's row (the row as kept first).

    When the signal gives back the pretrained network, the model is DN2 fused
    with what the strategy trained (``fused``; :func:`core.adaptation.pipeline.fused_model`).
    """
    if kept is None:
        return [row]
    if kept.pretrained and fused is not None:
        chosen = dataclasses.replace(row, auroc=fused.auroc, epoch=kept.adapted_epoch,
                                     note=f"{kept.reason}; fused with epoch {kept.adapted_epoch}")
    else:
        chosen = dataclasses.replace(row, epoch=kept.epoch, note=kept.reason)
    paper = dataclasses.replace(row, method=f"{row.method} (paper)", note=f"{row.note}; no fallback".lstrip("; "))
    return [chosen, paper]


def _automatic_row(settings: PandaSettings, by_strategy: dict[str, ComparisonRow],
                   fused_rows: dict[int, ComparisonRow], early_at: int, ses_epochs: tuple[int, ...]) -> ComparisonRow | None:
    """What the settings' strategy and keep rule give a user who reads no test label (None if it was not run)."""
    strategy = "auto" if settings.strategy == "early" and settings.early_rule == "auto" else settings.strategy
    if settings.keep_rule == "last":  # the paper's rule chooses nothing
        return None
    if settings.keep_rule == "fuse":
        epoch = {"early": early_at, "ses": ses_epochs[-1] if ses_epochs else None}.get(strategy)
        row = by_strategy.get("ewc-fused") if strategy == "ewc" else fused_rows.get(epoch)
    else:
        row = by_strategy.get(strategy)
    if row is None:
        return None
    return dataclasses.replace(row, method="Automatic choice",
                               note=f"{row.method} ({settings.strategy}, keep_rule={settings.keep_rule})")


@dataclass(frozen=True)
class CacheTiming:
    """Epochs trained naively (whole network) and from the prefix cache, same weights and seed.

    Epoch times are the fastest of ``rounds`` alternating repetitions (the
    least disturbed by other work on the machine); ``ratio`` = cached / naive.
    """

    naive_epoch_seconds: float
    cached_epoch_seconds: float
    ratio: float
    rounds: int
    cache_build_seconds: float
    cache_bytes: int
    cache_dtype: str
    image_inputs_bytes: int
    max_weight_difference: float
    peak_memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def time_prefix_cache(
    normal: ImageSet,
    settings: PandaSettings = PandaSettings(),
    epochs: int = 1,
    rounds: int = 1,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> CacheTiming:
    """Train ``epochs`` epochs both ways (compactness loss), ``rounds`` times alternating; compare time and weights.

    The naive side keeps the decoded images in memory, so the ratio measures
    the network work only (decoding would make the naive side slower still).
    """
    extractor = extractor_for(settings.features)
    size = image_size_for(settings.features)
    trainable = resolve_trainable(extractor.spec.default_trainable, settings.trainable)
    network = TrainableNetwork(extractor.copy_network(), trainable)
    started = time.perf_counter()
    cache = build_prefix_cache(network, normal, size, settings.features.batch_size, settings.cache_dtype,
                               settings.cache_budget_mb, progress, cancel)
    cache_seconds = time.perf_counter() - started
    images = build_image_inputs(network, normal, size, settings.features.batch_size, settings.cache_budget_mb,
                                progress, cancel)
    per_epoch = math.ceil(len(normal) / settings.batch_size)
    optimiser = optimiser_for(settings, "early", extractor.device)
    times: dict[str, list[float]] = {"naive": [], "cached": []}
    states = {}
    for round_index in range(rounds):
        order = (("naive", images), ("cached", cache))
        for name, inputs in order if round_index % 2 == 0 else order[::-1]:
            run_network = TrainableNetwork(extractor.copy_network(), trainable)
            result = train(run_network, inputs, CompactnessObjective(), Schedule(epochs, per_epoch), optimiser,
                           evaluate=False, cancel=cancel)
            times[name].append(result.mean_epoch_seconds)
            states.setdefault(name, result.final_state)
    naive, cached = states["naive"], states["cached"]
    difference = max(float((naive[k] - cached[k]).abs().max()) for k in naive)
    naive_s, cached_s = min(times["naive"]), min(times["cached"])
    return CacheTiming(
        naive_epoch_seconds=naive_s,
        cached_epoch_seconds=cached_s,
        ratio=cached_s / naive_s,
        rounds=rounds,
        cache_build_seconds=cache_seconds,
        cache_bytes=cache.nbytes,
        cache_dtype=str(cache.dtype).replace("torch.", ""),
        image_inputs_bytes=images.nbytes,
        max_weight_difference=difference,
        peak_memory_bytes=peak_memory_bytes(network.device),
    )
