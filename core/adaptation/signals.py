"""Whether adaptation helps, read from normal images alone: the per-epoch signal and the network kept.

PANDA's test ROC AUC cannot be watched while training: the test labels are
what the detector is for. What can be watched: how far normal images the
network never trained on (the held-out share, ``PandaSettings.stop_holdout``)
sit from the training images, against how far *probe* images sit — images
that are certainly not normal, made offline (:mod:`core.adaptation.probes`:
natural-photo crops and synthetic defects painted into the held-out normals).
Both are scored exactly as test images are (kNN to the trained-on normal
features, the settings' metric), so a network that separates probes from
unseen normals better is, by this measure, a better detector.

:func:`measure` returns every candidate value studied for issue 24;
:data:`SIGNAL` names the one the choice uses (see the module constants for
what was measured and why). :func:`keep_choice` decides between the
pretrained network (epoch 0, DN2's features) and what the strategy trained.
No function here reads a test image or a test label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from core.adaptation.probes import CHANGES
from core.knn import KnnIndex, as_float32
from core.metrics import image_auroc

EPSILON = 1e-12


def _auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return float(image_auroc(labels, np.r_[normal, anomalous]))


def _separation(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Mean log score of the probes minus that of the held-out normals (scale-free: the kNN's units cancel)."""
    return float(np.mean(np.log(anomalous + EPSILON)) - np.mean(np.log(normal + EPSILON)))


def score_statistics(held_scores: np.ndarray, probe_scores: np.ndarray, kinds: Sequence[str]) -> dict[str, float]:
    """Candidate values from (H,) held-out normal and (P,) probe anomaly scores, per probe family.

    Families: ``far`` (the photo crops, :mod:`core.adaptation.probes`),
    ``near`` (changes of held-out normal images), each change by its own name,
    and ``probe`` (all of them). For each, ``<family>_auroc`` (held-out normals
    against the family) and ``<family>_separation``.
    """
    kinds_array = np.asarray([str(kind) for kind in kinds])
    values: dict[str, float] = {}
    far = np.isin(kinds_array, ("pool", "grey"))
    families = {"probe": np.ones(len(kinds_array), dtype=bool), "far": far, "near": ~far}
    families.update({kind: kinds_array == kind for kind in CHANGES})
    for family, chosen in families.items():
        if not chosen.any() or len(held_scores) == 0:
            continue
        values[f"{family}_auroc"] = _auroc(held_scores, probe_scores[chosen])
        values[f"{family}_separation"] = _separation(held_scores, probe_scores[chosen])
    return values


def measure(trained: np.ndarray, held: np.ndarray, probes: np.ndarray | None, kinds: Sequence[str], k: int,
            metric: str) -> dict[str, float]:
    """Every candidate signal of one epoch.

    ``trained`` (N, D): features of the normal images trained on (the kNN
    gallery); ``held`` (H, D): held-out normal images; ``probes`` (P, D) with
    their ``kinds``. Also ``holdout_knn_gap`` (log of the held-out images' mean
    kNN score over the trained images' leave-one-out one: how much worse unseen
    normals fit) and ``spread`` (participation ratio of the normalised trained
    features: the effective number of dimensions they use; collapse lowers it).
    """
    index = KnnIndex(k, metric=metric).fit(as_float32(trained))
    held_scores = index.score(as_float32(held)).astype(np.float64)
    own = index.train_scores().astype(np.float64)
    values = {"holdout_knn_gap": float(np.log((held_scores.mean() + EPSILON) / (own.mean() + EPSILON))),
              "spread": participation_ratio(trained)}
    if probes is not None and len(probes):
        values.update(score_statistics(held_scores, index.score(as_float32(probes)).astype(np.float64), kinds))
    return values


def participation_ratio(features: np.ndarray) -> float:
    """(sum λ)² / sum λ² of the covariance of unit-length ``features`` (N, D): 1 (a line) .. D (a ball)."""
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPSILON)
    x = x - x.mean(axis=0)
    gram = x @ x.T if len(x) < x.shape[1] else x.T @ x  # same non-zero eigenvalues, smaller matrix
    eigenvalues = np.clip(np.linalg.eigvalsh(gram / len(x)), 0.0, None)
    total = eigenvalues.sum()
    return float(total * total / max((eigenvalues * eigenvalues).sum(), EPSILON))


SIGNAL = "blend_separation"
"""The candidate the choice reads: held-out normal images against blends of two of them.

Measured for issue 24 (docs/RESULTS-panda.md) on six Fashion-MNIST classes
(500 normal images, Lite2 224², cosine) and on bottle, DeepPCB and BSData:
deciding between epoch 0 and SES over a 12-20-epoch run by this value was
right on 5 of 6 and 3 of 3 classes and never cost more than 0.0 against DN2,
where the mix of every probe family (``probe_separation``) was right on 2 of
6 and cost up to 2.1 points. A blend keeps the colours and textures of normal
images but not their shape: what the compactness training may forget first."""
PROBE_POOL_CROPS = 0
"""Photo crops the signal's probe set holds (the chosen signal reads none; the study used 30)."""
PROBE_CHANGES = ("blend",)
"""Changes of held-out images the signal's probe set holds (the study measured every one in probes.CHANGES)."""
MARGIN = 0.0
"""How much the adapted network's signal must exceed the pretrained one's for adaptation to be kept."""


@dataclass(frozen=True)
class KeptChoice:
    """Which network a model keeps: ``epoch`` 0 = the pretrained one (DN2's features), else the adapted one.

    ``adapted_epoch`` is what the strategy itself would have kept (SES: its
    last snapshot); ``pretrained_signal`` / ``adapted_signal`` the values the
    choice compared and ``reason`` the sentence the model and the page show.
    """

    epoch: int
    adapted_epoch: int
    pretrained_signal: float | None
    adapted_signal: float | None
    reason: str

    @property
    def pretrained(self) -> bool:
        return self.epoch == 0

    def to_dict(self) -> dict[str, object]:
        return {"kept_epoch": self.epoch, "adapted_epoch": self.adapted_epoch,
                "pretrained_signal": self.pretrained_signal, "adapted_signal": self.adapted_signal,
                "kept_reason": self.reason}


def keep_choice(pretrained: float | None, adapted: float | None, adapted_epoch: int, what: str,
                margin: float = MARGIN) -> KeptChoice:
    """Keep the adapted network (``what`` names it) unless its signal is not ``margin`` above the pretrained one."""
    if adapted_epoch == 0:
        return KeptChoice(0, 0, pretrained, adapted, "the best signal is the pretrained network's (epoch 0)")
    if pretrained is None or adapted is None or not np.isfinite([pretrained, adapted]).all():
        return KeptChoice(adapted_epoch, adapted_epoch, pretrained, adapted,
                          f"{what} kept: no held-out normal images to compare it with the pretrained network")
    if adapted > pretrained + margin:
        return KeptChoice(adapted_epoch, adapted_epoch, pretrained, adapted,
                          f"{what} kept: signal {adapted:.3f} against {pretrained:.3f} for the pretrained network")
    return KeptChoice(0, adapted_epoch, pretrained, adapted,
                      f"pretrained network kept (epoch 0): signal {pretrained:.3f} against {adapted:.3f} for {what}"
                      + (f" (adaptation must win by {margin:g})" if margin else ""))


def best_epoch(values: Mapping[int, float | None]) -> int | None:
    """The epoch with the highest finite signal (the earliest of ties), None when there is none."""
    finite = [(value, -epoch) for epoch, value in values.items() if value is not None and np.isfinite(value)]
    return -max(finite)[1] if finite else None
