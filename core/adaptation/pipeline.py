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
import torch

from core.adaptation.curves import EpochCallback
from core.adaptation.fisher import FISHER_BATCH, FisherDiagonal, FisherFileError, estimate_fisher_minibatch, load_fisher, save_fisher
from core.adaptation.fisher_pool import cache_path, natural_photos, pool_batches, pool_description
from core.adaptation.network import TrainableNetwork, resolve_trainable
from core.adaptation.objectives import EwcPenalty
from core.adaptation.outlier_exposure import OutlierExposureObjective
from core.adaptation.prefix_cache import TrainingInputs, build_inputs
from core.adaptation.probes import probe_kinds, probe_set
from core.adaptation.schedule import Schedule, resolve_schedule
from core.adaptation.ses import SesScorer
from core.adaptation.signals import PROBE_CHANGES, PROBE_POOL_CROPS, SIGNAL, KeptChoice, keep_choice, score_statistics
from core.adaptation.stopping import BestSignal
from core.adaptation.strategies import CompactnessObjective, Objective
from core.adaptation.training import OptimiserSettings, TrainingResult, train
from core.backbones import FeatureExtractor, resolve_precision
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
    the test set is labelled. ``holdout`` holds the normal images kept out of
    training for the normal-only signal (then ``normal`` has the rest), ``probe``
    the probe images made for it (:mod:`core.adaptation.probes`) and
    ``probe_kinds`` their kinds. ``seconds`` is the time spent building them.
    """

    extractor: FeatureExtractor
    size: ImageSize
    trainable: tuple[str, ...]
    normal: TrainingInputs
    test: TrainingInputs | None
    test_labels: np.ndarray | None
    outliers: TrainingInputs | None
    seconds: float
    holdout: TrainingInputs | None = None
    probe: TrainingInputs | None = None
    probe_kinds: tuple[str, ...] = ()

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
    holdout: float = 0.0,
) -> PreparedData:
    """Build the inputs of a PANDA run (runs the frozen prefix once per image). Raises ``Cancelled``.

    ``holdout`` > 0 keeps that share of the normal images (seeded) out of
    training and makes the probe images of the normal-only signal from them.
    """
    started = time.perf_counter()
    extractor = extractor_for(settings.features)
    size = image_size_for(settings.features)
    trainable = resolve_trainable(extractor.spec.default_trainable, settings.trainable)
    # A private copy even for the frozen prefix: wrapping the shared network would
    # change its requires_grad flags under other users.
    prefix_network = TrainableNetwork(extractor.copy_network(), trainable)
    held_inputs = probe_inputs = None
    kinds: tuple[str, ...] = ()
    if holdout > 0:
        normal, held = split_holdout(normal, holdout, settings.seed)
        held_inputs = _inputs(prefix_network, held, size, settings, progress, cancel)
        probes = probe_set(held, size.crop, settings.seed, PROBE_POOL_CROPS, PROBE_CHANGES)
        probe_inputs, kinds = _inputs(prefix_network, probes, size, settings, progress, cancel), probe_kinds(probes)
    normal_inputs = _inputs(prefix_network, normal, size, settings, progress, cancel)
    test_inputs = _inputs(prefix_network, test, size, settings, progress, cancel) if test is not None and len(test) else None
    labels = test.labels if test is not None and len(test) and test.has_labels else None
    outlier_inputs = _inputs(prefix_network, outliers, size, settings, progress, cancel) if outliers is not None and len(outliers) else None
    return PreparedData(extractor, size, trainable, normal_inputs, test_inputs, labels, outlier_inputs,
                        time.perf_counter() - started, held_inputs, probe_inputs, kinds)


def split_holdout(normal: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(trained-on, held-out) parts of ``normal``: a seeded ``fraction`` (at least 2 images) is held out."""
    n = len(normal)
    count = max(2, int(round(fraction * n)))
    if n - count < 4:
        raise ValueError(f"the automatic Early rule holds out {count} of {n} normal images and needs at least 4 "
                         "left to train on; add normal images or use the fixed Early")
    order = np.random.default_rng(seed).permutation(n)
    return normal.subset(sorted(order[count:].tolist())), normal.subset(sorted(order[:count].tolist()))


