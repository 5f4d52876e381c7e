"""The papers' evaluation protocols as runnable benchmarks, with JSON results.

``run_bench(method, dataset_spec, options, ...)`` fits a detector on the
normal training images of each task, scores the test images and reports image
ROC AUC (and pixel AUROC / PRO for segmentation detectors), with timings.

Data set specs:

* ``mvtec:<dir>`` — an MVTec AD category folder (``bottle/``), or the root
  holding several categories (then each category is a task);
* ``oneclass:<root>`` — one folder per class; each class in turn is normal,
  all other classes are the anomalies (``core.datasets.read_class_folders``);
* ``fmnist:<dir>`` — Fashion-MNIST IDX files, classes 0-9.

Methods come from the registry (``core.detectors.METHODS``): :data:`BENCH_METHODS`
maps each preset of each method (``dn2``, ``dn2-kmeans``, ``panda-ses``, ...) to
a function ``BenchOptions -> Detector``. ``--param key=value`` pairs become
settings fields (:func:`core.config.apply_params`).

Feature reuse: in a one-class protocol the test set is the same for every
normal class. Detectors that can be fitted from extracted features
(:class:`~core.detectors.mixins.FeatureDetector`: DN2, Gaussian) therefore
get every distinct image of all tasks extracted **once**, and each task only
selects rows. Other detectors (SPADE, PANDA) are fitted and scored per task.
With ``feature_cache`` the extracted features are also kept on disk (npz),
so DN2 and Gaussian runs on the same data share one extraction.

Timing (``report["timing"]``): ``images_per_s`` is end to end (decode,
backbone, scoring); ``backbone_images_per_s`` is the bare forward pass on a
random batch of the same size, timed just before and just after the run
(mean; both in ``backbone_images_per_s_before_after``). With shared
extraction, ``backbone_images_per_s_in_run`` also times the forward passes of
the extraction itself (:class:`~core.features.ExtractionTiming`):
its ratio to ``images_per_s`` shows how much decoding was hidden behind the
network, and it is immune to a shared machine's load drifting during the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from core import config
from core.backbones import Features, get_spec
from core.config import FeatureSettings, SpadeSettings
from core.datasets import (
    FASHION_MNIST_CLASSES,
    ImageSet,
    list_classes,
    read_class_folders,
    read_fashion_mnist,
    read_mvtec,
    stratified_positions,
)
from core.detectors import METHODS, MethodInfo, Preset, preset_settings
from core.detectors.base import Detector, SegmentationDetector
from core.detectors.mixins import FeatureDetector
from core.features import (
    ExtractionTiming,
    FeatureRequest,
    extract_features,
    extractor_for,
    image_size_for,
    select_features,
)
from core.images import ImageSize, crop_box, map_to_original, probe_size
from core.metrics import image_auroc, segmentation_metrics
from core.npz_io import NpzFileError, open_npz, write_npz
from core.progress import CancelFn, ProgressFn, check_cancel

PhaseProgress = Callable[[str], "ProgressFn | None"]
"""Makes the progress callback of one named phase ("extract", "fit bottle", ...)."""


# --------------------------------------------------------------------------- options and settings


@dataclass(frozen=True)
class BenchOptions:
    """What a benchmark run asks of a method, independent of the method.

    ``backbone``/``weights``/``device``/``batch_size``: None keep the method's
    defaults. ``params``: ``--param key=value`` pairs for the settings
    (:func:`core.config.apply_params`). ``epochs``: training length for adapting methods
    (PANDA). ``outliers``: a data set spec or folder of outlier images
    (PANDA-OE).
    """

    backbone: str | None = None
    weights: str | None = None
    device: str | None = None
    batch_size: int | None = None
    seed: int = 0
    params: Mapping[str, str] = field(default_factory=dict)
    epochs: int | None = None
    outliers: str | None = None
    # Choose the method's settings for each task from its normal images first
    # (``core.tuning``: synthetic defects, no test image read); SPADE only.
    tune: bool = False
    # With tune: called with each geometry the tuner fitted (the development suite measures the
    # proxy's fidelity with it); never used to choose.
    audit: Callable[..., None] | None = None
    # With tune: this many defective and as many good test images (random, by ``seed``) are marked evidence
    # for the tuner (``core.tuning.marked``) and left out of the evaluation.
    labelled: int = 0
    # With tune: the tuner's progress lines (each geometry's best and its seconds) go here.
    log: Callable[[str], None] | None = None

    def settings(self, settings_type: type, base: Any = None) -> Any:
        """Settings of ``settings_type`` (or ``base``) with these options' backbone/weights/device/seed and params."""
        return config.settings_for(
            settings_type, base, backbone=self.backbone, weights=self.weights, device=self.device,
            batch_size=self.batch_size, seed=self.seed, params=self.params,
        )


