"""From image sets and settings to a trained network: the entry point the CLI, detector and dashboard call.

:func:`prepare` builds the private network copy and the training inputs
(prefix caches of the normal, test and outlier sets) once; :func:`adapt` runs
one strategy on them. Several runs can share one :class:`PreparedData`
(:mod:`core.adaptation.compare` does): each gets a fresh copy of the
pretrained network, while the cached prefix outputs, which depend only on the
frozen pieces, are reused.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from core.adaptation.curves import EpochCallback
from core.adaptation.fisher import FisherDiagonal, estimate_fisher, load_fisher
from core.adaptation.network import TrainableNetwork, resolve_trainable
from core.adaptation.objectives import EwcPenalty
from core.adaptation.outlier_exposure import OutlierExposureObjective
from core.adaptation.prefix_cache import TrainingInputs, build_inputs
from core.adaptation.schedule import Schedule, resolve_schedule
from core.adaptation.strategies import CompactnessObjective, Objective
from core.adaptation.training import OptimiserSettings, TrainingResult, train
from core.backbones import FeatureExtractor
from core.config import PandaSettings
from core.datasets import ImageSet
from core.features import extractor_for, image_size_for
from core.images import ImageSize
from core.progress import CancelFn, ProgressFn


@dataclass
class PreparedData:
    """A pretrained extractor, the trainable split, and training inputs built once.

    ``normal``/``test``/``outliers`` are prefix caches (or images when
    ``settings.prefix_cache`` is False); ``test_labels`` is (M,) int64 when
    the test set is labelled. ``seconds`` is the time spent building them.
    """

    extractor: FeatureExtractor
    size: ImageSize
    trainable: tuple[str, ...]
    normal: TrainingInputs
    test: TrainingInputs | None
    test_labels: np.ndarray | None
    outliers: TrainingInputs | None
    seconds: float

    def new_network(self) -> TrainableNetwork:
        """A fresh private copy of the pretrained network with the trainable pieces unfrozen."""
        return TrainableNetwork(self.extractor.copy_network(), self.trainable)


def _inputs(network: TrainableNetwork, images: ImageSet, size: ImageSize, settings: PandaSettings,
            progress: ProgressFn | None, cancel: CancelFn | None) -> TrainingInputs:
    return build_inputs(network, images, size, settings.prefix_cache, settings.features.batch_size,
                        settings.cache_dtype, settings.cache_budget_mb, progress, cancel)


def prepare(
    normal: ImageSet,
    settings: PandaSettings,
    test: ImageSet | None = None,
    outliers: ImageSet | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> PreparedData:
    """Build the inputs of a PANDA run (runs the frozen prefix once per image). Raises ``Cancelled``."""
    started = time.perf_counter()
    extractor = extractor_for(settings.features)
    size = image_size_for(settings.features)
    trainable = resolve_trainable(extractor.spec.default_trainable, settings.trainable)
    # A private copy even for the frozen prefix: wrapping the shared network would
    # change its requires_grad flags under other users.
    probe = TrainableNetwork(extractor.copy_network(), trainable)
    normal_inputs = _inputs(probe, normal, size, settings, progress, cancel)
    test_inputs = _inputs(probe, test, size, settings, progress, cancel) if test is not None and len(test) else None
    labels = test.labels if test is not None and len(test) and test.has_labels else None
    outlier_inputs = _inputs(probe, outliers, size, settings, progress, cancel) if outliers is not None and len(outliers) else None
    return PreparedData(extractor, size, trainable, normal_inputs, test_inputs, labels, outlier_inputs,
                        time.perf_counter() - started)


def optimiser_for(settings: PandaSettings, strategy: str | None = None) -> OptimiserSettings:
    """SGD settings of a strategy: OE has its own learning rate and weight decay (supplement)."""
    strategy = strategy or settings.strategy
    oe = strategy == "oe"
    return OptimiserSettings(
        lr=settings.oe_lr if oe else settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.oe_weight_decay if oe else settings.weight_decay,
        grad_clip=settings.grad_clip,
        batch_size=settings.batch_size,
        k=settings.k,
        autocast=settings.autocast,
        seed=settings.seed,
        eval_batch_size=max(settings.features.batch_size, 64),
    )


def fisher_for(
    settings: PandaSettings,
    prepared: PreparedData,
    network: TrainableNetwork,
    fisher: FisherDiagonal | None = None,
    reference: ImageSet | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> FisherDiagonal:
    """The Fisher diagonal EWC uses: given, from ``settings.fisher_file``, or estimated.

    Estimated on ``reference`` images when given (natural images, closer to the
    paper's ImageNet), else on the normal training images.
    """
    if fisher is not None:
        return fisher
    if settings.fisher_file:
        return load_fisher(settings.fisher_file)
    if reference is not None:
        inputs = _inputs(network, reference, prepared.size, settings, None, cancel)
        source = f"reference images ({len(reference)})"
    else:
        inputs, source = prepared.normal, f"normal training images ({len(prepared.normal)})"
    return estimate_fisher(network, inputs, max_samples=settings.fisher_batches * settings.batch_size,
                           seed=settings.seed, source=source, backbone=prepared.extractor.spec.name,
                           progress=progress, cancel=cancel)


@dataclass
class AdaptationRun:
    """One trained strategy: the network (trained in place), its schedule and the training result."""

    settings: PandaSettings
    strategy: str
    schedule: Schedule
    network: TrainableNetwork
    result: TrainingResult
    fisher: FisherDiagonal | None
    head: dict[str, np.ndarray] | None
    prepared: PreparedData


def adapt(
    normal: ImageSet | None,
    settings: PandaSettings,
    test: ImageSet | None = None,
    outliers: ImageSet | None = None,
    fisher: FisherDiagonal | None = None,
    fisher_reference: ImageSet | None = None,
    schedule: Schedule | None = None,
    early_epoch: int | None = None,
    keep_epoch_zero: bool = False,
    evaluate: bool = True,
    prepared: PreparedData | None = None,
    on_epoch: EpochCallback | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> AdaptationRun:
    """Train PANDA with ``settings.strategy`` on the normal images; the dashboard's and CLI's entry point.

    ``test`` (labelled) adds test curves and a per-epoch ROC AUC; ``outliers``
    is required for "oe". ``on_epoch(EpochRecord)`` streams the curves;
    ``cancel()`` stops between minibatches and keeps what was trained
    (``run.result.cancelled``). ``prepared`` reuses caches of an earlier run
    (then ``normal``/``test``/``outliers`` are ignored). ``schedule`` overrides
    the one derived from ``settings``; ``early_epoch`` marks (and keeps) an
    extra epoch; for "early" it defaults to the last epoch.
    """
    strategy = settings.strategy
    if prepared is None:
        if normal is None:
            raise ValueError("adapt needs the normal images or prepared data")
        prepared = prepare(normal, settings, test, outliers if strategy == "oe" else None, None, cancel)
    if strategy == "oe" and prepared.outliers is None:
        raise ValueError("strategy 'oe' needs an outlier exposure image set")
    schedule = schedule or resolve_schedule(settings, len(prepared.normal))
    if strategy == "early" and early_epoch is None:
        early_epoch = schedule.epochs
    network = prepared.new_network()
    used_fisher: FisherDiagonal | None = None
    objective: Objective
    if strategy == "ewc":
        used_fisher = fisher_for(settings, prepared, network, fisher, fisher_reference, None, cancel)
        anchor = network.suffix_state()
        penalty = EwcPenalty(used_fisher.for_network(network), anchor, settings.ewc_lambda)
        objective = CompactnessObjective(penalty, settings.ewc_step)
    elif strategy == "oe":
        dim = prepared.extractor.spec.pooled_dim
        objective = OutlierExposureObjective(prepared.outliers, dim, settings.seed)
    else:
        objective = CompactnessObjective()
    result = train(
        network, prepared.normal, objective, schedule, optimiser_for(settings),
        test_inputs=prepared.test, test_labels=prepared.test_labels, early_epoch=early_epoch,
        keep_epoch_zero=keep_epoch_zero, evaluate=evaluate, on_epoch=on_epoch, progress=progress, cancel=cancel,
    )
    head = objective.head_state() if isinstance(objective, OutlierExposureObjective) else None
    return AdaptationRun(settings, strategy, schedule, network, result, used_fisher, head, prepared)


def with_strategy(settings: PandaSettings, strategy: str) -> PandaSettings:
    """A copy of ``settings`` with another strategy."""
    return dataclasses.replace(settings, strategy=strategy)
