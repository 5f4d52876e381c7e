"""The PANDA training loop: SGD on the trainable top, one curve record per epoch, cancellable.

The loop knows nothing about strategies beyond an :class:`~core.adaptation.strategies.Objective`
(what a step minimises) and which epochs to keep:

* epoch 0 (optional): the pretrained features (DN2);
* ``early_epoch``: PANDA-Early's stopping point;
* ``snapshot_epochs``: PANDA-SES's snapshots.

A kept epoch is a :class:`Snapshot`: the trainable weights at that point plus
the features of the normal (and test) images, so SES and the comparison can
score without running the network again.

After each epoch every normal (and test) image goes through the network once
more without gradients to measure the curves; with the prefix cache this is
the cheap top part only. ``cancel()`` is polled before every minibatch: the
loop then stops, keeps the weights trained so far, and returns a result whose
``cancelled`` is True (no half-epoch record is written).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from core.adaptation.curves import EpochCallback, EpochRecord, distance_summary
from core.adaptation.network import TrainableNetwork
from core.adaptation.prefix_cache import PrefixCache, TrainingInputs, peak_memory_bytes
from core.adaptation.schedule import Schedule
from core.adaptation.signals import SIGNAL, measure
from core.adaptation.stopping import BestSignal, holdout_statistics
from core.adaptation.strategies import Objective
from core.backbones import autocast_to, to_channels_last
from core.metrics import image_auroc
from core.progress import CancelFn, ProgressFn, report_progress


@dataclass(frozen=True)
class OptimiserSettings:
    """SGD as in the paper's supplement; ``dtype`` is the compute dtype of the forward pass (autocast)."""

    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-5
    grad_clip: float = 1e-3
    batch_size: int = 32
    k: int = 2
    metric: str = "euclidean"
    dtype: torch.dtype = torch.float32
    seed: int = 0
    eval_batch_size: int = 64


@dataclass
class Snapshot:
    """The network at one epoch: trainable weights (CPU float32) and features (N, D) / (M, D) / (P, D).

    ``train_features`` are those of every normal image: the trained-on ones
    first, then the held-out ones (when the run holds some out for the signal);
    ``probe_features`` those of the probe images (:mod:`core.adaptation.probes`), if any.
    """

    epoch: int
    state: dict[str, torch.Tensor]
    train_features: np.ndarray
    test_features: np.ndarray | None
    probe_features: np.ndarray | None = None


@dataclass
class TrainingResult:
    """What a run produced. ``records[i].epoch == i``; ``snapshots`` maps epoch -> :class:`Snapshot`."""

    records: list[EpochRecord]
    centre: np.ndarray
    snapshots: dict[int, Snapshot]
    final_state: dict[str, torch.Tensor]
    final_train_features: np.ndarray
    final_test_features: np.ndarray | None
    minibatches: int
    cancelled: bool
    cache: dict[str, object] = field(default_factory=dict)
    peak_memory_bytes: int = 0
    auto_stop_epoch: int | None = None
    trained_count: int = 0

    def signals(self) -> dict[int, float | None]:
        """The normal-only signal of every evaluated epoch, by epoch (None where it was not measured)."""
        return {record.epoch: record.signal for record in self.records}

    @property
    def epochs_done(self) -> int:
        return self.records[-1].epoch if self.records else 0

    @property
    def mean_epoch_seconds(self) -> float:
        times = [r.seconds for r in self.records if r.epoch > 0]
        return float(np.mean(times)) if times else float("nan")


def features_of(network: TrainableNetwork, inputs: TrainingInputs, batch_size: int = 64,
                dtype: torch.dtype = torch.float32) -> np.ndarray:
    """(N, D) float32 pooled features of all inputs under the network's current weights."""
    parts = []
    with torch.no_grad(), autocast_to(network.device, dtype):
        for indices in inputs.batches(batch_size):
            batch = to_channels_last(inputs.batch(indices).to(network.device, non_blocking=True))
            parts.append(network.features(batch, inputs.start).float().cpu())
    return torch.cat(parts).numpy()


def cache_description(inputs: TrainingInputs) -> dict[str, object]:
    kind = "prefix" if isinstance(inputs, PrefixCache) else "images"
    description: dict[str, object] = {"kind": kind, "bytes": inputs.nbytes, "start_piece": inputs.start}
    if isinstance(inputs, PrefixCache):
        description["dtype"] = str(inputs.dtype).replace("torch.", "")
        description["shape"] = list(inputs.activations.shape)
    return description