def compute_dtype(settings: PandaSettings, device: torch.device) -> torch.dtype:
    """The dtype training runs in: ``features.precision`` (older settings: ``autocast`` = bfloat16)."""
    return torch.bfloat16 if settings.autocast else resolve_precision(settings.features.precision, device, training=True)


def optimiser_for(settings: PandaSettings, strategy: str | None = None,
                  device: torch.device | str = "cpu") -> OptimiserSettings:
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
        metric=settings.metric,
        dtype=compute_dtype(settings, torch.device(device)),
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
    """The Fisher diagonal EWC uses: given, from ``settings.fisher_file``, or estimated (paper's Eq. 3).

    Estimated on ``reference`` images when given; else on the offline photo
    pool (``settings.fisher_source="pool"``, cached on disk per backbone,
    trainable pieces and size) or on the normal training images ("normal").
    """
    if fisher is not None:
        return fisher
    if settings.fisher_file:
        return load_fisher(settings.fisher_file)
    backbone = prepared.extractor.spec.name
    count = settings.fisher_batches
    # Minibatches of the paper's 32 whatever the training batch: squaring a minibatch's mean gradient
    # scales F with 1/batch, and lambda = 1e4 was chosen for 32.
    if reference is not None:
        inputs = _inputs(network, reference, prepared.size, settings, None, cancel)
        return estimate_fisher_minibatch(network, _cycled(inputs, count, settings), count,
                                         f"reference images ({len(reference)}), predicted labels", backbone,
                                         progress, cancel)
    if settings.fisher_source == "normal":
        return estimate_fisher_minibatch(network, _cycled(prepared.normal, count, settings), count,
                                         f"normal training images ({len(prepared.normal)}), predicted labels",
                                         backbone, progress, cancel)
    return pool_fisher(settings, prepared, network, progress, cancel)


def _cycled(inputs: TrainingInputs, count: int, settings: PandaSettings):
    """``count`` seeded minibatches (inputs, start) drawn from ``inputs``, reshuffled when they run out."""
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(count):
        if len(order) < min(FISHER_BATCH, len(inputs)):
            order = torch.cat([order, torch.randperm(len(inputs), generator=generator)])
        take, order = order[:FISHER_BATCH], order[FISHER_BATCH:]
        yield inputs.batch(take), inputs.start


