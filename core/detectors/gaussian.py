"""Gaussian / Mahalanobis detector (Rippel, Mertens, Merhof, ICPR 2020).

Each chosen stage's feature map is globally average pooled to one vector per
image; a Gaussian (mean + Ledoit-Wolf shrunk covariance, optionally after
PCA / NPCA) is fitted per stage on normal images, and an image's score is the
sum over stages of its Mahalanobis distances (their "sum" mode). The pseudo
stage ``"pooled"`` is the backbone's final pooled vector.

Train scores (for the empirical threshold):

* no reduction — exact leave-one-out in closed form
  (:func:`core.mahalanobis.leave_one_out_distances`; only the Ledoit-Wolf
  intensity is held at its full-data value);
* PCA / NPCA — ``cv_folds``-fold cross-fitting, projection refitted per fold
  (:func:`core.mahalanobis.cross_fitted_distances`).

Threshold rules (``GaussianSettings.threshold_rule``):

* ``"fpr"``  — the target-FPR quantile of the train (or held-out) scores;
* ``"chi2"`` — Rippel's Eq. 8 for a single stage: ``sqrt(chi2.ppf(1 - fpr, dof))``.
  It assumes the features are Gaussian; :meth:`GaussianDetector.chi2_report`
  shows the FPR it really gives on held-out normal images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.backbones import Features, get_spec
from core.config import GaussianSettings
from core.datasets import ImageSet
from core.detectors.base import ModelFileError
from core.detectors.mixins import FeatureDetector
from core.features import POOLED, FeatureRequest, pooled_stage
from core.mahalanobis import (
    GaussianModel,
    chi2_threshold,
    cross_fitted_distances,
    fit_gaussian,
    leave_one_out_distances,
)
from core.metrics import fpr_at_threshold


class GaussianDetector(FeatureDetector):
    """Per-stage Gaussians on pooled features. Fitted: ``models_`` {stage: GaussianModel}, ``stage_train_scores_``."""

    method = "gaussian"
    settings_type = GaussianSettings

    def __init__(self, settings: GaussianSettings | None = None) -> None:
        super().__init__(settings)
        self.models_: dict[str, GaussianModel] = {}
        self.stage_train_scores_: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ stages
    @property
    def stages(self) -> tuple[str, ...]:
        """The stages scored, in backbone order, ``"pooled"`` last when used."""
        s = self.settings
        spec = get_spec(s.features.backbone)
        chosen = list(s.stages) if s.stages else list(spec.stage_names)
        for name in chosen:
            if name != POOLED:
                spec.stage(name)  # raises KeyError naming the valid stages
        if s.include_pooled and POOLED not in chosen:
            chosen.append(POOLED)
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"stages listed twice: {chosen}")
        if s.threshold_rule == "chi2" and len(chosen) != 1:
            raise ValueError(
                f"threshold_rule='chi2' needs exactly one stage (the chi-square law holds for one Gaussian, not a "
                f"sum of distances); got {chosen}. Choose e.g. stages=('pooled',) or stages=('block6',), "
                "include_pooled=False"
            )
        return tuple(chosen)

    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(stages=tuple(name for name in self.stages if name != POOLED), pool_stages=True)

    # ------------------------------------------------------------------ fit
    def fit_features(self, features: Features, holdout: Features | None = None) -> "GaussianDetector":
        """Fit one Gaussian per stage on pooled features of N normal images."""
        s = self.settings
        models: dict[str, GaussianModel] = {}
        train: dict[str, np.ndarray] = {}
        for stage in self.stages:
            vectors = pooled_stage(features, stage)
            models[stage] = fit_gaussian(vectors, s.reduction, s.variance)
            if s.reduction == "none":
                train[stage] = leave_one_out_distances(vectors)
            else:
                train[stage] = cross_fitted_distances(vectors, s.reduction, s.variance, s.cv_folds)
        self.models_ = models
        self.stage_train_scores_ = train
        total = self._summed(train)
        holdout_scores = self._summed(self._distances(holdout)) if holdout is not None else None
        self._set_threshold(total, holdout_scores)
        return self

    def _place_threshold(self, target_fpr: float) -> None:
        """Chi-square rule: Eq. 8 at ``target_fpr``; otherwise the empirical quantile of the normal scores."""
        super()._place_threshold(target_fpr)
        if self.settings.threshold_rule == "chi2":
            self.threshold_ = self._chi2_threshold(target_fpr)
            if self.holdout_scores_ is not None:
                self.holdout_fpr_ = fpr_at_threshold(self.holdout_scores_, self.threshold_)

    def _chi2_threshold(self, target_fpr: float) -> float:
        (stage,) = tuple(self.models_)
        return chi2_threshold(target_fpr, self.models_[stage].dof)

    # ------------------------------------------------------------------ score
    def stage_scores_features(self, features: Features) -> dict[str, np.ndarray]:
        """Pooled features of M images -> {stage: (M,) Mahalanobis distances}."""
        self._require_fitted()
        return self._distances(features)

    def _distances(self, features: Features) -> dict[str, np.ndarray]:
        return {stage: model.distances(pooled_stage(features, stage)) for stage, model in self.models_.items()}

    @staticmethod
    def _summed(per_stage: dict[str, np.ndarray]) -> np.ndarray:
        return np.sum(list(per_stage.values()), axis=0).astype(np.float64)

    def score_features(self, features: Features) -> np.ndarray:
        """Pooled features of M images -> (M,) sum of the stages' Mahalanobis distances."""
        return self._summed(self.stage_scores_features(features))

    def stage_scores(self, images: ImageSet, progress=None, cancel=None) -> dict[str, np.ndarray]:
        """ImageSet of M images -> {stage: (M,) distances}; their sum is :meth:`score`."""
        self._require_fitted()
        return self.stage_scores_features(self.extract(images, progress, cancel))

    # ------------------------------------------------------------------ working point report
    def chi2_report(self, holdout: ImageSet | Features, progress=None, cancel=None) -> dict[str, Any]:
        """How Rippel's chi-square threshold (Eq. 8) fares on held-out normal images.

        For every stage: ``dof``, the chi-square ``threshold`` at the target FPR
        and the ``fpr`` it actually gives on ``holdout`` (which should all be
        normal). Top level: the target, the active rule and threshold, and the
        FPR the active threshold gives on ``holdout``.
        """
        self._require_fitted()
        features = holdout if isinstance(holdout, Features) else self.extract(holdout, progress, cancel)
        per_stage = self.stage_scores_features(features)
        target = self.settings.target_fpr
        stages = {}
        for stage, scores in per_stage.items():
            threshold = chi2_threshold(target, self.models_[stage].dof)
            stages[stage] = {
                "dof": self.models_[stage].dof,
                "shrinkage": self.models_[stage].shrinkage,
                "threshold": threshold,
                "fpr": fpr_at_threshold(scores, threshold),
            }
        total = self._summed(per_stage)
        return {
            "target_fpr": target,
            "n_images": int(len(total)),
            "threshold_rule": self.settings.threshold_rule,
            "threshold": self.threshold_,
            "fpr": fpr_at_threshold(total, self.threshold_),
            "stages": stages,
        }

    # ------------------------------------------------------------------ persistence
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        fields: dict[str, Any] = self._identity_header()
        arrays: dict[str, np.ndarray] = {}
        fields["stages"] = list(self.models_)
        fields["shrinkage"] = {stage: model.shrinkage for stage, model in self.models_.items()}
        for position, (stage, model) in enumerate(self.models_.items()):
            # Array names by position: stage names are free text to numpy's archive.
            arrays[f"s{position}_mean"] = model.mean
            arrays[f"s{position}_precision"] = model.precision
            arrays[f"s{position}_train"] = self.stage_train_scores_[stage]
            if model.basis is not None:
                arrays[f"s{position}_centre"] = model.centre
                arrays[f"s{position}_basis"] = model.basis
        return fields, arrays

    def _restore(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._restore_identity(header)
        stages = header.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ModelFileError("Gaussian model header lacks its stage list")
        models, train = {}, {}
        for position, stage in enumerate(stages):
            try:
                mean = arrays[f"s{position}_mean"].astype(np.float64)
                precision = arrays[f"s{position}_precision"].astype(np.float64)
                train[stage] = arrays[f"s{position}_train"].astype(np.float64)
            except KeyError as missing:
                raise ModelFileError(f"Gaussian model file lacks the array {missing} (stage {stage!r})") from None
            centre = arrays.get(f"s{position}_centre")
            basis = arrays.get(f"s{position}_basis")
            shrinkage = float(header.get("shrinkage", {}).get(stage, float("nan")))
            models[stage] = GaussianModel(mean, precision, shrinkage, centre, basis)
        self.models_ = models
        self.stage_train_scores_ = train
