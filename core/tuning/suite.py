"""The development suite: one protocol over every line this project can measure (``python -m core bench-suite``).

A tuner rule that wins on the lines it was designed on can lose on the next
line. So every rule of :mod:`core.tuning.search` is measured here on all the
lines at hand, and chosen leave-one-line-out:

* **rows per line**: DN2 and Gaussian (image AUROC), SPADE at its defaults and
  SPADE ``--tune`` (image AUROC, pixel AUROC, PRO), exactly as ``python -m core
  bench`` reports them, and the tuned row's worst loss against the defaults;
* **proxy fidelity per line** (:mod:`.fidelity`): each input geometry the tuner
  fits also scores (an audit the choice never sees) up to :data:`AUDIT_TEST`
  real test images; over all candidates, how the synthetic ranking of pixel
  AUROC, PRO and each image score agrees with the real one;
* **leave-one-line-out**: the tuner's two rules, the margin a departure must win
  by (:data:`MARGINS`) and the image score of a tuned model (:data:`IMAGE_RULES`),
  are chosen on all lines but one by their worst loss against the base settings
  (then their mean gain), and that choice is checked on the line left out.

Lines (MVTec layout, with masks): MVTec AD bottle, DeepPCB, BSData pitting, and
non-square, many-sized crops of DeepPCB and BSData (:func:`core.datasets.crops.cut_crops`,
cut once into a cache folder).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from core.backbones import get_spec
from core.bench import BenchOptions, BenchTask, load_tasks, marked_positions, run_bench, segmentation_figures
from core.config import FeatureSettings, SpadeSettings
from core.datasets import ImageSet
from core.datasets.crops import cut_crops
from core.datasets.fashion_mnist import stratified_positions
from core.detectors.spade import SpadeDetector
from core.images import map_to_original, probe_size
from core.metrics import image_auroc
from core.tuning.fidelity import fidelity_table
from core.tuning.pixel_counts import pixel_counts
from core.tuning.proxy import Candidate, ProxySet
from core.tuning.marked import choose_marked, cross_validate
from core.tuning.search import EVAL_SIDE, IMAGE_RULE, best_by_merit, is_reference, settings_for_choice, tune_spade

AUDIT_TEST = 200
"""Real test images (stratified by defect type) each tuner geometry scores for the fidelity audit."""
AUDIT_RULES = ("dn2", "max", "topk", "fused")
"""Image scores whose synthetic and real AUROC the audit records at every candidate."""
MARGINS = (0.0, 1.0, 2.0, 3.0, math.inf)
"""Margins (bootstrap standard deviations) the leave-one-line-out choice picks from; inf = never depart."""
IMAGE_RULES = ("dn2", "topk", "fused")
"""Image scores of a tuned model the leave-one-line-out choice picks from."""
TOLERANCE = 0.005
"""Losses this small count as none when rules are compared (the no-loss rule the tuner is held to: tuned >=
defaults - 0.5 points); among rules within it on every metric and line, the larger mean change wins."""

Say = Callable[[str], None]


@dataclass(frozen=True)
class Line:
    """A development line: a ``name`` and its MVTec-layout category folder ``root``."""

    name: str
    root: Path


def development_lines(data: Path, cache: Path) -> list[Line]:
    """The lines in ``data`` (``../shared/data``), with the crops stand-ins cut into ``cache`` when missing."""
    lines = [Line("bottle", data / "mvtec_ad" / "bottle"), Line("deeppcb", data / "deeppcb" / "pcb"),
             Line("bsdata", data / "bsdata" / "pitting")]
    found = [line for line in lines if (line.root / "train").is_dir()]
    for name, source, seed in (("deeppcb-crops", data / "deeppcb" / "pcb", 0), ("bsdata-crops", data / "bsdata" / "pitting", 1)):
        if not (source / "train").is_dir():
            continue
        out = cache / name
        if not (out / "test").is_dir():
            cut_crops(source, out, seed=seed)
        found.append(Line(name, out))
    return found


# --------------------------------------------------------------------------- the audit


class CandidateAudit:
    """Called by the tuner after each geometry: the proxy's and the real test images' metrics of every candidate.

    ``test``: the real test images (with masks); rows: one dict per candidate with its settings,
    ``synthetic_*`` and ``real_*`` pixel AUROC, PRO and image AUROC of each of :data:`AUDIT_RULES`.
    """

    def __init__(self, test: ImageSet, eval_side: int = EVAL_SIDE) -> None:
        self.test = test
        self.labels = test.labels
        self.masks = []
        for item in test:
            mask = item.load_mask() if item.has_mask else None
            if mask is None:
                mask = np.zeros(probe_size(item.path if item.path is not None else item.data, name=item.name), bool)
            scale = min(1.0, eval_side / max(mask.shape))
            hw = (max(1, round(mask.shape[0] * scale)), max(1, round(mask.shape[1] * scale)))
            import cv2  # only the audit resamples masks

            self.masks.append(cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST_EXACT)
                              .astype(bool))
        self.rows: list[dict[str, Any]] = []

    def __call__(self, detector: SpadeDetector, proxy: ProxySet, candidates: list[Candidate]) -> None:
        spec = get_spec(detector.settings.features.backbone)
        by_stride = {spec.stage(stage).stride: stage for stage in detector.map_stages}
        synthetic = {}
        for c in candidates:  # the proxy set is the detector's last scored set here
            stages = tuple(by_stride[s] for s in c.strides)
            synthetic[c] = {rule: image_auroc(proxy.labels, detector.image_scores(rule, stages=stages, sigma=c.sigma))
                            for rule in AUDIT_RULES}
        detector.raw_maps(self.test)
        for c in candidates:
            stages = tuple(by_stride[s] for s in c.strides)
            heat = detector.combined_maps(stages=stages, sigma=c.sigma)
            maps = [map_to_original(heat[i], mask.shape, detector.image_size) for i, mask in enumerate(self.masks)]
            pixel, pro = pixel_counts(self.masks, maps).metrics()
            row = {**c.to_dict(), "synthetic_pixel_auroc": c.pixel_auroc, "synthetic_pro": c.pro,
                   "real_pixel_auroc": pixel, "real_pro": pro}
            for rule in AUDIT_RULES:
                row[f"synthetic_image_{rule}"] = synthetic[c][rule]
                row[f"real_image_{rule}"] = image_auroc(
                    self.labels, detector.image_scores(rule, stages=stages, sigma=c.sigma))
            self.rows.append(row)


# --------------------------------------------------------------------------- one line


def _bench_row(report: dict[str, Any]) -> dict[str, Any]:
    result = report["results"][0]
    row = {"image_auroc": result["image_auroc"]}
    for key in ("pixel_auroc", "pro", "seconds_per_image", "tune_s"):
        if key in result:
            row[key] = result[key]
    if "tuning" in result:
        tuning = result["tuning"]
        row.update(chosen=tuning["chosen"], kept_base=tuning["kept_base"], margin=tuning["margin"],
                   reason=tuning["reason"])
    return row


ROWS = ("dn2", "gaussian", "defaults", "tuned")


def run_line(line: Line, options: BenchOptions, say: Say, audit_test: int = AUDIT_TEST,
             earlier: dict[str, Any] | None = None, rows: Sequence[str] = ROWS,
             labelled: Sequence[int] = (0,)) -> dict[str, Any]:
    """Every row, the audit and the fidelity of one line (see the module docstring). Rows not in ``rows`` are
    taken from an ``earlier`` report of the same line (the baselines do not change when the tuner does).
    ``labelled``: the numbers of marked defects (and as many good images) the tuned row is also run with
    (:func:`tuned_rows`; 0 = normal images only)."""
    task = load_tasks(f"mvtec:{line.root}", seed=options.seed)[0]
    test = task.test
    if len(test) > audit_test:
        groups = np.unique(np.array([str(g) for g in test.groups]), return_inverse=True)[1]
        test = test.subset(stratified_positions(groups, audit_test, np.random.default_rng([options.seed, 2])))
    audit = CandidateAudit(test)
    base = options.settings(SpadeSettings)
    report: dict[str, Any] = {"line": line.name, "root": str(line.root), "n_train": len(task.train),
                              "n_test": len(task.test), "n_audit": len(test),
                              "base": {"resolution": base.features.resize, "aspect": base.features.aspect,
                                       "strides": list(base.strides), "sigma": base.sigma}}
    spec = f"mvtec:{line.root}"
    for name, method in (("dn2", "dn2"), ("gaussian", "gaussian"), ("defaults", "spade"), ("tuned", "spade")):
        if name not in rows:
            if earlier is None or name not in earlier:
                raise ValueError(f"line {line.name}: no earlier report holds the {name!r} row")
            report[name] = earlier[name]
            if name == "tuned":
                audit.rows = earlier["audit"]
                report["labelled"] = earlier.get("labelled", {})
            continue
        start = time.perf_counter()
        if name == "tuned":
            report["labelled"] = tuned_rows(task, options, audit, labelled, say)
            report[name] = dict(report["labelled"]["0"])
        else:
            report[name] = _bench_row(run_bench(method, spec, options))
        report[name]["seconds"] = time.perf_counter() - start
        say(f"  {line.name} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in report[name].items()
                                                  if k in ("image_auroc", "pixel_auroc", "pro")))
    report["audit"] = audit.rows
    report["loss"] = tuned_loss(report)
    metrics = ["pixel_auroc", "pro"] + [f"image_{rule}" for rule in AUDIT_RULES]
    report["fidelity"] = {k: dataclasses.asdict(v) for k, v in fidelity_table(audit.rows, metrics).items()}
    return report


def _evaluate(settings: SpadeSettings, task: BenchTask, keeps: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Fit ``settings`` on the task's normal images, score every test image once, and report the figures of
    each ``keeps`` subset (name -> test positions) as ``bench`` does, with seconds per test image."""
    detector = SpadeDetector(settings).fit(task.train)
    start = time.perf_counter()
    scores, maps = detector.score_and_maps(task.test)
    per_image = (time.perf_counter() - start) / len(task.test)
    return {name: {**segmentation_figures(task.test, scores, maps, detector.image_size, keep),
                   "seconds_per_image": per_image} for name, keep in keeps.items()}


