"""How long PANDA trains and when SES takes snapshots, scaled to the size of the normal set.

The paper fixes the amount of training in minibatches of 32, so that a small
normal set trains for more epochs and a large one for fewer (supplement,
Sec. 2.1): Early stops after 2.3k minibatches, SES tries copies trained on up
to 150k samples, snapshotting every 5 CIFAR-10 epochs (25k samples), EWC trains
7.8k minibatches, OE 75 CIFAR-10 epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import PandaSettings

CIFAR10_TRAIN = 5000
PAPER_MINIBATCHES = {
    "early": 2300,
    "ses": math.ceil(150_000 / 32),
    "ewc": 7800,
    "oe": 75 * math.ceil(CIFAR10_TRAIN / 32),
}
PAPER_SNAPSHOT_SAMPLES = 5 * CIFAR10_TRAIN


@dataclass(frozen=True)
class Schedule:
    """``epochs`` of ``batches_per_epoch`` minibatches; SES snapshots after the epochs in ``snapshot_epochs``."""

    epochs: int
    batches_per_epoch: int
    snapshot_epochs: tuple[int, ...] = ()

    @property
    def minibatches(self) -> int:
        return self.epochs * self.batches_per_epoch


def epochs_for_minibatches(minibatches: int, n_train: int, batch_size: int) -> int:
    """Epochs (at least 1) that make about ``minibatches`` steps on ``n_train`` images."""
    per_epoch = math.ceil(n_train / batch_size)
    return max(1, round(minibatches / per_epoch))


def snapshot_epochs(epochs: int, every: int) -> tuple[int, ...]:
    """Multiples of ``every`` up to ``epochs``, plus the last epoch (SES always has the final copy)."""
    chosen = list(range(every, epochs + 1, every))
    if not chosen or chosen[-1] != epochs:
        chosen.append(epochs)
    return tuple(chosen)


def snapshot_interval(settings: PandaSettings, n_train: int) -> int:
    """Epochs between SES snapshots: ``settings.snapshot_every``, else the paper's 25k samples."""
    return settings.snapshot_every or max(1, round(PAPER_SNAPSHOT_SAMPLES / n_train))


def resolve_schedule(settings: PandaSettings, n_train: int, strategy: str | None = None) -> Schedule:
    """The schedule ``settings`` asks for on a normal set of ``n_train`` images."""
    if n_train < 1:
        raise ValueError("cannot schedule training on an empty normal set")
    strategy = strategy or settings.strategy
    per_epoch = math.ceil(n_train / settings.batch_size)
    if settings.epochs > 0:
        epochs = settings.epochs
    else:
        minibatches = settings.minibatches or PAPER_MINIBATCHES[strategy]
        epochs = epochs_for_minibatches(minibatches, n_train, settings.batch_size)
    snapshots: tuple[int, ...] = ()
    if strategy == "ses":
        snapshots = snapshot_epochs(epochs, snapshot_interval(settings, n_train))
    return Schedule(epochs=epochs, batches_per_epoch=per_epoch, snapshot_epochs=snapshots)
