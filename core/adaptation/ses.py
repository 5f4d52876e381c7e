"""Sample-wise early stopping (PANDA-SES): score each image with the snapshot that separates it best.

Training keeps snapshots psi_1..psi_T of the network. For snapshot t the
normal training features are split once (same split for all t) into a 90%
gallery and a 10% holdout; the snapshot's typical normal distance s_t is the
mean kNN score of the holdout against the gallery (supplement, "SES distance
normalization": a training image would find itself as nearest neighbour). An
image x gets kNN_t(x) / s_t under every snapshot and its anomaly score is the
largest of these ratios; the arg max says which snapshot "won".

Queries are scored against the 90% gallery, the very gallery s_t was measured
on, so that a normal image's ratio is about 1 under every snapshot.

A snapshot whose held-out normal images sit exactly on their gallery
neighbours (s_t = 0: the features collapsed to a point, as a long
unregularised run at a high learning rate ends) can separate nothing and has
no scale to normalise by, so SES leaves it out (``snapshots_used_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from core.knn import KnnIndex, as_float32


@dataclass(frozen=True)
class SesScores:
    """``scores`` (M,) max normalised score; ``choice`` (M,) winning snapshot index; ``normalised`` (T, M)."""

    scores: np.ndarray
    choice: np.ndarray
    normalised: np.ndarray


def holdout_split(n: int, fraction: float, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (gallery, holdout) positions of ``n`` training images; the gallery keeps more than k images."""
    n_holdout = max(1, int(round(fraction * n)))
    if n - n_holdout <= k:
        raise ValueError(f"SES needs more than k={k} gallery images after holding out {n_holdout}; got {n} normal images")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


class SesScorer:
    """kNN galleries and normalisers of T snapshots; scores are max-over-snapshots of kNN / s_t."""

    def __init__(self, k: int = 2, holdout: float = 0.1, seed: int = 0, metric: str = "euclidean") -> None:
        self.k = k
        self.metric = metric
        self.holdout = holdout
        self.seed = seed
        self.indexes_: list[KnnIndex] = []
        self.n_snapshots = 0
        self.normalisers_: np.ndarray | None = None
        self.gallery_positions_: np.ndarray | None = None
        self.holdout_positions_: np.ndarray | None = None
        self.snapshots_used_: np.ndarray | None = None
        self._train_ratios: np.ndarray | None = None

    def fit(self, train_features: Sequence[np.ndarray]) -> "SesScorer":
        """``train_features``: one (N, D) array per snapshot, rows = the same N normal images."""
        if not train_features:
            raise ValueError("SES needs at least one snapshot")
        n = train_features[0].shape[0]
        if any(f.shape[0] != n for f in train_features):
            raise ValueError("every snapshot must have features of the same normal images")
        gallery, holdout = holdout_split(n, self.holdout, self.k, self.seed)
        self.gallery_positions_, self.holdout_positions_ = gallery, holdout
        self.indexes_, normalisers, ratios, used = [], [], [], []
        for position, features in enumerate(train_features):
            features = as_float32(features)
            index = KnnIndex(self.k, metric=self.metric).fit(features[gallery])
            held = index.score(features[holdout])
            s = float(held.mean())
            if not s > 0:  # collapsed snapshot: nothing to separate, no scale (module docstring)
                continue
            used.append(position)
            # Train scores for the threshold: holdout images against the gallery,
            # gallery images leave-one-out within it.
            own = np.empty(n, dtype=np.float64)
            own[holdout] = held
            own[gallery] = index.train_scores()
            self.indexes_.append(index)
            normalisers.append(s)
            ratios.append(own / s)
        if not used:
            raise ValueError("every SES snapshot's held-out normal images sit on their neighbours (collapsed "
                             "features, or duplicate images): SES cannot normalise")
        self.snapshots_used_ = np.asarray(used, dtype=np.int64)
        self.n_snapshots = len(train_features)
        self.normalisers_ = np.asarray(normalisers, dtype=np.float64)
        self._train_ratios = np.stack(ratios)
        return self

    def score(self, query_features: Sequence[np.ndarray]) -> SesScores:
        """One (M, D) array per snapshot (same M images) -> max normalised score and the winning snapshot."""
        if self.normalisers_ is None:
            raise RuntimeError("SesScorer.score called before fit")
        if len(query_features) != self.n_snapshots:
            raise ValueError(f"expected features from {self.n_snapshots} snapshots, got {len(query_features)}")
        used = [query_features[i] for i in self.snapshots_used_]
        normalised = np.stack([index.score(q) / s for index, q, s in zip(self.indexes_, used, self.normalisers_)])
        return self._scores(normalised)

    def train_scores(self) -> SesScores:
        """The same for the normal training images (holdout vs gallery, gallery leave-one-out)."""
        if self._train_ratios is None:
            raise RuntimeError("SesScorer.train_scores called before fit")
        return self._scores(self._train_ratios)

    def _scores(self, normalised: np.ndarray) -> SesScores:
        """(U, M) ratios of the used snapshots -> max and the winning snapshot's index among all of them."""
        return SesScores(scores=normalised.max(axis=0), choice=self.snapshots_used_[normalised.argmax(axis=0)],
                         normalised=normalised)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, np.ndarray]:
        """Arrays that rebuild the scorer: galleries (T, G, D), normalisers (T,), split, train ratios."""
        if self.normalisers_ is None:
            raise RuntimeError("SesScorer.state called before fit")
        return {
            "galleries": np.stack([index.gallery_ for index in self.indexes_]),
            "normalisers": self.normalisers_,
            "gallery_positions": self.gallery_positions_,
            "holdout_positions": self.holdout_positions_,
            "train_ratios": self._train_ratios,
            "snapshots_used": self.snapshots_used_,
            "snapshot_count": np.asarray([self.n_snapshots], dtype=np.int64),
        }

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], k: int, holdout: float, seed: int,
                   metric: str = "euclidean") -> "SesScorer":
        scorer = cls(k, holdout, seed, metric)
        scorer.indexes_ = [KnnIndex(k, metric=metric).fit(gallery) for gallery in arrays["galleries"]]
        scorer.normalisers_ = np.asarray(arrays["normalisers"], dtype=np.float64)
        scorer.gallery_positions_ = np.asarray(arrays["gallery_positions"])
        scorer.holdout_positions_ = np.asarray(arrays["holdout_positions"])
        scorer._train_ratios = np.asarray(arrays["train_ratios"], dtype=np.float64)
        # Models saved before collapsed snapshots were left out used every snapshot.
        count = len(scorer.indexes_)
        scorer.snapshots_used_ = np.asarray(arrays.get("snapshots_used", np.arange(count)), dtype=np.int64)
        scorer.n_snapshots = int(np.asarray(arrays.get("snapshot_count", [count])).reshape(-1)[0])
        used = scorer.snapshots_used_
        if len(used) != count or (count and not 0 <= used.min() <= used.max() < scorer.n_snapshots):
            raise ValueError(f"SES state names snapshots {used.tolist()} of {scorer.n_snapshots} for {count} galleries")
        return scorer