def train(
    network: TrainableNetwork,
    train_inputs: TrainingInputs,
    objective: Objective,
    schedule: Schedule,
    optimiser: OptimiserSettings = OptimiserSettings(),
    test_inputs: TrainingInputs | None = None,
    test_labels: np.ndarray | None = None,
    holdout_inputs: TrainingInputs | None = None,
    early_epoch: int | None = None,
    keep_epoch_zero: bool = False,
    keep_last: bool = False,
    evaluate: bool = True,
    on_epoch: EpochCallback | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    stop_rule: BestSignal | None = None,
    stop_when_done: bool = False,
    probe_inputs: TrainingInputs | None = None,
    probe_kinds: tuple[str, ...] = (),
) -> TrainingResult:
    """Train ``network``'s trainable pieces in place for ``schedule.epochs`` epochs.

    ``train_inputs``: N normal images (prefix cache or images); ``test_inputs`` /
    ``test_labels`` (M,) optional, for the test curves and per-epoch ROC AUC.
    ``holdout_inputs``: H normal images that are not trained on; each epoch
    records how they sit against the trained-on ones (the automatic Early
    rule, :mod:`core.adaptation.stopping`), and their features join the kNN
    gallery (snapshots' and the result's train features are N + H rows).
    ``keep_epoch_zero`` / ``keep_last`` keep snapshots of the pretrained network
    and of the last epoch (a fused model needs both, :mod:`core.adaptation.fusion`).
    ``evaluate=False`` skips the per-epoch feature pass except at kept epochs
    (records then carry NaN distances): the cheapest way to train.
    ``progress(done, total)`` counts minibatches.
    ``probe_inputs`` (P images that are not normal, of ``probe_kinds``) with
    ``holdout_inputs`` give every evaluated epoch its normal-only ``signal``
    (:mod:`core.adaptation.signals`); epoch 0 and the last epoch are always evaluated.
    ``stop_rule`` (needs ``holdout_inputs``) is fed every epoch's record; its
    current choice is kept as a snapshot, and with ``stop_when_done`` training
    ends once its collapse guard fires.
    """
    device = network.device
    labels = None if test_labels is None else np.asarray(test_labels)
    with_auroc = labels is not None and len(np.unique(labels)) == 2
    keep = (set(schedule.snapshot_epochs) | ({early_epoch} if early_epoch else set())
            | ({0} if keep_epoch_zero else set()) | ({schedule.epochs} if keep_last else set()))
    snapshot_index = {epoch: i for i, epoch in enumerate(schedule.snapshot_epochs)}

    records: list[EpochRecord] = []
    snapshots: dict[int, Snapshot] = {}

    def normal_features() -> tuple[np.ndarray, np.ndarray | None]:
        trained = features_of(network, train_inputs, optimiser.eval_batch_size, optimiser.dtype)
        held = (features_of(network, holdout_inputs, optimiser.eval_batch_size, optimiser.dtype)
                if holdout_inputs is not None else None)
        return trained, held

    def observe(epoch: int, minibatches: int, seconds: float, parts: dict[str, list[float]], losses: list[float]) -> tuple[np.ndarray | None, np.ndarray | None]:
        needed = evaluate or epoch in keep or epoch in (0, schedule.epochs)
        started = time.perf_counter()
        train_f, held_f = normal_features() if needed else (None, None)
        test_f = (features_of(network, test_inputs, optimiser.eval_batch_size, optimiser.dtype)
                  if needed and test_inputs is not None else None)
        probe_f = (features_of(network, probe_inputs, optimiser.eval_batch_size, optimiser.dtype)
                   if needed and probe_inputs is not None and held_f is not None else None)
        summary: dict[str, float | None] = {"train_distance": float("nan")}
        auroc = None
        gallery = train_f
        signals = None
        if train_f is not None:
            summary = distance_summary(train_f, centre, test_f, labels)
            if held_f is not None:
                summary.update(holdout_statistics(train_f, held_f, centre, optimiser.k))
                signals = measure(train_f, held_f, probe_f, probe_kinds, optimiser.k, optimiser.metric)
                gallery = np.concatenate([train_f, held_f])
            if with_auroc and test_f is not None:
                auroc = image_auroc(labels, objective.test_scores(network, gallery, test_f, optimiser.k, optimiser.metric))
        record = EpochRecord(
            epoch=epoch,
            minibatches=minibatches,
            seconds=seconds,
            loss=float(np.mean(losses)) if losses else None,
            compactness=float(np.mean(parts["compactness"])) if parts.get("compactness") else None,
            penalty=float(np.mean(parts["penalty"])) if parts.get("penalty") else None,
            auroc=auroc,
            snapshot=snapshot_index.get(epoch),
            early_stop=epoch == early_epoch,
            eval_seconds=time.perf_counter() - started,
            signal=None if signals is None else signals.get(SIGNAL),
            signals=signals,
            **summary,
        )
        if epoch in keep and gallery is not None:
            snapshots[epoch] = Snapshot(epoch, network.suffix_state(), gallery, test_f, probe_f)
        if stop_rule is not None and gallery is not None:
            previous = stop_rule.chosen
            if stop_rule.update(epoch, record):
                # Keep only the rule's current choice (one extra copy of the trainable weights).
                if previous is not None and previous not in keep:
                    snapshots.pop(previous, None)
                snapshots[epoch] = Snapshot(epoch, network.suffix_state(), gallery, test_f, probe_f)
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
        return gallery, test_f

    # Epoch 0: the centre c is the mean pretrained feature of the normal set.
    centre = features_of(network, train_inputs, optimiser.eval_batch_size, optimiser.dtype).mean(axis=0)
    centre_t = torch.as_tensor(centre, device=device)
    objective.begin(network, centre_t)
    train_f, test_f = observe(0, 0, 0.0, {}, [])

    params = list(network.trainable_parameters().values()) + objective.extra_parameters()
    sgd = torch.optim.SGD(params, lr=optimiser.lr, momentum=optimiser.momentum, weight_decay=optimiser.weight_decay)
    generator = torch.Generator().manual_seed(optimiser.seed)
    total = schedule.epochs * schedule.batches_per_epoch
    steps = 0
    cancelled = False
    for epoch in range(1, schedule.epochs + 1):
        order = torch.randperm(len(train_inputs), generator=generator)
        losses: list[float] = []
        parts: dict[str, list[float]] = {}
        started = time.perf_counter()
        for indices in torch.split(order, optimiser.batch_size):
            if cancel is not None and cancel():
                cancelled = True
                break
            batch = train_inputs.batch(indices).to(device, non_blocking=True)
            sgd.zero_grad(set_to_none=True)
            with autocast_to(device, optimiser.dtype):
                features = network.features(batch, train_inputs.start)
                loss, named = objective.step_loss(network, features, indices)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, optimiser.grad_clip)
            sgd.step()
            objective.after_step(network, optimiser.lr)
            steps += 1
            losses.append(float(loss.detach()))
            for key, value in named.items():
                parts.setdefault(key, []).append(value)
            report_progress(progress, steps, total)
        if cancelled:
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        new_train_f, new_test_f = observe(epoch, steps, seconds, parts, losses)
        if new_train_f is not None:
            train_f, test_f = new_train_f, new_test_f
        if stop_rule is not None and stop_rule.done and stop_when_done:
            break

    ruled = stop_rule is not None and stop_rule.done and stop_when_done and evaluate
    if (records[-1].epoch != schedule.epochs and not ruled) or train_f is None:
        # Cancelled: the final features describe the weights as they are now.
        trained, held = normal_features()
        train_f = trained if held is None else np.concatenate([trained, held])
        test_f = (features_of(network, test_inputs, optimiser.eval_batch_size, optimiser.dtype)
                  if test_inputs is not None else None)
    chosen = stop_rule.chosen if stop_rule is not None else None
    if chosen is not None:
        records[chosen] = dataclasses.replace(records[chosen], auto_stop=True)
    return TrainingResult(
        records=records,
        centre=centre,
        snapshots=snapshots,
        final_state=network.suffix_state(),
        final_train_features=train_f,
        final_test_features=test_f,
        minibatches=steps,
        cancelled=cancelled,
        cache=cache_description(train_inputs),
        peak_memory_bytes=peak_memory_bytes(device),
        auto_stop_epoch=chosen,
        trained_count=len(train_inputs),
    )