def _factory(info: MethodInfo, preset: Preset) -> Callable[[BenchOptions], Detector]:
    """A bench factory for one preset of a registered method.

    Adapting methods (PANDA) take their length from ``--epochs`` (else their settings' own); strategy
    "oe" needs ``--outliers`` (a folder or zip of outlier images).
    """

    def make(options: BenchOptions) -> Detector:
        base = preset_settings(preset, info)
        if info.adaptation and options.epochs:  # else the settings' own length (the measured default)
            base = dataclasses.replace(base, epochs=options.epochs)
        detector = info.make(options.settings(info.settings_type, base))
        if info.adaptation and detector.settings.strategy == "oe":
            if not options.outliers:
                raise ValueError(f"{preset.name} needs --outliers (a folder or zip of outlier images)")
            from core.datasets import read_folder, read_zip

            source = Path(options.outliers)
            detector.outliers = read_zip(source, label=1) if source.suffix.lower() == ".zip" else read_folder(source, label=1)
        return detector

    return make


BENCH_METHODS: dict[str, Callable[[BenchOptions], Detector]] = {
    preset.name: _factory(info, preset) for info in METHODS.values() for preset in info.bench_presets
}
"""Benchmark name -> detector factory, one per preset of each registered method (``core.detectors.METHODS``)."""


# --------------------------------------------------------------------------- data set specs


@dataclass(frozen=True)
class BenchTask:
    """One normal class / category: its normal training images and its labelled test images."""

    name: str
    train: ImageSet
    test: ImageSet


def _pick_classes(available: Sequence[str], wanted: Sequence[str] | None, what: str) -> list[str]:
    """Class names chosen by name (any case) or index; all when ``wanted`` is empty."""
    if not wanted:
        return list(available)
    lowered = [name.lower() for name in available]
    chosen = []
    for token in wanted:
        token = token.strip()
        if token.isdigit() and token not in available:
            index = int(token)
            if not 0 <= index < len(available):
                raise ValueError(f"{what} index {index} out of range 0-{len(available) - 1}")
            chosen.append(available[index])
        elif token.lower() in lowered:
            chosen.append(available[lowered.index(token.lower())])
        else:
            raise ValueError(f"unknown {what} {token!r}; choose from: {', '.join(available)} (or their indices)")
    return chosen


def _subsample(task: BenchTask, max_train: int | None, max_test: int | None, seed: int) -> BenchTask:
    train, test = task.train, task.test
    if max_train is not None and len(train) > max_train:
        train = train.sample(max_train, seed)
    if max_test is not None and len(test) > max_test:
        # Stratified by group (defect type / class) so every kind of anomaly stays represented.
        groups = np.unique(np.array([str(g) for g in test.groups]), return_inverse=True)[1]
        test = test.subset(stratified_positions(groups, max_test, np.random.default_rng([seed, 1])))
    return BenchTask(task.name, train, test)