def tuned_rows(task: BenchTask, options: BenchOptions, audit: CandidateAudit, labelled: Sequence[int],
               say: Say) -> dict[str, dict[str, Any]]:
    """The tuned row with 0 and with each number N in ``labelled`` of marked defects (N defective and N good test
    images, nested draws, left out of N's evaluation), and the oracle beside each: the candidate and image score
    the audit's real test labels rank best, evaluated on the same images. One tuner run serves every N."""
    base = options.settings(SpadeSettings)
    largest = max(labelled)
    positions = marked_positions(task.test, largest, options.seed) if largest else []
    evidence = task.test.subset(positions) if positions else None
    start = time.perf_counter()
    result = tune_spade(task.train, base=base, seed=options.seed, audit=audit, marked=evidence)
    tune_s = time.perf_counter() - start
    everything = list(range(len(task.test)))
    choices, keeps = {}, {}
    for n in sorted(set(labelled) | {0}):
        marked_here = set(marked_positions(task.test, n, options.seed)) if n else set()
        keeps[str(n)] = [i for i in everything if i not in marked_here]
        if n == 0:
            choices[str(n)] = (result.shortlist[0], IMAGE_RULE, None)
            continue
        use = np.array([p in marked_here for p in positions])
        labels = evidence.labels
        found = choose_marked(result.shortlist, result.marked_scores, labels, IMAGE_RULE, use=use)
        validated = cross_validate(result.shortlist, result.marked_scores, labels, IMAGE_RULE, use=use)
        choices[str(n)] = (found.candidate, found.rule, validated)
    oracle = max(audit.rows, key=lambda r: (max(r[f"real_image_{rule}"] for rule in AUDIT_RULES),
                                           r["real_pixel_auroc"] + r["real_pro"]))
    oracle_rule = max(AUDIT_RULES, key=lambda rule: oracle[f"real_image_{rule}"])
    oracle_candidate = next(c for c in result.candidates if _candidate_key(c.to_dict()) == _candidate_key(oracle))
    # Each distinct settings is fitted and scored once; every N reads its own subset of the test images.
    evaluated: dict[SpadeSettings, dict[str, dict[str, float]]] = {}
    plans = {**{n: (c, rule) for n, (c, rule, _) in choices.items()}, "oracle": (oracle_candidate, oracle_rule)}
    for name, (candidate, rule) in plans.items():
        settings = settings_for_choice(base, candidate, result.reference, rule)
        if settings not in evaluated:
            say(f"    evaluating {name}: {candidate.resolution}² {candidate.aspect} "
                f"{'+'.join(map(str, candidate.strides))} σ{candidate.sigma:g}, {rule}")
            evaluated[settings] = _evaluate(settings, task, keeps)
    rows = {}
    for n, (candidate, rule, validated) in choices.items():
        settings = settings_for_choice(base, candidate, result.reference, rule)
        oracle_settings = settings_for_choice(base, oracle_candidate, result.reference, oracle_rule)
        rows[n] = {**evaluated[settings][n], "n_evaluated": len(keeps[n]), "n_marked": 2 * int(n),
                   "chosen": candidate.to_dict(), "image_rule": rule, "kept_base": candidate == result.reference,
                   "cross_validated": validated, "oracle": {**evaluated[oracle_settings][n], "chosen": oracle_candidate.to_dict(),
                                                           "image_rule": oracle_rule}}
    summary = result.summary()
    rows["0"].update(tune_s=tune_s, margin=summary["margin"], reason=summary["reason"])
    return rows


