"""Choose SPADE's settings for a line from its normal images alone, and never quietly do worse than the defaults.

A QA engineer rarely has labelled defects, and settings chosen on one category
do not carry over (bottle's 256² squash loses a 640² board's small defects).
:func:`tune_spade` therefore:

1. holds out some normal images and builds a proxy set from them
   (:mod:`core.tuning.proxy`): painted synthetic defects with exact masks,
   and nuisance copies (the line's own brightness, contrast, focus and a
   small shift and turn) on the normal side;
2. for each input geometry (resolution; letterbox or squash for non-square
   images, decided at the smallest resolution) fits SPADE on the remaining
   normal images and scores the proxy set once (backbone + kNN);
3. from those cached raw maps, scores every stage subset x σ by the mean of
   pixel AUROC and PRO (cheap: no backbone, no kNN);
4. takes the best, charging deviations from the base settings and preferring
   the cheaper geometry unless a dearer one wins by :data:`GAIN_FOR_COST`;
5. keeps the base settings unless that best beats them by more than the
   proxy's own noise: a paired bootstrap over the proxy images must put the
   gain :data:`MARGIN_Z` standard deviations above zero.

What synthetic defects may decide was measured on the development lines
(``python -m core bench-suite``; docs/RESULTS.md): their ranking of geometry,
stages and σ by pixel AUROC and PRO follows the real defects', their ranking
of image scores does not (painted defects are sharper than real ones and
reward heatmap peaks, while on BSData the real defects move the pooled
features more than any painted one). So the image score is not chosen here:
every tuned model uses :data:`IMAGE_RULE`, the pooled evidence and the
heatmap's evidence each counted in units of its spread over normal images,
chosen leave-one-line-out on the development lines.

Nothing from a test set is read: the only input is the normal ImageSet.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from core.config import SpadeSettings
from core.datasets import ImageSet
from core.detectors.spade import SpadeDetector
from core.images import ImageError, probe_size
from core.progress import CancelFn, check_cancel
from core.nuisance import measure_variation
from core.tuning.pixel_counts import bootstrap_weights
from core.tuning.marked import SHORTLIST, MarkedImages, choose_marked, cross_validate, score_marked
from core.tuning.proxy import NUISANCE, PAINTED, Candidate, Evidence, ProxySet, evaluate_geometry, proxy_set

GAIN_FOR_COST = 0.01
"""A dearer geometry must beat a cheaper one by this much of (pixel AUROC + PRO) / 2."""

DEVIATION_COST = 0.002
"""Charged for a stage set other than the base settings', and per octave σ moves from the base's (half
this): synthetic defects are a proxy, so a near-tie keeps the measured defaults."""

MARGIN_Z = 2.0
"""A departure from the base settings must beat them by this many bootstrap standard deviations of the
paired gain (chosen leave-one-line-out on the development lines, docs/RESULTS.md)."""

BOOTSTRAP_RESAMPLES = 200

IMAGE_RULE = "fused"
"""The image score of every tuned model (see the module docstring)."""

POOLED = "dn2"
"""Where a tuned model reads its pooled evidence: DN2's own geometry, whatever the heatmaps' input size."""

NUISANCE_COPIES = 2
"""Nuisance copies of each calibration image a tuned model places its image threshold on (see ``core.nuisance``):
on the demo bottle set, without them 44 % of nuisance copies of held-out normals were flagged at a 10 % target,
with three copies 15 %."""

SECOND_GALLERY = "gaussian"
"""A second way to keep normal pixels, tried at the best geometry: a Gaussian per cell (PaDiM's model)."""

RESOLUTIONS = (256, 384, 512, 640)
"""Input sides tried, up to :data:`UPSCALE_LIMIT` times the images' median long side."""

UPSCALE_LIMIT = 2.0
"""Small images may be enlarged up to this factor: the backbone's stride-4 cells then cover fewer image
pixels, so small defects span more of them (random 140-640 px crops of DeepPCB: 512² beat the native 384²)."""

PATIENCE = 2
"""Stop trying larger inputs once this many larger sizes in a row have not won (each costs more than the last)."""

EVAL_SIDE = 320
"""Maps and masks are compared at the image's aspect ratio with this long side (or the native one if smaller)."""

Log = Callable[[str], None]
Audit = Callable[[SpadeDetector, ProxySet, list[Candidate]], None]
"""Called with each geometry's fitted detector and its candidates (the development suite scores real test
images with it to measure how faithful the proxy is); never used to choose."""


@dataclass(frozen=True)
class Margin:
    """The chosen candidate against the base settings' on bootstrap resamples of the proxy set: ``gain``
    (mean of the paired differences of the objective), ``spread`` (their standard deviation), ``wins`` (share
    of resamples where it won) and ``z`` = gain / spread."""

    gain: float
    spread: float
    wins: float
    resamples: int = BOOTSTRAP_RESAMPLES

    @property
    def z(self) -> float:
        return self.gain / self.spread if self.spread > 0 else (math.inf if self.gain > 0 else 0.0)

    def to_dict(self) -> dict[str, float]:
        return {"gain": self.gain, "spread": self.spread, "wins": self.wins, "z": self.z, "resamples": self.resamples}


@dataclass
class TuneResult:
    """The chosen settings, every candidate's row, the base settings' row, and why the choice was made."""

    settings: SpadeSettings
    candidates: list[Candidate]
    chosen: Candidate
    reference: Candidate
    reason: str
    kept_base: bool
    margin: Margin | None
    seconds: float
    n_fit: int
    n_holdout: int
    n_synthetic: int
    n_nuisance: int = 0
    geometry_seconds: dict[str, float] = field(default_factory=dict)
    marked: dict[str, Any] | None = None
    """With marked real defects: how many, what the proxy alone chose, what they chose, and the
    cross-validated figures of that choice (see :mod:`core.tuning.marked`)."""
    shortlist: list[Candidate] = field(default_factory=list, repr=False)
    """The candidates marked images choose among (the proxy's best first, the base settings' included)."""
    marked_scores: dict = field(default_factory=dict, repr=False)
    """Candidate -> :class:`~core.tuning.marked.MarkedScores`, for choices with part of the marked images."""

    def summary(self) -> dict[str, Any]:
        """JSON-able record, saved in the model header and printed by ``python -m core tune``."""
        return {
            "chosen": self.chosen.to_dict(),
            "reference": self.reference.to_dict(),
            "kept_base": self.kept_base,
            "margin": None if self.margin is None else self.margin.to_dict(),
            "margin_z": MARGIN_Z,
            "image_rule": IMAGE_RULE,
            "reason": self.reason,
            "seconds": self.seconds,
            "n_fit": self.n_fit,
            "n_holdout": self.n_holdout,
            "n_synthetic": self.n_synthetic,
            "n_nuisance": self.n_nuisance,
            "marked": self.marked,
            "candidates": [c.to_dict() for c in self.candidates],
        }


# --------------------------------------------------------------------------- data


def _sizes(normal: ImageSet) -> list[tuple[int, int]]:
    """(H, W) of every normal image from its header (cheap); unreadable ones are skipped."""
    sizes = []
    for item in normal:
        try:
            if item.array is not None:
                sizes.append((int(item.array.shape[0]), int(item.array.shape[1])))
            else:
                sizes.append(probe_size(item.path if item.path is not None else item.data, name=item.name))
        except ImageError:
            continue
    if not sizes:
        raise ValueError("none of the normal images could be read")
    return sizes


def geometry_candidates(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, str]]:
    """(resolution, aspect) pairs to try, cheapest first: resolutions up to :data:`UPSCALE_LIMIT` times the
    median native long side (at least 256); non-square images (any aspect off by more than 5 %) also try
    the letterbox."""
    longest = float(np.median([max(h, w) for h, w in sizes]))
    resolutions = [r for r in RESOLUTIONS if r == RESOLUTIONS[0] or r <= longest * UPSCALE_LIMIT]
    non_square = any(abs(h / w - 1.0) > 0.05 for h, w in sizes)
    aspects = ("pad", "stretch") if non_square else ("stretch",)
    return [(r, a) for r in resolutions for a in aspects]