def _is_mvtec_category(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def load_tasks(
    spec: str,
    classes: Sequence[str] | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> list[BenchTask]:
    """The tasks of a data set spec (see the module docstring), subsampled when asked."""
    kind, _, location = spec.partition(":")
    if not location:
        raise ValueError(f"data set spec {spec!r} must look like mvtec:<dir>, oneclass:<root> or fmnist:<dir>")
    root = Path(location).expanduser()
    tasks: list[BenchTask] = []
    if kind == "mvtec":
        if _is_mvtec_category(root):
            tasks = [BenchTask(root.name, *read_mvtec(root))]
        else:
            if not root.is_dir():
                raise FileNotFoundError(f"{root}: folder not found")
            categories = sorted(p.name for p in root.iterdir() if _is_mvtec_category(p))
            if not categories:
                raise ValueError(f"{root}: neither an MVTec AD category nor a folder of categories")
            chosen = _pick_classes(categories, classes, "category")
            tasks = [BenchTask(name, *read_mvtec(root / name)) for name in chosen]
            classes = None
    elif kind == "oneclass":
        names = _pick_classes(list_classes(root), classes, "class")
        tasks = [BenchTask(name, *read_class_folders(root, name, seed=seed)) for name in names]
    elif kind == "fmnist":
        names = _pick_classes(list(FASHION_MNIST_CLASSES), classes, "class")
        tasks = []
        for name in names:
            index = FASHION_MNIST_CLASSES.index(name)
            train, test = read_fashion_mnist(root, index, max_train=max_train, max_test=max_test, seed=seed)
            tasks.append(BenchTask(name, train, test))
    else:
        raise ValueError(f"unknown data set kind {kind!r} in {spec!r}; use mvtec:, oneclass: or fmnist:")
    if kind == "mvtec" and classes:
        raise ValueError("--classes picks categories of an MVTec root folder, not of a single category")
    tasks = [_subsample(task, max_train, max_test, seed) for task in tasks]
    for task in tasks:
        if len(task.train) < 2 or not task.test.has_labels or len(set(task.test.labels.tolist())) < 2:
            raise ValueError(f"task {task.name!r}: needs at least 2 training images and a test set with both labels")
    return tasks


# --------------------------------------------------------------------------- timing helpers


def backbone_throughput(settings: FeatureSettings, batch_size: int, repeats: int = 2) -> float:
    """Images per second of the bare forward pass (no decoding) on one batch of ``batch_size``.

    Measured after one warm-up batch, in the same process and conditions as
    the benchmark, so end-to-end throughput can be compared against it.
    """
    extractor = extractor_for(settings)
    size = image_size_for(settings)
    images = torch.rand(batch_size, 3, size.crop, size.crop, generator=torch.Generator().manual_seed(0))
    extractor(images)
    start = time.perf_counter()
    for _ in range(repeats):
        extractor(images)
    return batch_size * repeats / (time.perf_counter() - start)


def _environment() -> dict[str, Any]:
    from core.knn import choose_backend

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "device": device, "torch_threads": torch.get_num_threads(), "knn_backend": choose_backend(),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------- feature sharing


def _item_key(item) -> str:
    return item.path if item.path is not None else item.name


def _cache_file(
    cache_dir: Path, settings: FeatureSettings, extractor_identity: str, keys: list[str], spec: str
) -> Path:
    size = image_size_for(settings)
    fingerprint = json.dumps(
        {"backbone": settings.backbone, "weights": extractor_identity, "resize": size.resize, "crop": size.crop,
         "precision": settings.precision,
         "spec": spec, "items": hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()},
        sort_keys=True,
    )
    return cache_dir / f"features-{settings.backbone}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}.npz"


def _load_cached(path: Path, keys: list[str], request: FeatureRequest) -> Features | None:
    """The cached features of ``keys`` when ``path`` holds them; None (recompute) for a missing,
    stale or damaged file, whose stage arrays are then never read."""
    if not path.is_file():
        return None
    try:
        with open_npz(path, "feature cache") as npz:
            stored = [name[len("stage_"):] for name in npz.names if name.startswith("stage_")]
            if npz.array("keys").tolist() != keys or not set(request.stages) <= set(stored):
                return None
            maps = {stage: torch.from_numpy(npz.array(f"stage_{stage}")) for stage in request.stages}
            return Features(maps=maps, pooled=torch.from_numpy(npz.array("pooled")))
    except NpzFileError:
        return None


def _save_cached(path: Path, keys: list[str], features: Features) -> None:
    write_npz(path, {"keys": np.array(keys), "pooled": features.pooled.numpy(),
                     **{f"stage_{stage}": value.numpy() for stage, value in features.maps.items()}})


def _shared_features(
    tasks: list[BenchTask],
    detector: FeatureDetector,
    spec: str,
    feature_cache: Path | None,
    phase: PhaseProgress,
    cancel: CancelFn | None,
) -> tuple[Features, dict[str, int], ExtractionTiming, bool]:
    """Features of every distinct image of all tasks: (features, key -> row, timing, cache hit)."""
    rows: dict[str, int] = {}
    items = []
    for task in tasks:
        for item in [*task.train, *task.test]:
            key = _item_key(item)
            if key not in rows:
                rows[key] = len(items)
                items.append(item)
    keys = list(rows)
    settings = detector.settings.features
    request = detector.feature_request()
    cacheable = feature_cache is not None and (request.pool_stages or not request.stages)
    path = None
    if cacheable:
        # Pool every stage when caching, so any pooled-feature method can reuse the file.
        request = FeatureRequest(get_spec(settings.backbone).stage_names, pool_stages=True)
        path = _cache_file(feature_cache, settings, detector.extractor().weights_identity, keys, spec)
        cached = _load_cached(path, keys, request)
        if cached is not None:
            return cached, rows, ExtractionTiming(), True
    union = ImageSet([_renamed(item, index) for index, item in enumerate(items)], name="bench")
    timing = ExtractionTiming()
    features = extract_features(
        union, settings, request.stages, request.pool_stages, phase("extract"), cancel, detector.extractor(), timing
    )
    if path is not None:
        _save_cached(path, keys, features)
    return features, rows, timing, False


def _renamed(item, index: int):
    # Items of different tasks may share a relative name (train/good/000.png of two categories).
    return dataclasses.replace(item, name=f"{index:07d}/{item.name}")


# --------------------------------------------------------------------------- the run


def marked_positions(test: ImageSet, n: int, seed: int) -> list[int]:
    """Positions of ``n`` defective and ``n`` good test images drawn at random (``seed``), sorted. The draws are
    nested: the images marked for a smaller ``n`` are among those for a larger one."""
    rng = np.random.default_rng([seed, 3])
    labels = test.labels
    chosen = []
    for label in (1, 0):
        members = np.flatnonzero(labels == label)
        if len(members) <= n:
            raise ValueError(f"--labelled {n} needs more than {n} {'defective' if label else 'good'} test images, "
                             f"the test set has {len(members)}")
        chosen.extend(int(i) for i in rng.permutation(members)[:n])
    return sorted(chosen)


def split_marked(test: ImageSet, n: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(evidence, rest): the :func:`marked_positions` images as marked evidence, and every other test image,
    which alone is evaluated."""
    chosen = marked_positions(test, n, seed)
    rest = sorted(set(range(len(test))) - set(chosen))
    return test.subset(chosen), test.subset(rest)


def _tuned(detector: Detector, task: BenchTask, entry: dict[str, Any], options: BenchOptions,
           cancel: CancelFn | None, marked: ImageSet | None = None) -> Detector:
    """A detector of the same method with settings tuned on ``task.train`` (and ``marked`` evidence, if any);
    the table goes in ``entry``."""
    from core.tuning import tune_spade

    result = tune_spade(task.train, base=detector.settings, seed=detector.settings.seed, cancel=cancel,
                        audit=options.audit, marked=marked, log=options.log)
    entry["tuning"] = result.summary()
    entry["tune_s"] = result.seconds
    tuned = type(detector)(result.settings)
    tuned.tuning_ = result.summary()
    return tuned


def _segmentation(
    detector: SegmentationDetector, task: BenchTask, phase: PhaseProgress, cancel: CancelFn | None
) -> tuple[np.ndarray, dict[str, Any], float]:
    """Image scores, pixel metrics (with per-stage ablation) and seconds for a segmentation detector.

    ``pixel_auroc``/``pro`` compare each map, resampled to its image's original
    size, with the original mask; the per-stage ``ablation`` is computed at the
    map's own resolution (cheaper, and only compared within itself).
    """
    start = time.perf_counter()
    scores, maps = detector.score_and_maps(task.test, phase(f"score {task.name}"), cancel)
    seconds = time.perf_counter() - start
    size = detector.image_size
    masks = task.test.masks(size)
    result: dict[str, Any] = {}
    if masks.any():
        originals, original_maps = _at_original_size(task.test, maps, size)
        overall = segmentation_metrics(originals, original_maps)
        result.update(pixel_auroc=overall.pixel_auroc, pro=overall.pro, pixel_resolution="original")
        ablation = {}
        for stage in detector.map_stages:
            metrics = segmentation_metrics(masks, detector.combined_maps(stages=(stage,)))
            ablation[stage] = {"pixel_auroc": metrics.pixel_auroc, "pro": metrics.pro}
        all_maps = segmentation_metrics(masks, detector.combined_maps(stages=None))
        ablation["all"] = {"pixel_auroc": all_maps.pixel_auroc, "pro": all_maps.pro}
        result["ablation"] = ablation
        result["ablation_resolution"] = f"{size.crop}x{size.crop} map"
    result["seconds_per_image"] = seconds / len(task.test)
    return np.asarray(scores, dtype=np.float64), result, seconds


def segmentation_figures(images: ImageSet, scores: np.ndarray, maps: np.ndarray, size: ImageSize,
                         keep: Sequence[int] | None = None) -> dict[str, float]:
    """Image AUROC, and pixel AUROC and PRO at the images' original resolution, of the images at positions
    ``keep`` (None = all) from (N,) scores and (N, crop, crop) maps of ``images`` (as ``bench`` reports them)."""
    keep = list(range(len(images))) if keep is None else list(keep)
    subset = images.subset(keep)
    figures = {"image_auroc": image_auroc(subset.labels, np.asarray(scores)[keep])}
    if any(item.has_mask for item in subset):
        originals, resampled = _at_original_size(subset, maps[keep], size)
        found = segmentation_metrics(originals, resampled)
        figures.update(pixel_auroc=found.pixel_auroc, pro=found.pro)
    return figures


def _at_original_size(
    images: ImageSet, maps: np.ndarray, size: ImageSize
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image: its original-resolution mask and its map resampled onto it, both cut to what the model saw.

    (N, crop, crop) maps -> lists of (H_i', W_i') bool masks and float32 maps,
    where (H_i', W_i') is the part of the original image the crop covers (all
    of it unless the geometry centre-crops).
    """
    masks, resampled = [], []
    for index, item in enumerate(images):
        mask = item.load_mask() if item.has_mask else None
        if mask is not None:
            hw = mask.shape
        elif item.array is not None:
            hw = item.array.shape[:2]
        else:
            hw = probe_size(item.path if item.path is not None else item.data, name=item.name)
        if mask is None:
            mask = np.zeros(hw, dtype=bool)
        top, left, bottom, right = crop_box(hw, size)
        full = map_to_original(maps[index], hw, size)
        masks.append(mask[top:bottom, left:right])
        resampled.append(full[top:bottom, left:right])
    return masks, resampled


def run_bench(
    method: str,
    dataset: str,
    options: BenchOptions = BenchOptions(),
    classes: Sequence[str] | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    feature_cache: str | os.PathLike | None = None,
    phase: PhaseProgress | None = None,
    cancel: CancelFn | None = None,
) -> dict[str, Any]:
    """Run one method on one data set spec; return the JSON-able results (see the module docstring)."""
    if method not in BENCH_METHODS:
        raise KeyError(f"unknown bench method {method!r}; choose one of: {', '.join(BENCH_METHODS)}")
    phase = phase or (lambda name: None)
    factory = BENCH_METHODS[method]
    template = factory(options)  # validates params before any data is read
    if options.tune and not isinstance(template.settings, SpadeSettings):
        raise ValueError(f"--tune chooses SPADE's settings; method {method!r} has none to tune")
    if options.labelled and not options.tune:
        raise ValueError("--labelled gives the tuner marked evidence: it needs --tune")
    tasks = load_tasks(dataset, classes, max_train, max_test, options.seed)
    settings = template.settings
    feature_settings: FeatureSettings | None = getattr(settings, "features", None)
    # The bare forward pass is timed before and after the run and averaged: on a shared
    # machine the load drifts, and one moment could flatter or penalise either side.
    bare_before = backbone_throughput(feature_settings, feature_settings.batch_size) if feature_settings else None

    results: list[dict[str, Any]] = []
    fit_s = score_s = extract_s = 0.0
    n_images = 0
    shared = isinstance(template, FeatureDetector)
    info = METHODS.get(template.method)
    adapting = info is not None and info.adaptation
    cache_hit = False
    if shared:
        cache_dir = Path(feature_cache) if feature_cache is not None else None
        features, rows, extraction, cache_hit = _shared_features(tasks, template, dataset, cache_dir, phase, cancel)
        extract_s = extraction.total_s
        n_images = len(rows)
    for task in tasks:
        check_cancel(cancel)
        detector = factory(options)
        labels = task.test.labels
        entry: dict[str, Any] = {"name": task.name, "n_train": len(task.train), "n_test": len(task.test)}
        if shared:
            train_features = select_features(features, [rows[_item_key(item)] for item in task.train])
            test_features = select_features(features, [rows[_item_key(item)] for item in task.test])
            start = time.perf_counter()
            detector.fit_features(train_features)
            fit_s += time.perf_counter() - start
            start = time.perf_counter()
            scores = detector.score_features(test_features)
            score_s += time.perf_counter() - start
        else:
            if options.tune:
                marked = None
                if options.labelled:
                    marked, rest = split_marked(task.test, options.labelled, options.seed)
                    task, labels = BenchTask(task.name, task.train, rest), rest.labels
                    entry.update(n_test=len(rest), n_marked=len(marked), marked=list(marked.names))
                detector = _tuned(detector, task, entry, options, cancel, marked)
            start = time.perf_counter()
            if adapting:  # PANDA: the labelled test set only feeds its per-epoch curves
                detector.fit(task.train, phase(f"fit {task.name}"), cancel, test=task.test)
                entry["curves"] = [record.to_dict() for record in detector.curves_]
                entry["kept"] = {key: detector.summary_.get(key) for key in ("kept_epoch", "adapted_epoch", "kept_reason", "fused")}
            else:
                detector.fit(task.train, phase(f"fit {task.name}"), cancel)
            fit_s += time.perf_counter() - start
            if isinstance(detector, SegmentationDetector):
                scores, pixel, seconds = _segmentation(detector, task, phase, cancel)
                entry.update(pixel)
            else:
                start = time.perf_counter()
                scores = detector.score(task.test, phase(f"score {task.name}"), cancel)
                seconds = time.perf_counter() - start
            score_s += seconds
            n_images += len(task.test)
        entry["image_auroc"] = image_auroc(labels, scores)
        results.append(entry)

    timing: dict[str, Any] = {"fit_s": fit_s, "score_s": score_s}
    if shared:
        # Every distinct image went through decode + backbone once; scoring is kNN/Mahalanobis only.
        timing.update(protocol="shared extraction", extract_s=extract_s, n_images=n_images, feature_cache_hit=cache_hit)
        timing["images_per_s"] = n_images / (extract_s + score_s) if extract_s > 0 else None
    else:
        timing.update(protocol="per task", n_images=n_images)
        timing["images_per_s"] = n_images / score_s if score_s > 0 else None
    if feature_settings is not None:
        bare_after = backbone_throughput(feature_settings, feature_settings.batch_size)
        timing["backbone_images_per_s"] = (bare_before + bare_after) / 2
        timing["backbone_images_per_s_before_after"] = [bare_before, bare_after]
        if timing["images_per_s"]:
            timing["end_to_end_over_backbone"] = timing["images_per_s"] / timing["backbone_images_per_s"]
        # The forward passes of the extraction itself (same batches, same moment): their share
        # of the wall time shows how well decoding hid behind the backbone.
        in_run = extraction.backbone_images_per_s if shared else None
        if in_run is not None and timing["images_per_s"]:
            timing["backbone_images_per_s_in_run"] = in_run
            timing["end_to_end_over_backbone_in_run"] = timing["images_per_s"] / in_run

    report: dict[str, Any] = {
        "method": method,
        "backbone": feature_settings.backbone if feature_settings is not None else None,
        "dataset": dataset,
        "settings": dataclasses.asdict(settings),
        "options": {
            "seed": options.seed, "max_train": max_train, "max_test": max_test,
            "classes": list(classes) if classes else None, "params": dict(options.params),
            "epochs": options.epochs, "outliers": options.outliers, "labelled": options.labelled,
        },
        "results": results,
        "mean_image_auroc": float(np.mean([r["image_auroc"] for r in results])),
        "timing": timing,
        "environment": _environment(),
    }
    if any("pixel_auroc" in r for r in results):
        report["mean_pixel_auroc"] = float(np.mean([r["pixel_auroc"] for r in results if "pixel_auroc" in r]))
        report["mean_pro"] = float(np.mean([r["pro"] for r in results if "pro" in r]))
    return report
