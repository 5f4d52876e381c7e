"""The collapse lesson: the paper's Fig. 3 in about a minute on the bundled Fashion-MNIST trousers demo.

One unregularised compactness run and one EWC run on the same cached
inputs, trained hard enough (32² input, lr 5, minibatches of 8, 20 epochs)
that the unregularised features collapse within the run while SES (the best
snapshot per image) and EWC (a Fisher-weighted pull back to the pretrained
weights) hold. What is returned are three per-epoch ROC AUC curves and the
final ROC AUC of each strategy:

* ``unregularised``: each epoch scored on its own (kNN to the normal features);
* ``ses``: SES over the snapshots taken so far (every ``snapshot_every``
  epochs; between snapshots the last value is carried), so the curve shows
  what SES would give if training stopped there;
* ``ewc``: each epoch of the EWC run scored on its own.

Measured on the demo (100 trousers, 100 test images of all ten classes), one
thread, `python -m core adapt --lesson --threads 1`: ROC AUC 90.8 (pretrained)
-> 99.9 at epoch 10, then 96.7, 78.9, 53.3 and 50.0 at epochs 15-18 without
regularisation; SES 98.9, EWC 98.1 at the end. 137 s of wall time on the
2-core machine with five other processes running (load 6-7), of which 27 s
of CPU: alone on a core it is about half a minute (docs/RESULTS-panda.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.adaptation.curves import EpochRecord
from core.adaptation.pipeline import adapt, prepare, with_strategy
from core.adaptation.schedule import Schedule, snapshot_epochs
from core.adaptation.ses import SesScorer
from core.config import FeatureSettings, PandaSettings
from core.datasets import ImageSet
from core.metrics import image_auroc
from core.progress import CancelFn, ProgressFn, part_of
from core.threads import torch_threads

LESSON_SETTINGS = PandaSettings(
    features=FeatureSettings(backbone="efficientnet_lite0", resize=32, crop=32),
    lr=5.0, batch_size=8, epochs=20, snapshot_every=2, ewc_lambda=1e2, ewc_step="proximal", fisher_batches=25,
    metric="euclidean", keep_rule="last",
)
"""What the lesson trains with (see the module docstring for why each value)."""

LESSON_THREADS = 1
"""CPU threads the lesson computes with: its operations (32² images, minibatches of 8) are too small to
share; with two threads on a busy 2-core machine it took 158 s instead of 33 s (core.threads)."""
LESSON_RUNS = ("unregularised", "ses", "ewc")
DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo" / "fashion"
"""The bundled Fashion-MNIST demo the lesson is made for: 100 trousers to train on, 100 test images."""
DEMO_NORMAL_CLASS = "Trouser"


def demo_images() -> tuple[ImageSet, ImageSet]:
    """The bundled demo's (normal, labelled test) images."""
    from core.datasets import read_class_folders

    return read_class_folders(DEMO, DEMO_NORMAL_CLASS)


LessonCallback = Callable[[str, EpochRecord], None]
"""Called with (run name, record) as each epoch of the two training runs ends."""


@dataclass
class LessonResult:
    """Per-epoch ROC AUC of the three strategies (``curves[name]``: one value per epoch 0..E) and their final ones."""

    epochs: list[int]
    curves: dict[str, list[float | None]]
    auroc: dict[str, float]
    ratios: dict[str, list[float | None]]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LessonResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def ses_curve(snapshots: dict, ses_epochs: tuple[int, ...], epochs: int, labels: np.ndarray,
              settings: PandaSettings) -> list[float | None]:
    """ROC AUC of SES over the snapshots taken up to each epoch 0..``epochs`` (None before the first one)."""
    values: list[float | None] = [None] * (epochs + 1)
    current = None
    for epoch in range(epochs + 1):
        taken = [e for e in ses_epochs if e <= epoch and e in snapshots]
        if taken and taken[-1] == epoch:
            chosen = [snapshots[e] for e in taken]
            scorer = SesScorer(settings.k, settings.ses_holdout, settings.seed, settings.metric).fit(
                [s.train_features for s in chosen])
            current = image_auroc(labels, scorer.score([s.test_features for s in chosen]).scores)
        values[epoch] = current
    return values


def collapse_lesson(normal: ImageSet, test: ImageSet, settings: PandaSettings | None = None,
                    on_epoch: LessonCallback | None = None, progress: ProgressFn | None = None,
                    cancel: CancelFn | None = None) -> LessonResult:
    """Train the unregularised and the EWC run on ``normal``; score every epoch on the labelled ``test``.

    ``settings``: default :data:`LESSON_SETTINGS`.
    """
    settings = settings or LESSON_SETTINGS
    if not test.has_labels or len(np.unique(test.labels)) < 2:
        raise ValueError("the lesson needs labelled test images, normal and anomalous")
    with torch_threads(LESSON_THREADS):
        return _train_and_score(normal, test, settings, on_epoch, progress, cancel)


def _train_and_score(normal: ImageSet, test: ImageSet, settings: PandaSettings, on_epoch: LessonCallback | None,
                     progress: ProgressFn | None, cancel: CancelFn | None) -> LessonResult:
    started = time.perf_counter()
    prepared = prepare(normal, settings, test, cancel=cancel)
    per_epoch = math.ceil(len(prepared.normal) / settings.batch_size)
    epochs = settings.epochs
    ses_at = snapshot_epochs(epochs, settings.snapshot_every)
    total = 2 * epochs * per_epoch

    def relay(name: str, offset: int):
        report = part_of(progress, offset, total)
        return (None if on_epoch is None else (lambda record: on_epoch(name, record))), report

    callback, report = relay("unregularised", 0)
    plain = adapt(None, with_strategy(settings, "ses"), prepared=prepared,
                  schedule=Schedule(epochs, per_epoch, ses_at), keep_epoch_zero=True,
                  on_epoch=callback, progress=report, cancel=cancel)
    callback, report = relay("ewc", epochs * per_epoch)
    ewc = adapt(None, with_strategy(settings, "ewc"), prepared=prepared, schedule=Schedule(epochs, per_epoch),
                on_epoch=callback, progress=report, cancel=cancel)
    labels = prepared.test_labels
    records = {"unregularised": plain.result.records, "ewc": ewc.result.records}
    done = min(len(r) for r in records.values()) - 1
    curves = {
        "unregularised": [r.auroc for r in records["unregularised"][:done + 1]],
        "ses": ses_curve(plain.result.snapshots, ses_at, done, labels, settings),
        "ewc": [r.auroc for r in records["ewc"][:done + 1]],
    }
    final = {name: values[-1] for name, values in curves.items() if values and values[-1] is not None}
    ratios = {name: [r.test_anomalous_ratio for r in recs[:done + 1]] for name, recs in records.items()}
    return LessonResult(list(range(done + 1)), curves, final, ratios, time.perf_counter() - started,
                        {"epochs": epochs, "lr": settings.lr, "batch_size": settings.batch_size,
                         "crop": settings.features.crop, "backbone": settings.features.backbone,
                         "snapshot_every": settings.snapshot_every, "ewc_lambda": settings.ewc_lambda,
                         "n_normal": len(normal), "n_test": len(test)})
