"""PANDA as a detector: adapt the pretrained features to the normal set, then score like DN2.

``PandaDetector(PandaSettings(strategy=...))``:

* "early" / "ewc": train (Early: the paper's fixed length; EWC: with the
  Fisher-weighted penalty), then kNN (k = 2) to the adapted normal features;
* "ses": keep snapshots while training; an image's score is its largest
  normalised kNN score over the snapshots (:mod:`core.adaptation.ses`);
* "oe": train with a linear head against outlier images (``fit(...,
  outliers=...)``); the score is the head's output w.psi(x).

To score images that were not seen during training, the detector keeps the
trained weights of the trainable pieces (for SES, of every snapshot: only
those pieces, a few MB each for EfficientNet-Lite0) and re-runs the network;
the frozen pieces come from the backbone's pretrained weights, which the
saved model names and checks (like every other detector).

A fused model (``keep_rule="fuse"``, or "signal" when the signal gives back
the pretrained network) keeps the pretrained network's top (epoch 0) and the
adapted epoch's, with both normal feature sets, scores every image with both
networks and adds the two kNN scores, each standardised on the normal
images' own (:mod:`core.adaptation.fusion`).

Train scores (for the threshold) are leave-one-out kNN scores of the adapted
normal features (fused with the pretrained ones' when fusing); for SES the
holdout/leave-one-out ratios; for OE the head's
scores of the normal training images, which the head was fitted on and so
sit lower than those of unseen normal images: give ``holdout`` images for an
honest threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.adaptation.curves import EpochCallback, EpochRecord, curves_from_list, curves_to_list
from core.adaptation.fisher import FisherDiagonal
from core.adaptation.fusion import ScoreFusion
from core.adaptation.network import TrainableNetwork
from core.adaptation.outlier_exposure import head_scores
from core.adaptation.pipeline import AdaptationRun, adapt, compute_dtype, fused_model
from core.adaptation.prefix_cache import build_prefix_cache
from core.adaptation.ses import SesScorer
from core.adaptation.training import features_of
from core.config import PandaSettings
from core.datasets import ImageSet
from core.detectors.base import Detector, ModelFileError
from core.detectors.mixins import BackboneUser
from core.features import feature_identity
from core.knn import KnnIndex, as_float32
from core.progress import CancelFn, ProgressFn

_STATE = "state/"
_SES = "ses/"
_PRETRAINED = "pretrained/"


@dataclass(frozen=True)
class PandaScores:
    """``scores`` (N,) anomaly scores; ``choice`` (N,) winning SES snapshot (None for other strategies).

    A fused model also gives each network's own (N,) score: ``pretrained`` and ``adapted``.
    """

    scores: np.ndarray
    choice: np.ndarray | None
    pretrained: np.ndarray | None = None
    adapted: np.ndarray | None = None


class PandaDetector(BackboneUser, Detector):
    """PANDA-Early / SES / EWC / OE. Fitted: ``states_``, ``centre_``, ``gallery_`` or ``ses_`` or ``head_``, ``curves_``;
    when fusing also ``pretrained_state_``, ``pretrained_gallery_`` and ``fusion_``."""

    method = "panda"
    settings_type = PandaSettings

    def __init__(self, settings: PandaSettings | None = None) -> None:
        super().__init__(settings)
        self.trainable_: tuple[str, ...] = ()
        self.states_: list[dict[str, torch.Tensor]] = []
        self.state_epochs_: list[int] = []
        self.centre_: np.ndarray | None = None
        self.gallery_: np.ndarray | None = None
        self.ses_: SesScorer | None = None
        self.head_: dict[str, np.ndarray] | None = None
        self.curves_: list[EpochRecord] = []
        self.summary_: dict[str, Any] = {}
        self.train_choice_: np.ndarray | None = None
        self.pretrained_state_: dict[str, torch.Tensor] | None = None
        self.pretrained_gallery_: np.ndarray | None = None
        self.fusion_: ScoreFusion | None = None
        self.fisher_: FisherDiagonal | None = None  # EWC's Fisher of the last fit (not saved with the model)
        # Outlier exposure images fit uses when its ``outliers`` argument is None
        # (lets a benchmark factory supply them before the generic fit call).
        self.outliers: ImageSet | None = None
        self._index: KnnIndex | None = None
        self._pretrained_index: KnnIndex | None = None
        self._network: TrainableNetwork | None = None

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        normal: ImageSet,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        holdout: ImageSet | None = None,
        *,
        test: ImageSet | None = None,
        outliers: ImageSet | None = None,
        fisher: FisherDiagonal | None = None,
        fisher_reference: ImageSet | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> "PandaDetector":
        """Train on ``normal`` and set the gallery/snapshots and threshold.

        ``test`` (labelled) only feeds the curves (``curves_``); ``outliers`` is
        needed for "oe"; ``fisher``/``fisher_reference`` choose EWC's Fisher
        (default: ``settings.fisher_file``, else estimated on ``normal``).
        ``progress`` counts minibatches. A ``cancel`` during training keeps
        the weights trained so far (``summary_["cancelled"]``); a cancel while
        the prefix cache is built raises ``Cancelled``.
        """
        outliers = outliers if outliers is not None else self.outliers
        run = adapt(normal, self.settings, test=test, outliers=outliers, fisher=fisher,
                    fisher_reference=fisher_reference, on_epoch=on_epoch, progress=progress, cancel=cancel)
        return self.fit_run(run, holdout)

    def fit_run(self, run: AdaptationRun, holdout: ImageSet | None = None) -> "PandaDetector":
        """Become the detector of a finished :func:`~core.adaptation.pipeline.adapt` run (no retraining)."""
        if run.settings != self.settings:
            raise ValueError("the run was trained with other settings than this detector's")
        result = run.result
        self.identity_ = feature_identity(run.prepared.extractor, run.prepared.size)
        self.trainable_ = run.prepared.trainable
        self.centre_ = np.asarray(result.centre, dtype=np.float32)
        self.curves_ = list(result.records)
        self.fisher_ = run.fisher
        self._network = run.network
        self._index = self._pretrained_index = None
        self.gallery_, self.ses_, self.head_, self.train_choice_ = None, None, None, None
        self.pretrained_state_, self.pretrained_gallery_, self.fusion_ = None, None, None
        kept = run.kept
        zero, adapted = result.snapshots.get(0), result.snapshots.get(kept.adapted_epoch)
        if fused_model(self.settings, run.strategy, kept) and zero is not None and adapted is not None:
            # Both networks: the pretrained one (epoch 0) and the adapted epoch's kNN.
            self.states_, self.state_epochs_ = [adapted.state], [kept.adapted_epoch]
            self.gallery_ = as_float32(adapted.train_features)
            train = self._fuse_with_pretrained(zero, self._knn().train_scores())
        elif run.strategy == "ses" and not kept.pretrained:
            epochs = sorted(e for e in result.snapshots if e in run.schedule.snapshot_epochs)
            if not epochs:  # cancelled before the first snapshot: the weights as they are
                self.states_, self.state_epochs_ = [result.final_state], [result.epochs_done]
                trains = [result.final_train_features]
            else:
                self.states_ = [result.snapshots[e].state for e in epochs]
                self.state_epochs_ = epochs
                trains = [result.snapshots[e].train_features for e in epochs]
            s = self.settings
            self.ses_ = SesScorer(s.k, s.ses_holdout, s.seed, s.metric).fit(trains)
            train_scores = self.ses_.train_scores()
            train, self.train_choice_ = train_scores.scores, train_scores.choice
        else:
            # The final weights are those of the network kept (adapt() put them back): epoch 0 = DN2's features.
            self.states_ = [result.final_state]
            self.state_epochs_ = [kept.epoch]
            features = as_float32(result.final_train_features)
            if run.strategy == "oe":
                self.head_ = run.head
                train = head_scores(self.head_, features)
            else:
                self.gallery_ = features
                train = self._knn().train_scores()
        self.summary_ = {
            "strategy": run.strategy,
            "epochs": result.epochs_done,
            "minibatches": result.minibatches,
            "planned_epochs": run.schedule.epochs,
            "cancelled": result.cancelled,
            "state_epochs": list(self.state_epochs_),
            **kept.to_dict(),
            **({"kept_reason": f"{kept.reason}; scored together with epoch {kept.adapted_epoch}'s network "
                               f"(fused, its weight {self.fusion_.adapted_weight:g})"}
               if self.fusion_ is not None and kept.pretrained else {}),
            "fused": self.fusion_ is not None,
            "fusion": None if self.fusion_ is None else self.fusion_.to_dict(),
            "fisher_source": None if run.fisher is None else run.fisher.source,
            "fisher_statistics": None if run.fisher is None else run.fisher.statistics(),
            "cache": result.cache,
            "mean_epoch_seconds": result.mean_epoch_seconds,
            "peak_memory_bytes": result.peak_memory_bytes,
        }
        self.train_scores_ = np.asarray(train, dtype=np.float64)  # fitted from here on: holdout can be scored
        holdout_scores = self.score(holdout) if holdout is not None and len(holdout) else None
        self._set_threshold(train, holdout_scores)
        return self

    def _fuse_with_pretrained(self, zero, adapted_train: np.ndarray) -> np.ndarray:
        """Keep epoch 0's weights and (N, D) normal features (``zero``, a Snapshot); (N,) fused train scores.

        Both networks' normal scores are of the same N images in the same order
        (the snapshot's rows and the adapted gallery's, held-out ones included).
        """
        self.pretrained_state_ = zero.state
        self.pretrained_gallery_ = as_float32(zero.train_features)
        pretrained_train = self._pretrained_knn().train_scores()
        self.fusion_ = ScoreFusion.of_normal(pretrained_train, adapted_train)
        return self.fusion_.fuse(pretrained_train, adapted_train)

    # ------------------------------------------------------------------ score
    def _knn(self) -> KnnIndex:
        if self._index is None:
            self._index = KnnIndex(self.settings.k, device=self.settings.features.device,
                                   metric=self.settings.metric).fit(self.gallery_)
        return self._index

    def _pretrained_knn(self) -> KnnIndex:
        if self._pretrained_index is None:
            self._pretrained_index = KnnIndex(self.settings.k, device=self.settings.features.device,
                                              metric=self.settings.metric).fit(self.pretrained_gallery_)
        return self._pretrained_index

    def network(self) -> TrainableNetwork:
        """The private network the trained weights are loaded into (built from the pretrained backbone)."""
        if self._network is None:
            self._network = TrainableNetwork(self.extractor().copy_network(), self.trainable_)
        return self._network

    def query_features(self, images: ImageSet, progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> list[np.ndarray]:
        """(N, D) features of ``images``, one array per kept state (SES: per snapshot), then, when the model
        fuses, the pretrained network's."""
        self._require_fitted()
        network = self.network()
        s = self.settings
        # The frozen prefix runs once; each kept state re-runs only the trainable top.
        cache = build_prefix_cache(network, images, self.image_size, s.features.batch_size, s.cache_dtype,
                                   s.cache_budget_mb, progress, cancel)
        features = []
        states = self.states_ + ([self.pretrained_state_] if self.fusion_ is not None else [])
        for state in states:
            network.load_suffix_state(state)
            features.append(features_of(network, cache, max(s.features.batch_size, 64),
                                        compute_dtype(s, network.device)))
        return features

    def score_details(self, images: ImageSet, progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> PandaScores:
        """Scores of ``images``; for SES which snapshot gave each image its score; for a fused model each network's."""
        features = self.query_features(images, progress, cancel)
        if self.fusion_ is not None:
            pretrained = self._pretrained_knn().score(features.pop()).astype(np.float64)
            adapted = self._adapted_scores(features)
            return PandaScores(self.fusion_.fuse(pretrained, adapted.scores), adapted.choice, pretrained,
                               adapted.scores)
        return self._adapted_scores(features)

    def _adapted_scores(self, features: list[np.ndarray]) -> PandaScores:
        """The trained network's own scores of one (N, D) feature array per kept state."""
        if self.ses_ is not None:
            found = self.ses_.score(features)
            return PandaScores(found.scores.astype(np.float64), found.choice)
        if self.head_ is not None:
            return PandaScores(head_scores(self.head_, features[0]), None)
        return PandaScores(self._knn().score(features[0]).astype(np.float64), None)

    def score(self, images: ImageSet, progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> np.ndarray:
        """ImageSet of N images -> (N,) float64 scores, higher = more anomalous."""
        return self.score_details(images, progress, cancel).scores

    # ------------------------------------------------------------------ persistence
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        fields = {
            **self._identity_header(),
            "trainable": list(self.trainable_),
            "state_epochs": list(self.state_epochs_),
            "state_names": sorted(self.states_[0]),
            "curves": curves_to_list(self.curves_),
            "summary": self.summary_,
            "fusion": None if self.fusion_ is None else self.fusion_.to_dict(),
        }
        arrays: dict[str, np.ndarray] = {"centre": self.centre_}
        for i, state in enumerate(self.states_):
            for name, value in state.items():
                arrays[f"{_STATE}{i}/{name}"] = value.numpy()
        if self.gallery_ is not None:
            arrays["gallery"] = self.gallery_
        if self.ses_ is not None:
            arrays.update({_SES + key: value for key, value in self.ses_.state().items()})
        if self.head_ is not None:
            arrays.update({f"head/{key}": value for key, value in self.head_.items()})
        if self.fusion_ is not None:
            arrays[_PRETRAINED + "gallery"] = self.pretrained_gallery_
            arrays.update({f"{_PRETRAINED}state/{name}": value.numpy() for name, value in self.pretrained_state_.items()})
        return fields, arrays

    def _restore(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._restore_identity(header)
        try:
            self.trainable_ = tuple(header["trainable"])
            self.state_epochs_ = [int(e) for e in header["state_epochs"]]
            names = header["state_names"]
            self.states_ = [
                {name: torch.from_numpy(np.array(arrays[f"{_STATE}{i}/{name}"], dtype=np.float32)) for name in names}
                for i in range(len(self.state_epochs_))
            ]
            self.centre_ = as_float32(arrays["centre"][None], "centre")[0]
        except KeyError as missing:
            raise ModelFileError(f"PANDA model file lacks {missing}") from None
        self.curves_ = curves_from_list(header.get("curves", []))
        self.summary_ = dict(header.get("summary", {}))
        self.gallery_ = as_float32(arrays["gallery"], "gallery") if "gallery" in arrays else None
        ses = {key[len(_SES):]: value for key, value in arrays.items() if key.startswith(_SES)}
        s = self.settings
        try:
            self.ses_ = SesScorer.from_state(ses, s.k, s.ses_holdout, s.seed, s.metric) if ses else None
        except (KeyError, ValueError) as problem:
            raise ModelFileError(f"damaged PANDA SES state ({problem})") from None
        self.head_ = ({"weight": arrays["head/weight"], "bias": arrays["head/bias"]} if "head/weight" in arrays else None)
        if self.gallery_ is None and self.ses_ is None and self.head_ is None:
            raise ModelFileError("PANDA model file has neither a gallery, SES snapshots nor an OE head")
        self._restore_fusion(header.get("fusion"), arrays)
        self._index = self._pretrained_index = None
        self._network = None

    def _restore_fusion(self, values: dict[str, Any] | None, arrays: dict[str, np.ndarray]) -> None:
        """The pretrained network's part of a fused model (models saved without fusion have none)."""
        self.pretrained_state_, self.pretrained_gallery_, self.fusion_ = None, None, None
        if values is None:
            return
        prefix = f"{_PRETRAINED}state/"
        state = {key[len(prefix):]: torch.from_numpy(np.array(value, dtype=np.float32))
                 for key, value in arrays.items() if key.startswith(prefix)}
        if _PRETRAINED + "gallery" not in arrays or not state:
            raise ModelFileError("fused PANDA model file lacks the pretrained network's gallery or weights")
        try:
            self.fusion_ = ScoreFusion.from_dict(values)
        except (KeyError, TypeError, ValueError) as problem:
            raise ModelFileError(f"damaged PANDA fusion scales ({problem})") from None
        self.pretrained_gallery_ = as_float32(arrays[_PRETRAINED + "gallery"], "pretrained gallery")
        self.pretrained_state_ = state