def tuned_loss(report: dict[str, Any]) -> dict[str, float]:
    """The tuned row minus the defaults row per metric, and its image AUROC minus max(DN2, defaults)."""
    tuned, defaults = report["tuned"], report["defaults"]
    loss = {metric: tuned[metric] - defaults[metric] for metric in ("image_auroc", "pixel_auroc", "pro")}
    loss["image_vs_best_baseline"] = tuned["image_auroc"] - max(report["dn2"]["image_auroc"], defaults["image_auroc"])
    loss["worst"] = min(loss.values())
    return loss


# --------------------------------------------------------------------------- leave one line out


@dataclass(frozen=True)
class Rule:
    """The tuner's rules under test: ``margin`` (bootstrap standard deviations a departure must win by) and
    the ``image_rule`` of a tuned model."""

    margin: float
    image_rule: str


def _candidate_key(row: dict[str, Any]) -> tuple:
    return row["resolution"], row["aspect"], tuple(row["strides"]), row["sigma"], row.get("gallery", "kmeans")


def rule_outcome(report: dict[str, Any], rule: Rule) -> dict[str, float]:
    """What ``rule`` would have done on a line, from its audit: the real metrics of the candidate it keeps,
    minus the base settings' (image AUROC: minus the better of the base candidate's DN2 and its default rule)."""
    rows = report["audit"]
    candidates = [Candidate(r["resolution"], r["aspect"], tuple(r["strides"]), r["sigma"], r["image_score"],
                            r["pixel_auroc"], r["pro"], r["image_auroc"], r["seconds_per_image"],
                            gallery=r.get("gallery", "kmeans")) for r in rows]
    given = report["base"]
    base = SpadeSettings(features=FeatureSettings(resize=given["resolution"], crop=given["resolution"],
                                                  aspect=given["aspect"]),
                         strides=tuple(given["strides"]), sigma=given["sigma"])
    by_key = {_candidate_key(r): r for r in rows}
    reference = next(c for c in candidates if is_reference(c, base))
    best = best_by_merit(candidates, base)
    margin = report["tuned"].get("margin") or {}
    z = margin.get("z", 0.0) if best != reference else 0.0
    kept = best if (best != reference and z > rule.margin) else reference
    real, ref = by_key[_candidate_key(kept.to_dict())], by_key[_candidate_key(reference.to_dict())]
    # The image score is held against the pooled DN2 score at the base geometry: the baseline a tuned
    # model must not fall below (the DN2 detector's score, from the same fitted model).
    return {"pixel_auroc": real["real_pixel_auroc"] - ref["real_pixel_auroc"],
            "pro": real["real_pro"] - ref["real_pro"],
            "image_auroc": real[f"real_image_{rule.image_rule}"] - ref["real_image_dn2"]}


def leave_one_line_out(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per line: the rule chosen on the other lines (largest worst loss, losses within :data:`TOLERANCE` counted
    as none, then largest mean) and its outcome here."""
    rules = [Rule(m, r) for m in MARGINS for r in IMAGE_RULES]
    outcomes = {(report["line"], rule): rule_outcome(report, rule)
                for report in reports for rule in rules}
    table = []
    for held in reports:
        others = [r["line"] for r in reports if r["line"] != held["line"]]

        def score(rule: Rule) -> tuple[float, float]:
            values = [v for line in others for v in outcomes[line, rule].values()]
            return min(0.0, min(values) + TOLERANCE), float(np.mean(values))

        chosen = max(rules, key=score)
        table.append({"line": held["line"], "margin": chosen.margin, "image_rule": chosen.image_rule,
                      "others_worst": min(v for line in others for v in outcomes[line, chosen].values()),
                      **outcomes[held["line"], chosen]})
    return table