def _split(normal: ImageSet, seed: int, max_fit: int, max_holdout: int) -> tuple[ImageSet, ImageSet]:
    n = len(normal)
    if n < 6:
        raise ValueError(f"tuning needs at least 6 normal images (some are held out as synthetic defects), got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_hold = int(min(max_holdout, max(3, round(0.15 * n))))
    hold = sorted(int(i) for i in order[:n_hold])
    fit = sorted(int(i) for i in order[n_hold : n_hold + max_fit])
    return normal.subset(fit), normal.subset(hold)


# --------------------------------------------------------------------------- the choice


def _octaves(sigma: float, reference: float) -> float:
    """How far σ moved from ``reference``, in octaves (2 when smoothing is switched on or off)."""
    if sigma == reference:
        return 0.0
    if sigma > 0 and reference > 0:
        return abs(math.log2(sigma / reference))
    return 2.0


def _merit(candidate: Candidate, base: SpadeSettings) -> float:
    strides_changed = tuple(sorted(candidate.strides)) != tuple(sorted(base.strides))
    gallery_changed = candidate.gallery != base.gallery
    return candidate.objective - DEVIATION_COST * (strides_changed + gallery_changed
                                                   + _octaves(candidate.sigma, base.sigma) / 2)


def is_reference(candidate: Candidate, base: SpadeSettings) -> bool:
    """Whether ``candidate`` is the base settings' own geometry, stages and σ."""
    features = base.features
    return (candidate.resolution == (features.resize or 0) and candidate.aspect == features.aspect
            and tuple(sorted(candidate.strides)) == tuple(sorted(base.strides)) and candidate.sigma == base.sigma
            and candidate.gallery == base.gallery)


def best_by_merit(candidates: Sequence[Candidate], base: SpadeSettings) -> Candidate:
    """Best candidate per geometry (charged :data:`DEVIATION_COST` for changes from ``base``); a dearer geometry
    must win by :data:`GAIN_FOR_COST` over the cheapest good one."""
    by_geometry: dict[tuple[int, str], Candidate] = {}
    for c in candidates:  # galleries of one geometry compete on merit like its stages and σ
        if c.geometry not in by_geometry or _merit(c, base) > _merit(by_geometry[c.geometry], base):
            by_geometry[c.geometry] = c
    ranked = sorted(by_geometry.values(), key=lambda c: (c.resolution, c.seconds_per_image))
    chosen = ranked[0]
    for challenger in ranked[1:]:
        if challenger.resolution == chosen.resolution:
            if challenger.objective > chosen.objective:
                chosen = challenger
        elif challenger.objective > chosen.objective + GAIN_FOR_COST:
            chosen = challenger
    return chosen


def paired_margin(challenger: Evidence, reference: Evidence, proxy: ProxySet, resamples: int = BOOTSTRAP_RESAMPLES,
                  seed: int = 0) -> Margin:
    """The challenger's gain in (pixel AUROC + PRO) / 2 over the reference on bootstrap resamples of the
    proxy images (painted and normal images resampled apart; both candidates see the same resamples)."""
    groups = np.where(proxy.roles == PAINTED, 1, 0)
    weights = bootstrap_weights(groups, resamples, seed)
    gains = np.empty(resamples)
    for row, w in enumerate(weights):
        a, b = challenger.counts.metrics(w), reference.counts.metrics(w)
        gains[row] = (a[0] + a[1]) / 2 - (b[0] + b[1]) / 2
    return Margin(float(gains.mean()), float(gains.std(ddof=1)), float(np.mean(gains > 0)), resamples)


def _describe(c: Candidate) -> str:
    gallery = "" if c.gallery == "kmeans" else f", {c.gallery} gallery"
    return f"{c.resolution}² {c.aspect}, strides {'+'.join(map(str, c.strides))}, σ {c.sigma:g}{gallery}"


def choose(candidates: Sequence[Candidate], base: SpadeSettings, evidence: dict[Candidate, Evidence],
           proxy: ProxySet) -> tuple[Candidate, Candidate, Margin | None, str]:
    """(chosen, reference, margin, reason): the best by merit if it beats the base settings' candidate by
    :data:`MARGIN_Z` bootstrap standard deviations, else the base settings' candidate."""
    references = [c for c in candidates if is_reference(c, base)]
    best = best_by_merit(candidates, base)
    if not references:  # base settings outside the searched space (e.g. a custom σ): nothing to compare with
        return best, best, None, f"{_describe(best)}: best on the proxy set ({best.objective:.4f}); the base " \
                                 f"settings were not among the candidates"
    reference = references[0]
    if best is reference or best == reference:
        return reference, reference, None, (f"kept the base settings ({_describe(reference)}, {reference.objective:.4f} "
                                            f"on the proxy set): no candidate beat them by more than the cost of "
                                            f"changing a setting or of a dearer input")
    margin = paired_margin(evidence[best], evidence[reference], proxy)
    summary = (f"{_describe(best)} scored {best.objective:.4f} against the base settings' {reference.objective:.4f} "
               f"(pixel AUROC + PRO over 2 on the proxy set); gain {margin.gain:+.4f} ± {margin.spread:.4f} "
               f"over {BOOTSTRAP_RESAMPLES} resamples, won {margin.wins:.0%} of them")
    if margin.z > MARGIN_Z:
        return best, reference, margin, f"chose {summary}"
    return reference, reference, margin, (f"kept the base settings ({_describe(reference)}): {summary}, less than "
                                          f"the {MARGIN_Z:g} standard deviations a departure must win by")


# --------------------------------------------------------------------------- the search


def _geometry_settings(base: SpadeSettings, resolution: int, aspect: str) -> SpadeSettings:
    features = dataclasses.replace(base.features, resize=resolution, crop=resolution, aspect=aspect,
                                   tile=512 if resolution > 768 else base.features.tile)
    return dataclasses.replace(base, features=features, image_score=IMAGE_RULE, image_sigma=None, pooled=POOLED,
                               nuisance_copies=NUISANCE_COPIES)


def _fit_and_evaluate(settings: SpadeSettings, fit_set: ImageSet, proxy: ProxySet, cancel: CancelFn | None,
                      ) -> tuple[SpadeDetector, list[tuple[Candidate, Evidence]]]:
    """Fit SPADE at one geometry, score the proxy set once, evaluate every stage subset x σ from the cache."""
    detector = SpadeDetector(settings).fit(fit_set, cancel=cancel)
    start = time.perf_counter()
    detector.raw_maps(proxy.images, cancel=cancel)
    per_image = (time.perf_counter() - start) / len(proxy.images)
    return detector, evaluate_geometry(detector, proxy, IMAGE_RULE, per_image, cancel)


def settings_for_choice(base: SpadeSettings, chosen: Candidate, reference: Candidate, rule: str = IMAGE_RULE
                        ) -> SpadeSettings:
    """The settings a tuned model gets for a chosen candidate and image ``rule`` (the base settings themselves,
    with the tuned image score and working point, when the choice is the base settings' candidate)."""
    if chosen == reference:
        settings = dataclasses.replace(base, image_sigma=None, pooled=POOLED, nuisance_copies=NUISANCE_COPIES)
    else:
        settings = dataclasses.replace(_geometry_settings(base, chosen.resolution, chosen.aspect),
                                       strides=tuple(sorted(chosen.strides)), sigma=chosen.sigma, gallery=chosen.gallery)
    return dataclasses.replace(settings, image_score=rule)


def tune_spade(
    normal: ImageSet,
    base: SpadeSettings = SpadeSettings(),
    seed: int = 0,
    max_fit: int = 120,
    max_holdout: int = 30,
    resolutions: Sequence[int] | None = None,
    log: Log | None = None,
    cancel: CancelFn | None = None,
    audit: Audit | None = None,
    marked: ImageSet | None = None,
) -> TuneResult:
    """Pick SPADE settings for ``normal`` (see the module docstring); ``base`` gives everything not tuned and
    is what a departure must beat. ``resolutions`` overrides the input sides tried (e.g. ``(256,)``).
    ``marked``: a few real images, good and defective (masks where known), that check the choice and choose
    among the best candidates and image scores (:mod:`core.tuning.marked`)."""
    say = log or (lambda message: None)
    start = time.perf_counter()
    sizes = _sizes(normal)
    fit_set, holdout = _split(normal, seed, max_fit, max_holdout)
    donors = [item.load() for item in fit_set.subset(range(min(8, len(fit_set))))]
    variation = measure_variation(donors + [item.load() for item in holdout])
    eval_side = int(min(EVAL_SIDE, np.median([max(h, w) for h, w in sizes])))
    proxy = proxy_set(holdout, donors, variation, seed, eval_side)
    evidence_marked = MarkedImages.of(marked, eval_side) if marked is not None and len(marked) else None
    marked_scores: dict = {}
    n_painted = int(np.sum(proxy.roles == PAINTED))
    n_nuisance = int(np.sum(proxy.roles == NUISANCE))
    geometries = geometry_candidates(sizes)
    if resolutions is not None:
        geometries = [(r, a) for r in resolutions for a in sorted({a for _, a in geometries})]
    base_geometry = ((base.features.resize or 0), base.features.aspect)
    if base_geometry[0] and base_geometry not in geometries:
        geometries.append(base_geometry)  # what a departure must beat is always measured
        geometries.sort(key=lambda g: g[0])
    say(f"tuning on {len(fit_set)} normal images, {len(holdout)} held out -> {len(proxy.images)} proxy images "
        f"({n_painted} painted, {n_nuisance} nuisance copies); geometries {geometries}")
    candidates: list[Candidate] = []
    evidence: dict[Candidate, Evidence] = {}
    geometry_seconds = {}

    def measure(settings: SpadeSettings, label: str) -> None:
        """Fit one setting's gallery, score the proxy set once, keep every candidate it gives (audit and marked
        images read the same fitted detector)."""
        started = time.perf_counter()
        detector, rows = _fit_and_evaluate(settings, fit_set, proxy, cancel)
        geometry_seconds[label] = time.perf_counter() - started
        for candidate, found in rows:
            candidates.append(candidate)
            evidence[candidate] = found
        if audit is not None:  # reads the proxy set as the detector's last scored set
            audit(detector, proxy, [candidate for candidate, _ in rows])
        if evidence_marked is not None:
            marked_scores.update(score_marked(detector, evidence_marked, [c for c, _ in rows]))
        if rows:
            best = max((c for c, _ in rows), key=lambda c: c.objective)
            say(f"  {label}: best {best.objective:.4f} (pixel {best.pixel_auroc:.4f}, PRO {best.pro:.4f}; strides "
                f"{best.strides}, σ {best.sigma}; image {best.image_auroc:.4f}) in {geometry_seconds[label]:.0f} s")

    kept_aspect = None  # letterbox or squash: decided at the cheapest resolution, kept for the dearer ones
    for resolution, aspect in geometries:
        check_cancel(cancel)
        if resolution != geometries[0][0] and kept_aspect is None:
            at_first = [c for c in candidates if c.resolution == geometries[0][0]]
            kept_aspect = max(at_first, key=lambda c: _merit(c, base)).aspect
            say(f"  {kept_aspect} kept for the larger inputs (it won at {geometries[0][0]}²)")
        if kept_aspect is not None and aspect != kept_aspect and (resolution, aspect) != base_geometry:
            continue
        if candidates and resolution not in {c.resolution for c in candidates} and (resolution, aspect) != base_geometry:
            leader = best_by_merit(candidates, base).resolution
            beaten = sorted({c.resolution for c in candidates if c.resolution > leader})
            if len(beaten) >= PATIENCE:
                say(f"  stopped before {resolution}²: {', '.join(f'{r}²' for r in beaten)} did not beat {leader}²")
                continue
        measure(_geometry_settings(base, resolution, aspect), f"{resolution}/{aspect}")
    if SECOND_GALLERY and base.gallery != SECOND_GALLERY and candidates:
        # The per-cell Gaussian (PaDiM's model) as a second pixel scorer, at the best geometry only: one more fit.
        leader = best_by_merit(candidates, base)
        settings = dataclasses.replace(_geometry_settings(base, leader.resolution, leader.aspect), gallery=SECOND_GALLERY)
        measure(settings, f"{leader.resolution}/{leader.aspect}/{SECOND_GALLERY}")
    chosen, reference, margin, reason = choose(candidates, base, evidence, proxy)
    rule, marked_summary = IMAGE_RULE, None
    shortlist = marked_shortlist(candidates, chosen, reference, base)
    if evidence_marked is not None:
        chosen, rule, marked_summary, reason = _with_marked(shortlist, chosen, marked_scores, evidence_marked, reason)
    settings = settings_for_choice(base, chosen, reference, rule)
    return TuneResult(
        settings=settings, candidates=candidates, chosen=chosen, reference=reference, reason=reason,
        kept_base=chosen == reference, margin=margin, seconds=time.perf_counter() - start, n_fit=len(fit_set),
        n_holdout=len(holdout), n_synthetic=len(proxy.images), n_nuisance=n_nuisance,
        geometry_seconds=geometry_seconds, marked=marked_summary, shortlist=shortlist, marked_scores=marked_scores,
    )


def marked_shortlist(candidates: Sequence[Candidate], proxy_choice: Candidate, reference: Candidate,
                     base: SpadeSettings) -> list[Candidate]:
    """The proxy's choice, the next best by merit (:data:`SHORTLIST` in all) and the base settings' candidate."""
    ranked = sorted(candidates, key=lambda c: -_merit(c, base))
    shortlist = [proxy_choice] + [c for c in ranked if c != proxy_choice][: SHORTLIST - 1]
    if reference not in shortlist:
        shortlist.append(reference)
    return shortlist


def _with_marked(shortlist: Sequence[Candidate], proxy_choice: Candidate, scores: dict, marked: MarkedImages,
                 reason: str) -> tuple[Candidate, str, dict[str, Any], str]:
    """The marked images' choice among the shortlist (see :mod:`core.tuning.marked`), and what it says."""
    labels = marked.labels
    found = choose_marked(shortlist, scores, labels, IMAGE_RULE)
    validated = cross_validate(shortlist, scores, labels, IMAGE_RULE)
    summary = {
        "n_defective": int(labels.sum()), "n_good": int((labels == 0).sum()), "with_masks": marked.has_masks,
        "proxy_choice": proxy_choice.to_dict(), "chosen": found.candidate.to_dict(), "image_rule": found.rule,
        "marked_pixel_objective": found.pixel_objective, "marked_image_auroc": found.image_auroc,
        "marked_rule_aurocs": found.rule_aurocs,
        "cross_validated": validated,
    }
    changed = found.candidate != proxy_choice or found.rule != IMAGE_RULE
    said = (f"; {int(labels.sum())} marked defects and {int((labels == 0).sum())} good images "
            f"{'changed' if changed else 'confirmed'} it: {_describe(found.candidate)}, image score {found.rule} "
            f"(cross-validated over {validated['folds']} folds of the marked images: image AUROC "
            f"{validated['image_auroc']:.3f}" + ("" if np.isnan(validated["pixel_objective"]) else
                                                  f", pixel AUROC + PRO over 2 {validated['pixel_objective']:.3f}") + ")")
    return found.candidate, found.rule, summary, reason + said


def best_candidates(summary: dict, rows: int = 12) -> list[dict]:
    """The ``rows`` best candidates of a tuning summary (``candidates`` as dicts), best first, as display rows."""
    best = sorted(summary.get("candidates", []), key=lambda c: -c["objective"])[:rows]
    return [{
        "input": f"{c['resolution']}²", "aspect": c["aspect"], "strides": "+".join(map(str, c["strides"])),
        "σ": c["sigma"], "image score": c["image_score"],
        "its σ": c["sigma"] if c.get("image_sigma") is None else c["image_sigma"],
        "pixel AUROC": round(c["pixel_auroc"], 4), "PRO": round(c["pro"], 4),
        "image AUROC": round(c["image_auroc"], 4), "mean": round(c["objective"], 4),
        "s / image": round(c["seconds_per_image"], 3),
    } for c in best]