def pool_fisher(settings: PandaSettings, prepared: PreparedData, network: TrainableNetwork,
                progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> FisherDiagonal:
    """The Fisher on the offline photo pool, estimated once per backbone/weights/pieces/size and kept on disk."""
    photos = natural_photos()
    count, batch = settings.fisher_batches, FISHER_BATCH
    key = {"format": 1, "backbone": prepared.extractor.spec.name, "weights": prepared.extractor.weights_identity,
           "trainable": list(prepared.trainable), "size": [prepared.size.resize, prepared.size.crop],
           "batches": count, "batch_size": batch, "seed": settings.seed, "photos": [p.name for p in photos]}
    path = cache_path(key)
    if path.is_file():
        try:
            return load_fisher(path)
        except FisherFileError:  # damaged cache: estimate again and overwrite it
            pass
    fisher = estimate_fisher_minibatch(
        network, ((images, 0) for images in pool_batches(prepared.size, count, batch, settings.seed, photos)),
        count, pool_description(photos, count * batch), prepared.extractor.spec.name, progress, cancel)
    try:
        save_fisher(path, fisher)
    except OSError:  # a read-only home: only the cache is lost
        pass
    return fisher


@dataclass
class AdaptationRun:
    """One trained strategy: the network (trained in place, or put back to the epoch kept), its schedule,
    the training result and, with ``keep_rule="signal"``, which network was kept and why (``kept``)."""

    settings: PandaSettings
    strategy: str
    schedule: Schedule
    network: TrainableNetwork
    result: TrainingResult
    fisher: FisherDiagonal | None
    head: dict[str, np.ndarray] | None
    prepared: PreparedData
    kept: KeptChoice


def holdout_share(settings: PandaSettings, n_normal: int) -> float:
    """The share of the normal images a run holds out for the signal: ``stop_holdout``, or 0 when it needs none.

    The signal is needed by Early (auto) and, with ``keep_rule="signal"``, by
    every strategy but OE. A set too small to spare images (fewer than 4 left
    to train on) trains on all of them (then no signal: the strategy's result is kept);
    Early (auto) cannot do without and says so (:func:`split_holdout`).
    """
    if auto_early(settings):
        return settings.stop_holdout
    if settings.keep_rule != "signal" or settings.strategy == "oe":
        return 0.0
    held = max(2, int(round(settings.stop_holdout * n_normal)))
    return settings.stop_holdout if n_normal - held >= 4 else 0.0


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
    stop_rule: BestSignal | None = None,
) -> AdaptationRun:
    """Train PANDA with ``settings.strategy`` on the normal images; the dashboard's and CLI's entry point.

    ``test`` (labelled) adds test curves and a per-epoch ROC AUC; ``outliers``
    is required for "oe". ``on_epoch(EpochRecord)`` streams the curves;
    ``cancel()`` stops between minibatches and keeps what was trained
    (``run.result.cancelled``). ``prepared`` reuses caches of an earlier run
    (then ``normal``/``test``/``outliers`` are ignored). ``schedule`` overrides
    the one derived from ``settings``; ``early_epoch`` marks (and keeps) an
    extra epoch; for "early" it defaults to the last epoch. ``stop_rule``
    marks the automatic Early epoch on a run that goes on training (the
    comparison's long run); Early with ``early_rule="auto"`` uses its own and stops there.
    With ``keep_rule="signal"`` and held-out normal images the pretrained network
    competes with the trained one (:func:`choose_kept`); ``run.network`` and
    ``run.result``'s final weights and features are then those of the network kept.
    """
    strategy = settings.strategy
    if prepared is None:
        if normal is None:
            raise ValueError("adapt needs the normal images or prepared data")
        prepared = prepare(normal, settings, test, outliers if strategy == "oe" else None, None, cancel,
                           holdout=holdout_share(settings, len(normal)))
    if strategy == "oe" and prepared.outliers is None:
        raise ValueError("strategy 'oe' needs an outlier exposure image set")
    schedule = schedule or resolve_schedule(settings, len(prepared.normal))
    rule, stop_here = stop_rule, False
    if auto_early(settings):
        if prepared.holdout is None:
            raise ValueError("the automatic Early rule needs held-out normal images (prepare(..., holdout=...))")
        rule, stop_here = BestSignal(settings.stop_fraction), True
    elif strategy == "early" and early_epoch is None:
        early_epoch = schedule.epochs
    competing = settings.keep_rule == "signal" and strategy != "oe" and prepared.holdout is not None
    fusing = fuses(settings)  # epochs 0's and the last one's weights and features are kept for the fused score
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
        network, prepared.normal, objective, schedule, optimiser_for(settings, device=prepared.extractor.device),
        test_inputs=prepared.test, test_labels=prepared.test_labels, holdout_inputs=prepared.holdout,
        early_epoch=early_epoch, keep_epoch_zero=keep_epoch_zero or competing or fusing,
        keep_last=competing or fusing, evaluate=evaluate or rule is not None,
        on_epoch=on_epoch, progress=progress, cancel=cancel, stop_rule=rule, stop_when_done=stop_here,
        probe_inputs=prepared.probe, probe_kinds=prepared.probe_kinds,
    )
    last = result.epochs_done
    if stop_here and result.auto_stop_epoch is not None:
        # Early (auto) keeps the epoch with the best signal (epoch 0 included), not the last one trained.
        kept = choose_kept(settings, result, schedule, "auto", prepared.probe_kinds)
    elif competing and not result.cancelled:
        kept = choose_kept(settings, result, schedule, strategy, prepared.probe_kinds)
    else:
        kept = KeptChoice(last, last, None, None, _uncompared(settings, strategy, result.cancelled))
    if kept.epoch != last:
        chosen = result.snapshots[kept.epoch]
        network.load_suffix_state(chosen.state)
        result = dataclasses.replace(result, final_state=chosen.state, final_train_features=chosen.train_features,
                                     final_test_features=chosen.test_features)
    if kept.epoch < len(result.records):
        records = list(result.records)
        records[kept.epoch] = dataclasses.replace(records[kept.epoch], kept=True)
        result = dataclasses.replace(result, records=records)
    head = objective.head_state() if isinstance(objective, OutlierExposureObjective) else None
    return AdaptationRun(settings, strategy, schedule, network, result, used_fisher, head, prepared, kept)


