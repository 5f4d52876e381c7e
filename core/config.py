"""Settings of every method, as frozen dataclasses.

Defaults follow the papers (PANDA: Reiss et al., CVPR 2021; Gaussian: Rippel
et al., ICPR 2020) unless a comment says why not. The CLI and the dashboard
build these; nothing below the CLI sees an argparse Namespace.

``--param key=value`` strings become settings fields through
:func:`apply_params` (type-checked against the dataclass), and
:func:`settings_for` applies the options every method shares (backbone,
weights, device, batch size, seed) — the CLI, the benchmarks and the
dashboard all build settings through them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from core.backbones import DEFAULT_BACKBONE, get_spec, list_backbones, require_device, usable_device
from core.knn import KNN_METRICS


ASPECTS = {"stretch": "squash", "pad": "keep (letterbox)"}
"""How an image becomes the square a backbone reads (``FeatureSettings.aspect``), name -> label."""


@dataclass(frozen=True)
class FeatureSettings:
    """Which backbone and which input geometry a detector uses.

    ``weights``: None resolves pretrained weights automatically; a path loads a
    local file; ``"random"`` uses random weights (tests only).
    ``resize``/``crop``: None take the backbone's own sizes (256 -> 224 for most).
    ``aspect``: "stretch" squashes every image to a square (the papers' way);
    "pad" keeps its aspect ratio on a grey square canvas (needs ``crop == resize``).
    ``tile``: above this input side the backbone runs on overlapping tiles whose
    feature maps are stitched (bounded memory at native resolution); 0 = never.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    resize: int | None = None
    crop: int | None = None
    aspect: str = "stretch"
    tile: int = 0
    batch_size: int = 32
    device: str | None = None
    # The dtype the backbone computes in, for extraction and PANDA training alike:
    # "auto" (what was measured faster at equal scores: bfloat16 for extraction on CPUs
    # with native bfloat16 and on GPUs, float32 for PANDA's training steps on a CPU),
    # "float32", "bfloat16" (autocast) or "float16" (GPU only). Measurements in
    # core.backbones.resolve_precision and the README's PANDA section.
    precision: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("aspect", self.aspect, ASPECTS)
        _check_geometry(self)
        # A device this machine lacks (a model fitted on a GPU, loaded on a laptop) becomes the best one
        # here, with a note; a device asked for on a command line was already refused (require_device).
        object.__setattr__(self, "device", usable_device(self.device))


MAX_INPUT_SIDE = 4096
"""Largest resize, crop and tile side: one 4096² image is 200 MB as a float tensor before the backbone
multiplies it (20,000² asked for 4.5 GB per image). Larger images are resized down to the geometry."""


def _check_geometry(features: FeatureSettings) -> None:
    """Refuse, when settings are made (fitting, or loading a model file), a geometry no machine can run."""
    from core.tiling import ALIGN

    for name in ("resize", "crop"):
        value = getattr(features, name)
        if value is not None and not 1 <= value <= MAX_INPUT_SIDE:
            raise ValueError(f"{name} must be between 1 and {MAX_INPUT_SIDE} pixels (or none: the backbone's), "
                             f"got {value}")
    if features.resize is not None and features.crop is not None and features.crop > features.resize:
        raise ValueError(f"crop ({features.crop}) cannot be larger than resize ({features.resize})")
    if features.crop is not None and features.resize is None and features.backbone in list_backbones():
        spec = get_spec(features.backbone)  # crop alone keeps the backbone's resize/crop ratio (image_size_for)
        if features.crop * spec.resize_size / spec.input_size > MAX_INPUT_SIDE + 0.5:
            raise ValueError(f"crop {features.crop} resizes images to more than {MAX_INPUT_SIDE} pixels "
                             f"({spec.name}'s ratio {spec.resize_size}/{spec.input_size}); set resize as well")
    if features.tile and not (ALIGN <= features.tile <= MAX_INPUT_SIDE and features.tile % ALIGN == 0):
        raise ValueError(f"tile must be 0 (never tile) or a multiple of {ALIGN} pixels up to {MAX_INPUT_SIDE}, "
                         f"got {features.tile}")


def _check_choice(name: str, value: str, choices: Collection[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")


@dataclass(frozen=True)
class DN2Settings:
    """DN2: kNN (k=2) on pooled final features (PANDA paper, Sec. 3)."""

    features: FeatureSettings = FeatureSettings()
    k: int = 2
    # "exact": every normal image; "kmeans": the paper's K-means summary of the gallery;
    # "centre": squared distance to the mean feature (the paper's simpler alternative).
    gallery: str = "exact"
    n_means: int = 50
    target_fpr: float = 0.05
    seed: int = 0
    # Train scores of the "kmeans" gallery come from this many folds: means fitted
    # without a fold score that fold (a K-means per left-out image would be too slow).
    cv_folds: int = 5
    # "euclidean" (the paper's) or "cosine": pooled vectors scaled to unit length before
    # the gallery is built. Cosine helped Fashion-MNIST (+0.8 mean ROC AUC, Lite2 224²) and
    # bottle, and cost DeepPCB 0.4-1.8 and its crops 3.0-3.3 (README, DN2's distance), so it is a choice.
    metric: str = "euclidean"

    def __post_init__(self) -> None:
        _check_choice("gallery", self.gallery, ("exact", "kmeans", "centre"))
        _check_choice("metric", self.metric, KNN_METRICS)
        _check_positive("k", self.k)
        _check_positive("n_means", self.n_means)
        _check_fraction("target_fpr", self.target_fpr)
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be at least 2, got {self.cv_folds}")


@dataclass(frozen=True)
class GaussianSettings:
    """Rippel et al.: per-stage Gaussian with Ledoit-Wolf shrinkage, Mahalanobis score.

    ``stages``: stage names to use; empty = all stages of the backbone (their
    Table: all levels summed works best); the name ``"pooled"`` stands for the
    final pooled vector, which ``include_pooled`` adds to any choice. ``reduction``: "none", "pca" (keep the
    components carrying ``variance`` of the total) or "npca" (keep those carrying
    the *smallest* ``variance`` share — their finding is that these matter most).
    """

    features: FeatureSettings = FeatureSettings()
    stages: tuple[str, ...] = ()
    include_pooled: bool = True
    reduction: str = "none"
    variance: float = 0.01
    target_fpr: float = 0.05
    # "fpr": empirical threshold at target_fpr from leave-one-out (or held-out) normal
    # scores; "chi2": Rippel's Eq. 8, sqrt(chi2.ppf(1 - target_fpr, dof)), one stage only.
    threshold_rule: str = "fpr"
    # Train scores with a reduction come from this many folds (the projection is refitted
    # without each fold); without a reduction they are exact leave-one-out (closed form).
    cv_folds: int = 5

    def __post_init__(self) -> None:
        _check_choice("reduction", self.reduction, ("none", "pca", "npca"))
        _check_choice("threshold_rule", self.threshold_rule, ("fpr", "chi2"))
        _check_fraction("variance", self.variance)
        _check_fraction("target_fpr", self.target_fpr)
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be at least 2, got {self.cv_folds}")


PANDA_STRATEGIES = {
    "early": "Early: stop after a fixed number of epochs, or at the epoch the normal-only signal picks",
    "ses": "SES: sample-wise early stopping over snapshots",
    "ewc": "EWC: penalise changes to weights ImageNet relied on",
    "oe": "OE: push outlier images away (needs outlier images)",
}
"""PANDA's strategies and what each does: the one list the settings, the CLI, the registry and the Adapt page read."""

KEEP_RULES = {
    "signal": "trained, or pretrained + trained fused, by the normal-only signal",
    "fuse": "always both networks, scores fused",
    "last": "always the trained network (paper)",
}
"""What a PANDA model keeps of its run (``PandaSettings.keep_rule``): the settings and the Adapt page read this list."""


MEASURED_FEATURES = FeatureSettings(backbone="efficientnet_lite2", resize=224, crop=224)
"""PANDA's default features: EfficientNet-Lite2 squashed to 224² (the Table 6 protocol, docs/RESULTS-panda.md)."""


@dataclass(frozen=True)
class PandaSettings:
    """PANDA: fine-tune the last stages for compactness (Reiss et al., Sec. 3.2; supplement Sec. 2.1).

    The defaults are the protocol measured best here (issue 24, docs/RESULTS-panda.md): Lite2 at 224², the
    cosine kNN, SES over snapshots every 2 epochs of a 16-epoch run at lr 0.1 (about the paper's SES span, see
    ``lr``), EWC's proximal step with a 25-minibatch Fisher, and the normal-only signal's choice between the
    trained and the pretrained network. :func:`paper_panda_settings` is the paper's protocol.

    ``strategy``: "early" (fixed training length), "ses" (sample-wise early
    stopping over snapshots), "ewc" (Fisher-weighted penalty on weight changes)
    or "oe" (outlier exposure: a linear head trained against an outlier set).
    ``trainable``: pieces to fine-tune; empty = the backbone's ``default_trainable``.
    Training length: ``epochs`` when positive, else ``minibatches`` when positive,
    else the paper's count for the strategy (2.3k minibatches for Early, 150k
    samples for SES, 7.8k minibatches for EWC, 75 CIFAR-10 epochs for OE), which
    scales the epochs inversely with the size of the normal set.
    ``snapshot_every``: epochs between SES snapshots; 0 = the paper's 5 CIFAR-10
    epochs (25k samples), again scaled by the size of the normal set.
    Momentum, weight decay, clip and minibatch are the paper's; its supplement gives no learning rate for
    PANDA (1e-2 is the authors' public default). The clip (1e-3) makes a step move the weights about lr/1000,
    so lr 0.1 for 16 epochs covers about the paper's SES span (150k samples at 1e-2). OE uses its own learning
    rate and weight decay (supplement: 0.1, none).
    ``ewc_step``: "gradient" puts the EWC penalty in the loss as the paper does;
    "proximal" applies its exact proximal step after each SGD step instead,
    which stays stable when the learning rate times lambda*F is large (e.g. a
    schedule compressed by a higher learning rate).
    ``cache_dtype``: "float32", "float16" or "auto" (float16 once the float32
    prefix cache would exceed ``cache_budget_mb``).
    ``early_rule``: where Early stops: "fixed" (the paper: after ``epochs`` /
    ``minibatches``) or "auto" (chosen from held-out normal images, no test
    labels; ``epochs`` is then the most it trains, see :mod:`core.adaptation.stopping`).
    ``stop_holdout``: share of the normal images "auto" keeps out of training to
    watch (they still join the kNN gallery); it stops at the first epoch where
    their mean distance to the centre is ``stop_fraction`` of the pretrained one.
    ``fisher_source``: where EWC's Fisher comes from when no file is given:
    "pool" (the classifier's own predictions on a diverse offline image pool,
    the stand-in for ImageNet) or "normal" (the normal training images).
    ``autocast``: older models' switch for bfloat16; ``features.precision`` replaces it.
    ``metric``: the kNN distance every score uses (DN2 at epoch 0, Early, SES, EWC):
    "euclidean" (the paper's) or "cosine" (unit-length features; see DN2Settings).
    The compactness loss and the distance-to-centre curves stay Euclidean.
    ``keep_rule``: "signal" keeps what Early, SES or EWC trained when a
    normal-only signal (held-out normal images against probe images,
    :mod:`core.adaptation.signals`) says it beats the pretrained network
    (epoch 0, DN2's features); otherwise the pretrained network, scoring
    together with the last epoch trained (:mod:`core.adaptation.fusion`: each
    kNN score standardised on the normal images' own, then added, the trained
    one weighted 0.3). "fuse": always both networks, fused so; "last": the
    strategy's own result, as in the paper. OE always keeps its result.
    """

    features: FeatureSettings = MEASURED_FEATURES
    strategy: str = "ses"
    trainable: tuple[str, ...] = ()
    epochs: int = 16
    minibatches: int = 0
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    grad_clip: float = 1e-3
    k: int = 2
    snapshot_every: int = 2
    ses_holdout: float = 0.1
    ewc_lambda: float = 1e4
    ewc_step: str = "proximal"
    fisher_file: str | None = None
    fisher_batches: int = 25
    oe_lr: float = 0.1
    oe_weight_decay: float = 0.0
    prefix_cache: bool = True
    cache_dtype: str = "auto"
    cache_budget_mb: int = 2048
    autocast: bool = False
    early_rule: str = "fixed"
    stop_holdout: float = 0.1
    stop_fraction: float = 0.1
    fisher_source: str = "pool"
    metric: str = "cosine"
    keep_rule: str = "signal"
    keep_margin: float = 0.0
    seed: int = 0
    target_fpr: float = 0.05

    def __post_init__(self) -> None:
        _check_choice("strategy", self.strategy, tuple(PANDA_STRATEGIES))
        _check_choice("keep_rule", self.keep_rule, tuple(KEEP_RULES))
        _check_choice("cache_dtype", self.cache_dtype, ("auto", "float32", "float16"))
        _check_choice("ewc_step", self.ewc_step, ("gradient", "proximal"))
        _check_choice("early_rule", self.early_rule, ("fixed", "auto"))
        _check_choice("fisher_source", self.fisher_source, ("pool", "normal"))
        _check_choice("metric", self.metric, KNN_METRICS)
        _check_fraction("stop_holdout", self.stop_holdout)
        _check_fraction("stop_fraction", self.stop_fraction)
        for name in ("k", "batch_size", "fisher_batches", "cache_budget_mb"):
            _check_positive(name, getattr(self, name))
        for name in ("epochs", "minibatches", "snapshot_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be zero (automatic) or positive, got {getattr(self, name)}")
        for name in ("lr", "grad_clip", "oe_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("momentum", "weight_decay", "ewc_lambda", "oe_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        _check_fraction("ses_holdout", self.ses_holdout)
        _check_fraction("target_fpr", self.target_fpr)


def paper_panda_settings() -> PandaSettings:
    """The paper's PANDA protocol as this project encodes it: the default backbone at its own geometry, the
    Euclidean kNN, lr 1e-2, the paper's minibatch counts (scaled to the normal set), SES snapshots every 25k
    samples, Early after a fixed length, the penalty in the loss, and the strategy's result always kept."""
    return PandaSettings(features=FeatureSettings(), strategy="early", epochs=0, lr=1e-2, snapshot_every=0,
                         early_rule="fixed", keep_rule="last", metric="euclidean", ewc_step="gradient",
                         ewc_lambda=1e4, fisher_batches=100)


SPADE_GALLERIES = ("exact", "kmeans", "ivf-flat", "ivf-pq", "gaussian", "auto")
SPADE_COMBINATIONS = ("sum", "concat")
SPADE_IMAGE_SCORES = ("dn2", "max", "topk", "mix", "fused")
"""SPADE's image-level rules (see ``core.detectors.spade.image_score``); the one list the detector, the tuner and
the pages read."""
SPADE_POOLED = ("dn2", "model")


@dataclass(frozen=True)
class SpadeSettings:
    """SPADE: per-pixel kNN against normal pixels of the same stage (PANDA paper, Sec. 2.3; supplement 2.3).

    Defaults are the best trade-off we measured on MVTec bottle with Lite0 on a
    2-core CPU, not the paper's setup (Wide-ResNet50, 256 -> 224); the
    measurements are in the README's results section.

    ``strides``: feature stages by stride (the paper's "first three blocks" = 4, 8, 16).
    ``k``: pixel neighbours; a pixel's score is the sum of squared L2 distances to its
    k nearest normal pixels. ``top_images``: search only the pixels of the K normal
    images nearest by pooled feature (SPADE's K = 50); 0 = every normal image.
    ``gallery``: "exact" keeps every normal pixel; "kmeans" replaces each stage's
    pixels by ``n_means`` K-means centres (the paper's speed-up; ``top_images`` unused);
    "ivf-flat" / "ivf-pq": every normal pixel in a FAISS inverted file (``ivf_lists`` lists,
    0 = about √pixels; ``ivf_probe`` searched per query), IVF-PQ compressing each pixel to
    channels / ``pq_dims`` one-byte codes (``top_images`` unused); "auto": "exact" when its
    float16 gallery fits ``max_gallery_bytes``, else "ivf-pq" (IVF-Flat, float32, is never
    smaller than the float16 exact gallery); "gaussian": no search, a Gaussian per cell of the
    normal images (PaDiM's model) and each pixel's Mahalanobis distance to its own cell's: for
    lines whose parts sit in the same place in every image.
    ``patch_pixels``: average each stage's features over a neighbourhood about this
    many input pixels wide before the search (an odd number of cells: 5 at stride 4,
    3 at stride 8, 1 at stride 16 for 24); 0 = the paper's single-cell features. The
    local context is PatchCore's idea rather than SPADE's; on bottle it adds 2-6 PRO points.
    ``combine``: "sum" adds per-stage maps (the paper's ensemble); "concat" joins the
    stages' features at the finest stage's resolution into one search.
    ``normalise``: rescale each stage's distances by the mean and spread of normal-pixel
    distances before summing (the paper sums raw distances; the rescaled sum was
    better in every multi-stage setting we measured).
    ``sigma``: Gaussian smoothing in pixels of a 224-pixel crop, scaled with the crop.
    ``image_score``: "dn2" (pooled-feature kNN with ``image_k``), "max" (the heatmap's peak),
    "topk" (mean of the heatmap's top 0.5 %) or "mix" (DN2 + peak, each standardised on normal
    images); see ``core.detectors.spade.image_score``. ``python -m core tune`` picks one per data set.
    ``image_sigma``: the smoothing of the heatmap the map-based image scores read (None = ``sigma``).
    ``pixel_fpr``: share of normal pixels allowed above the mask threshold, calibrated on
    ``calibration_images`` normal images each scored without itself.
    ``max_gallery_bytes``: refuse (with advice, naming the sizes) a pixel gallery larger than this.
    ``cache_mb``: memory for the cached raw maps of scored images.
    """

    # Resize to 256 without cropping: MVTec defects near the border stay in view
    # (bottle, Lite0: +0.4 pixel AUROC, +0.8 PRO over 256 -> 224).
    features: FeatureSettings = FeatureSettings(resize=256, crop=256)
    # The paper's strides 4 + 8 + 16. Against 8 + 16 (bottle, Lite0, idle 2-core CPU): pixel
    # AUROC 98.80 vs 98.51, PRO 96.41 vs 95.82, 0.116 vs 0.103 s per image, fit 28 vs 24 s.
    strides: tuple[int, ...] = (4, 8, 16)
    k: int = 1
    top_images: int = 10
    # K-means matched the exact top-10 search on bottle within 0.1 point (strides 8 + 16) and
    # searches faster; 2048 centres rather than 1024 add 0.07 pixel AUROC and 0.16 PRO with the
    # stride-4 stage. gallery="exact" gives exact explanations.
    gallery: str = "kmeans"
    n_means: int = 2048
    ivf_lists: int = 0
    ivf_probe: int = 8
    pq_dims: int = 4
    patch_pixels: int = 24
    combine: str = "sum"
    normalise: bool = True
    sigma: float = 4.0
    image_score: str = "dn2"
    # None = the heatmap's σ. On DeepPCB the tuner found σ 4 best for locating defects but σ 2 for
    # ranking boards (synthetic image AUROC 0.853 against 0.834), so the two may differ.
    image_sigma: float | None = None
    image_k: int = 2
    # Where the pooled image evidence (the "dn2" rule, the pooled half of "mix" and "fused", and the K nearest
    # images of an exact gallery) is read: "dn2" = at the backbone's own geometry (256 -> 224 centre crop: the
    # DN2 detector's score exactly), one more backbone pass per image when the model's input differs;
    # "model" = pooled over the model's own input (no extra pass; models saved before this setting).
    pooled: str = "model"
    # Nuisance copies (core.nuisance: the normal images' own brightness, contrast and focus spread, a small shift
    # and turn) of each calibration image join the normal scores the image threshold is placed on, so normal
    # variation the fit set did not show does not raise the false-positive rate; 0 = none.
    nuisance_copies: int = 0
    target_fpr: float = 0.05
    pixel_fpr: float = 0.01
    calibration_images: int = 16
    max_gallery_bytes: int = 2 * 1024**3
    cache_mb: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("gallery", self.gallery, SPADE_GALLERIES)
        _check_choice("combine", self.combine, SPADE_COMBINATIONS)
        _check_choice("image_score", self.image_score, SPADE_IMAGE_SCORES)
        _check_choice("pooled", self.pooled, SPADE_POOLED)
        if not self.strides:
            raise ValueError("strides must name at least one stage stride")
        for name in ("k", "n_means", "image_k", "calibration_images", "max_gallery_bytes", "cache_mb",
                     "ivf_probe", "pq_dims"):
            _check_positive(name, getattr(self, name))
        if self.ivf_lists < 0:
            raise ValueError(f"ivf_lists must be 0 (about √pixels) or positive, got {self.ivf_lists}")
        if self.nuisance_copies < 0:
            raise ValueError(f"nuisance_copies must be 0 or more, got {self.nuisance_copies}")
        if self.top_images < 0:
            raise ValueError(f"top_images must be 0 (every normal image) or positive, got {self.top_images}")
        if self.patch_pixels < 0:
            raise ValueError(f"patch_pixels must be >= 0 (0 = single feature cells), got {self.patch_pixels}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.image_sigma is not None and self.image_sigma < 0:
            raise ValueError(f"image_sigma must be >= 0 or None (= sigma), got {self.image_sigma}")
        _check_fraction("target_fpr", self.target_fpr)
        _check_fraction("pixel_fpr", self.pixel_fpr)


MethodSettings = DN2Settings | GaussianSettings | PandaSettings | SpadeSettings
"""The settings of any registered method (``core.detectors.METHODS`` names each one's type)."""

Settings = TypeVar("Settings", DN2Settings, GaussianSettings, PandaSettings, SpadeSettings)

# --------------------------------------------------------------------------- building settings


class ParamError(ValueError):
    """A ``--param key=value`` names no settings field or has a value of the wrong type."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(text: str, annotation: Any, key: str) -> Any:
    """Parse ``text`` as a value of the type ``annotation`` (a resolved type hint)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if type(None) in typing.get_args(annotation) and text.strip().lower() in ("none", "null", ""):
            return None
        errors = []
        for option in options:
            try:
                return _convert(text, option, key)
            except ParamError as error:
                errors.append(str(error))
        raise ParamError(f"--param {key}={text!r}: " + "; ".join(errors))
    if origin is tuple:
        args = typing.get_args(annotation)
        item_type = args[0] if args else str
        parts = [part.strip() for part in text.split(",") if part.strip()]
        return tuple(_convert(part, item_type, key) for part in parts)
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ParamError(f"--param {key}={text!r}: expected true or false")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ParamError(f"--param {key}={text!r}: expected {annotation.__name__}") from None
    if annotation is str:
        return text
    raise ParamError(f"--param {key}: fields of type {annotation} cannot be set from the command line")


def apply_params(settings: Any, params: Mapping[str, str]) -> Any:
    """A copy of the frozen ``settings`` with ``key=value`` strings applied.

    Keys are field names; nested settings use dots (``features.backbone``).
    Values are converted to the field's type: ints, floats, booleans
    (true/false), ``none`` for optional fields, comma-separated tuples
    (``stages=block4,block6``). Unknown keys raise :class:`ParamError` listing
    the valid ones.
    """
    for key, text in params.items():
        if key.split(".")[-1] == "device" and str(text).strip().lower() not in ("none", "null", ""):
            require_device(str(text).strip(), f"--param {key}")  # asked for by name: it must exist here
    return _apply_all(settings, [(key.split("."), str(text), key) for key, text in params.items()])


def _apply_all(settings: Any, changes: list[tuple[list[str], str, str]]) -> Any:
    """``settings`` with every ``(path, text, key)`` change applied in one replace per settings group.

    One replace, not one per key: fields checked together (crop <= resize) must not be refused
    half-way, e.g. ``features.resize=64`` before ``features.crop=64`` when the default crop is 256.
    """
    hints = typing.get_type_hints(type(settings))
    names = [f.name for f in dataclasses.fields(settings)]
    values: dict[str, Any] = {}
    groups: dict[str, list[tuple[list[str], str, str]]] = {}
    for path, text, key in changes:
        name = path[0]
        if name not in names:
            valid = ", ".join(param_names(settings))
            raise ParamError(f"unknown setting {key!r} for {type(settings).__name__}; valid: {valid}")
        current = getattr(settings, name)
        if len(path) > 1:
            if not dataclasses.is_dataclass(current):
                raise ParamError(f"unknown setting {key!r}: {name} has no sub-settings")
            groups.setdefault(name, []).append((path[1:], text, key))
        elif dataclasses.is_dataclass(current):
            example = dataclasses.fields(current)[0].name
            raise ParamError(f"setting {key!r} is a group; set its fields, e.g. {key}.{example}=...")
        else:
            values[name] = _convert(text, hints[name], key)
    for name, group in groups.items():
        values[name] = _apply_all(getattr(settings, name), group)
    try:
        return dataclasses.replace(settings, **values)
    except (TypeError, ValueError) as error:  # the settings' own validation
        given = ", ".join(f"--param {key}={text!r}" for path, text, key in changes if len(path) == 1)
        raise ParamError(f"{given or type(settings).__name__}: {error}") from error


def param_names(settings: Any, prefix: str = "") -> list[str]:
    """Every settable key of ``settings``, nested ones dotted (``features.backbone``)."""
    names = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            names.extend(param_names(value, f"{prefix}{f.name}."))
        else:
            names.append(prefix + f.name)
    return names


def settings_for(
    settings_type: type[Settings],
    base: Settings | None = None,
    *,
    backbone: str | None = None,
    weights: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    values: Mapping[str, Any] | None = None,
    params: Mapping[str, str] | None = None,
) -> Settings:
    """Settings of ``settings_type`` (or a copy of ``base``) with the shared options applied: the one builder.

    ``backbone``/``weights``/``device``/``batch_size``/``seed``: None keep the
    method's default. ``values``: typed field values (``{"k": 3}``), for
    callers that hold them already (the dashboard's widgets); ``params``:
    ``key=value`` strings from a command line (:func:`apply_params`), applied last.
    The CLI (``fit``, ``segment``, ``tune``), the benchmarks and the dashboard's
    pages all build settings here; a method's type is ``METHODS[name].settings_type``.
    """
    settings = base if base is not None else settings_type()
    if device is not None:
        require_device(device, "device")
    features = getattr(settings, "features", None)
    if isinstance(features, FeatureSettings):
        changes = {name: value for name, value in (("backbone", backbone), ("weights", weights), ("device", device),
                                                   ("batch_size", batch_size)) if value is not None}
        settings = dataclasses.replace(settings, features=dataclasses.replace(features, **changes))
    if seed is not None and "seed" in {f.name for f in dataclasses.fields(settings)}:
        settings = dataclasses.replace(settings, seed=seed)
    if values:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(settings)})
        if unknown:
            raise ParamError(f"unknown settings {unknown} for {type(settings).__name__}")
        settings = dataclasses.replace(settings, **values)
    return apply_params(settings, params or {})