def _uncompared(settings: PandaSettings, strategy: str, cancelled: bool) -> str:
    """Why a run keeps what it trained without asking the signal."""
    if cancelled:
        return "stopped by the user: the weights trained so far"
    if strategy == "oe":
        return "OE keeps its trained network and head"
    if fuses(settings):
        return "the trained network's scores fused with the pretrained network's (keep_rule=fuse)"
    if settings.keep_rule != "signal":
        return "the strategy's own result, as in the paper (keep_rule=last)"
    return "the strategy's own result: too few normal images to hold some out for the signal"


def choose_kept(settings: PandaSettings, result: TrainingResult, schedule: Schedule, strategy: str,
                kinds: tuple[str, ...]) -> KeptChoice:
    """The pretrained network or the trained one, by the normal-only signal (``strategy`` "auto" = Early (auto)).

    Early (auto): the best-signal epoch (:class:`~core.adaptation.stopping.BestSignal`);
    Early (fixed) and EWC: the last epoch; SES: its snapshots together, scored
    as SES scores (:func:`ses_signal`). Each must beat epoch 0's signal by
    ``settings.keep_margin``; Early (auto) with ``keep_rule="last"`` skips that comparison.
    """
    signals = result.signals()
    margin = settings.keep_margin if settings.keep_rule == "signal" else float("-inf")
    if strategy == "auto":
        epoch = result.auto_stop_epoch
        return keep_choice(signals.get(0), signals.get(epoch), epoch, f"epoch {epoch}", margin)
    last = result.epochs_done
    if strategy == "ses":
        epochs = [e for e in schedule.snapshot_epochs if e in result.snapshots]
        if epochs:
            adapted = ses_signal([result.snapshots[e] for e in epochs], result.trained_count, kinds, settings)
            return keep_choice(signals.get(0), adapted, epochs[-1], f"SES ({len(epochs)} snapshots)", margin)
    return keep_choice(signals.get(0), signals.get(last), last, f"epoch {last}", margin)


def ses_signal(snapshots: list, trained_count: int, kinds: tuple[str, ...], settings: PandaSettings) -> float | None:
    """The signal of SES's own scores: snapshots fitted on the trained-on rows, held-out normals and probes scored."""
    if any(s.probe_features is None for s in snapshots):
        return None
    scorer = SesScorer(settings.k, settings.ses_holdout, settings.seed, settings.metric)
    try:
        scorer.fit([s.train_features[:trained_count] for s in snapshots])
    except ValueError:  # every snapshot collapsed: SES has nothing to offer
        return float("-inf")
    held = scorer.score([s.train_features[trained_count:] for s in snapshots]).scores
    probes = scorer.score([s.probe_features for s in snapshots]).scores
    return score_statistics(held, probes, kinds).get(SIGNAL)


def fuses(settings: PandaSettings) -> bool:
    """True when the model always scores with the pretrained and the trained network together (keep_rule "fuse")."""
    return settings.keep_rule == "fuse" and settings.strategy != "oe"


def fused_model(settings: PandaSettings, strategy: str, kept: KeptChoice) -> bool:
    """Whether the model of a run scores with both networks (:mod:`core.adaptation.fusion`).

    keep_rule "fuse": always (OE aside); "signal": when the signal gave back
    the pretrained network, which is then fused with what the strategy
    trained (``kept.adapted_epoch``: its last epoch, or Early (auto)'s) instead
    of kept alone. The adapted part is that epoch's kNN (for SES too: its
    last snapshot).
    """
    if strategy == "oe" or kept.adapted_epoch == 0:
        return False
    return settings.keep_rule == "fuse" or (settings.keep_rule == "signal" and kept.pretrained)


def auto_early(settings: PandaSettings) -> bool:
    """True when this run is PANDA-Early with the automatic stopping rule."""
    return settings.strategy == "early" and settings.early_rule == "auto"


def with_strategy(settings: PandaSettings, strategy: str) -> PandaSettings:
    """A copy of ``settings`` with another strategy."""
    return dataclasses.replace(settings, strategy=strategy)
