"""``python -m core adapt``: train PANDA on normal images, save the model and the per-epoch curves.

Examples::

    python -m core adapt --normal data/mvtec_ad/bottle --strategy ses --epochs 40 \\
        --test data/mvtec_ad/bottle --out bottle-ses.npz --curves bottle-ses.json
    python -m core adapt --normal fashion-mnist:Trouser:500 --test fashion-mnist:Trouser:1000 \\
        --strategy ewc --crop 128 --out trouser.npz
    python -m core adapt --normal bottle --test bottle --compare --epochs 60 --curves table.json
    python -m core adapt --normal data/mvtec_ad/bottle --time-cache
    python -m core adapt --compare --normal fashion-mnist:all:1000 --test fashion-mnist:all:10000 \\
        --table table6.json            # the paper's Table 6: every class in turn, a mean row
    python -m core adapt --merge t6_a.json t6_b.json --table t6.json   # classes run in separate processes
    python -m core adapt --lesson      # the collapse lesson on the bundled demo: three curves, wall time

``--normal`` / ``--test`` / ``--outliers`` take a folder of images, an MVTec
category folder (its ``train/good`` for normal images, its labelled ``test/``
for testing) or ``fashion-mnist:CLASS[:COUNT]`` (COUNT images, seeded).
``--compare`` runs DN2 / Early / SES / EWC on the same data instead of one
strategy (the paper's Table 6) and writes the table and both curves. With
``fashion-mnist:all`` (or ``fashion-mnist:Bag,Dress``) it runs every named
class in turn as the normal class and prints one row per class and the mean
(``--table`` writes them, with timings, as JSON). ``--merge`` joins such JSON
files, written by processes that each ran some of the classes with the same
settings, into one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from core.cli import add_param_option, add_threads_option, apply_threads, parse_params
from core.config import PANDA_STRATEGIES, PandaSettings, apply_params, paper_panda_settings, settings_for


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("adapt", help="train PANDA (feature adaptation) and save the model and curves",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--normal", help="normal training images (folder, MVTec category, fashion-mnist:CLASS[:N]); "
                                         "required except with --merge")
    parser.add_argument("--test", help="labelled test images for the curves (MVTec category or fashion-mnist:CLASS[:N])")
    parser.add_argument("--outliers", help="outlier exposure images (strategy oe)")
    parser.add_argument("--strategy", choices=list(PANDA_STRATEGIES), default=None,
                        help=f"default: {PandaSettings.strategy} (with --paper: early)")
    parser.add_argument("--paper", action="store_true",
                        help="start from the paper's protocol (Lite0 at its own size, Euclidean, lr 1e-2, the "
                             "paper's minibatch counts, the strategy's result always kept) instead of the "
                             "measured defaults (Lite2 224², cosine, lr 0.1, 16 epochs, the signal's choice)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs (default {PandaSettings.epochs}; 0 = the paper's minibatch count, scaled)")
    parser.add_argument("--minibatches", type=int, default=0, help="training length in minibatches when --epochs is 0")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--weights", default=None, help="local weights file, or 'random' (tests only)")
    parser.add_argument("--crop", type=int, default=None, help="input side (default: the backbone's)")
    parser.add_argument("--resize", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--fisher", default=None, help="Fisher diagonal .npz for EWC (default: estimated)")
    parser.add_argument("--save-fisher", default=None, help="write the Fisher diagonal EWC used to this .npz")
    parser.add_argument("--fisher-images", default=None, help="reference images for the Fisher (default: --normal)")
    parser.add_argument("--compare", action="store_true", help="run DN2/Early/SES/EWC and write the table (needs --test)")
    parser.add_argument("--early-epoch", type=int, default=None, help="with --compare: where Early stops")
    parser.add_argument("--ewc-epochs", type=int, default=None, help="with --compare: length of the EWC run")
    parser.add_argument("--strategies", default="early,auto,ses,ewc",
                        help="with --compare: which of early,auto,ses,ewc to run (DN2 and the long run always are; "
                             "auto = Early at the epoch the normal-only signal picks)")
    parser.add_argument("--no-ewc-curves", action="store_true",
                        help="with --compare: evaluate the EWC run only at its end (faster; no EWC curve)")
    parser.add_argument("--table", default=None,
                        help="with --compare over several Fashion-MNIST classes: JSON file for the per-class table")
    parser.add_argument("--merge", nargs="+", metavar="TABLE.json", default=None,
                        help="join --table files of processes that ran different classes with the same settings, "
                             "print the whole table (and write it to --table)")
    parser.add_argument("--lesson", action="store_true",
                        help="the collapse lesson (unregularised / SES / EWC, about a minute) on the bundled "
                             "Fashion-MNIST demo, or on --normal and --test; prints the curves and its wall time")
    parser.add_argument("--time-cache", action="store_true",
                        help="only time one training epoch with and without the frozen-prefix cache, and exit")
    parser.add_argument("--rounds", type=int, default=3, help="with --time-cache: alternating repetitions (fastest kept)")
    parser.add_argument("--out", default=None, help="model file (.npz)")
    parser.add_argument("--curves", default=None, help="JSON file for the per-epoch curves")
    parser.add_argument("--quiet", action="store_true")
    add_param_option(parser)
    add_threads_option(parser)
    return parser


# ---------------------------------------------------------------------- inputs
def read_images(spec: str, role: str):
    """An ImageSet from a folder, an MVTec category (train or test part by ``role``) or fashion-mnist:CLASS[:N]."""
    from core.datasets import read_fashion_mnist, read_folder, read_mvtec

    if spec.startswith("fashion-mnist:"):
        parts = spec.split(":")
        count = int(parts[2]) if len(parts) > 2 and parts[2] else None
        train, test = read_fashion_mnist(normal_class=parts[1], max_train=count if role != "test" else None,
                                         max_test=count if role == "test" else None)
        return test if role == "test" else train
    path = Path(spec)
    if (path / "train").is_dir() and (path / "test").is_dir():
        train, test = read_mvtec(path)
        return test if role == "test" else train
    if not path.is_dir():
        raise SystemExit(f"{spec}: not a folder, MVTec category or fashion-mnist:CLASS spec")
    return read_folder(path, label=1 if role == "outliers" else (0 if role == "normal" else None))


PAPER_TABLE6_FMNIST = {"JO": 94.9, "PANDA-Early": 95.4, "PANDA-SES": 95.5, "PANDA-EWC": 95.6}
"""Reiss et al., Table 6, Fashion-MNIST row (ResNet152, 224², mean ROC AUC %; JO = joint optimisation)."""


def fashion_classes(spec: str) -> list[str] | None:
    """The classes of a ``fashion-mnist:all[:N]`` or ``fashion-mnist:A,B[:N]`` spec; None for one class or other data."""
    from core.datasets.fashion_mnist import FASHION_MNIST_CLASSES

    if not spec.startswith("fashion-mnist:"):
        return None
    named = spec.split(":")[1]
    if named.lower() == "all":
        return list(FASHION_MNIST_CLASSES)
    return [part for part in named.split(",") if part] if "," in named else None


def _with_class(spec: str, name: str) -> str:
    parts = spec.split(":")
    parts[1] = name
    return ":".join(parts)


def labelled_test_spec(normal_spec: str, test_spec: str) -> str:
    """The test spec for one normal class: ``fashion-mnist:all[:N]`` (or a class list) names the test images of
    every class, labelled against the one normal class of ``--normal``, so it takes that class."""
    if not test_spec.startswith("fashion-mnist:"):
        return test_spec
    named = test_spec.split(":")[1]
    if named.lower() != "all" and "," not in named:
        return test_spec
    if not normal_spec.startswith("fashion-mnist:") or fashion_classes(normal_spec) is not None:
        raise SystemExit(f"--test {test_spec}: the test images of several Fashion-MNIST classes are labelled "
                         "against one normal class; give --normal fashion-mnist:CLASS[:N]")
    return _with_class(test_spec, normal_spec.split(":")[1])


def settings_from_args(args: argparse.Namespace) -> PandaSettings:
    """PandaSettings from the command line; ``--param`` overrides any field by name (type-checked)."""
    base = paper_panda_settings() if args.paper else PandaSettings()
    geometry = {key: value for key, value in (("crop", args.crop), ("resize", args.resize)) if value is not None}
    if args.backbone is not None and args.backbone != base.features.backbone and not geometry:
        geometry = {"crop": None, "resize": None}  # another backbone at its own size, not at Lite2's 224²
    base = dataclasses.replace(base, features=dataclasses.replace(base.features, **geometry))
    values = {key: value for key, value in (("strategy", args.strategy), ("epochs", args.epochs),
                                            ("fisher_file", args.fisher)) if value is not None}
    if args.minibatches:  # a length in minibatches replaces the default epochs
        values.update(minibatches=args.minibatches, epochs=values.get("epochs", 0))
    return settings_for(PandaSettings, base, backbone=args.backbone, weights=args.weights, device=args.device,
                        values=values, params=parse_params(args.param))


def _printer(quiet: bool, prefix: str = ""):
    def show(record) -> None:
        if quiet:
            return
        parts = [f"{prefix}epoch {record.epoch:4d}", f"minibatches {record.minibatches:6d}"]
        if record.loss is not None:
            parts.append(f"loss {record.loss:.4g}")
        parts.append(f"train dist {record.train_distance:.4g}")
        if record.test_anomalous_ratio is not None:
            parts.append(f"anomalous/normal ratio {record.test_anomalous_ratio:.3f}/{record.test_normal_ratio:.3f}")
        if record.holdout_ratio is not None:
            parts.append(f"held-out/train {record.holdout_ratio:.3f} (kNN {record.holdout_knn_ratio:.3f})")
        if record.signal is not None:
            parts.append(f"signal {record.signal:.4f}")
        if record.auroc is not None:
            parts.append(f"ROC AUC {100 * record.auroc:.2f}")
        if record.snapshot is not None:
            parts.append(f"snapshot {record.snapshot}")
        if record.early_stop:
            parts.append("early stop")
        print("  ".join(parts), file=sys.stderr, flush=True)

    return show


def _strategies(text: str) -> tuple[str, ...]:
    from core.adaptation.compare import COMPARE_STRATEGIES

    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in chosen if name not in COMPARE_STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategies: unknown {', '.join(unknown)} (choose from {', '.join(COMPARE_STRATEGIES)})")
    return chosen


# ---------------------------------------------------------------------- run
def _lesson(args: argparse.Namespace) -> int:
    """The collapse lesson: per-epoch ROC AUC of the three strategies, their last ROC AUC and the wall time."""
    import time

    from core.adaptation.lesson import LESSON_SETTINGS, collapse_lesson, demo_images

    started = time.perf_counter()
    if args.normal or args.test:
        if not (args.normal and args.test):
            raise SystemExit("--lesson takes both --normal and --test, or neither (then the bundled demo)")
        normal, test = read_images(args.normal, "normal"), read_images(labelled_test_spec(args.normal, args.test), "test")
    else:
        normal, test = demo_images()
    settings = apply_params(LESSON_SETTINGS, parse_params(args.param))
    result = collapse_lesson(normal, test, settings)
    print(f"{'epoch':>5}" + "".join(f"{name:>16}" for name in result.curves))
    for position, epoch in enumerate(result.epochs):
        print(f"{epoch:>5}" + "".join("{:>16}".format("-" if values[position] is None else f"{100 * values[position]:.1f}")
                                      for values in result.curves.values()))
    print("last epoch: " + ", ".join(f"{name} {100 * value:.1f}" for name, value in result.auroc.items()))
    print(f"wall time {time.perf_counter() - started:.1f} s (training and scoring {result.seconds:.1f} s; "
          f"{len(normal)} normal, {len(test)} test images)")
    if args.curves:
        Path(args.curves).write_text(json.dumps(result.to_dict(), indent=1))
    return 0


def _table6(args: argparse.Namespace, settings: PandaSettings, classes: list[str]) -> int:
    """Table 6 over several Fashion-MNIST classes: one comparison per normal class, a mean row, a JSON file."""
    import time

    from core.adaptation.compare import compare_strategies

    if not args.test or not args.test.startswith("fashion-mnist:"):
        raise SystemExit("--compare over several classes needs --test fashion-mnist:all[:N] as well")
    started = time.perf_counter()
    per_class: dict[str, Any] = {}
    for name in classes:
        began = time.perf_counter()
        normal = read_images(_with_class(args.normal, name), "normal")
        test = read_images(_with_class(args.test, name), "test")
        result = compare_strategies(
            normal, test, settings, epochs=args.epochs or None, early_epoch=args.early_epoch,
            ewc_epochs=args.ewc_epochs, strategies=_strategies(args.strategies), ewc_curves=not args.no_ewc_curves,
            on_epoch=lambda run, record, name=name: _printer(args.quiet, f"[{name} {run}] ")(record),
        )
        per_class[name] = {**result.to_dict(), "seconds": time.perf_counter() - began,
                           "n_train": len(normal), "n_test": len(test)}
        print(f"{name}: " + ", ".join(f"{row.method} {100 * row.auroc:.1f}" for row in result.rows
                                      if row.auroc is not None), flush=True)
        if args.table:  # after every class: a long run that is stopped keeps what it measured
            Path(args.table).write_text(json.dumps({"settings": dataclasses.asdict(settings), "command": sys.argv,
                                                    "classes": classes, "per_class": per_class}, indent=1))
    wall = time.perf_counter() - started
    print(f"wall time {wall / 60:.1f} min for {len(classes)} classes")
    _write_table6(per_class, classes, dataclasses.asdict(settings), {"command": sys.argv, "wall_seconds": wall},
                  args.table)
    return 0


def _write_table6(per_class: dict[str, Any], classes: list[str], settings: dict[str, Any],
                  extra: dict[str, Any], path: str | None) -> dict[str, Any]:
    """Print one row per class, the mean and the paper's row; write everything to ``path`` as JSON."""
    import numpy as np

    methods = [row["method"] for row in next(iter(per_class.values()))["rows"]]
    table = {name: {row["method"]: row["auroc"] for row in entry["rows"]} for name, entry in per_class.items()}
    means = {m: float(np.mean([table[c][m] for c in table]))
             for m in methods if all(table[c].get(m) is not None for c in table)}
    width = max(len(c) for c in [*classes, "paper (ResNet152)"]) + 2

    def cell(value: Any) -> str:
        return f"{'-' if value is None else (f'{100 * value:.1f}' if isinstance(value, float) and value <= 1 else value):>28}"

    print("class".ljust(width) + "".join(f"{m:>28}" for m in methods))
    for name in classes:
        print(name.ljust(width) + "".join(cell(table[name].get(m)) for m in methods))
    print("mean".ljust(width) + "".join(cell(means.get(m)) for m in methods))
    print("paper (ResNet152)".ljust(width) + "".join(cell(PAPER_TABLE6_FMNIST.get(m)) for m in methods))
    document = {"settings": settings, **extra, "classes": classes, "table": table, "mean": means,
                "paper_fmnist": PAPER_TABLE6_FMNIST, "per_class": per_class}
    if path:
        Path(path).write_text(json.dumps(document, indent=1))
    return document


def merge_tables(paths: list[str], out: str | None) -> dict[str, Any]:
    """Join Table 6 JSON files of processes that ran different classes with the same settings.

    Raises ``ValueError`` naming the file when one cannot be read, was run with
    other settings, or repeats a class another file has.
    """
    from core.adaptation.table_io import read_table_part
    from core.datasets.fashion_mnist import FASHION_MNIST_CLASSES

    per_class: dict[str, Any] = {}
    settings: dict[str, Any] | None = None
    commands, walls = [], []
    for path in paths:
        document = read_table_part(path)  # every field used below is checked there, naming the file
        part, part_settings = document.per_class, document.settings
        if settings is not None and part_settings != settings:
            changed = sorted(k for k in set(settings) | set(part_settings) if settings.get(k) != part_settings.get(k))
            raise ValueError(f"{path}: run with other settings than {paths[0]} ({', '.join(changed)})")
        settings = part_settings
        repeated = sorted(set(part) & set(per_class))
        if repeated:
            raise ValueError(f"{path}: repeats class(es) {', '.join(repeated)} of an earlier file")
        per_class.update(part)
        commands.append(document.command)
        walls.append(document.wall_seconds)
    order = {name: i for i, name in enumerate(FASHION_MNIST_CLASSES)}
    classes = sorted(per_class, key=lambda name: order.get(name, len(order)))
    extra = {"merged_from": list(paths), "commands": commands, "wall_seconds_per_file": walls}
    return _write_table6(per_class, classes, settings, extra, out)


def run(args: argparse.Namespace) -> int:
    if args.merge:
        merge_tables(args.merge, args.table)
        return 0
    if args.lesson:
        apply_threads(args.threads)
        return _lesson(args)
    if not args.normal:
        raise SystemExit("--normal is required (except with --merge and --lesson)")
    apply_threads(args.threads)
    settings = settings_from_args(args)
    if args.compare and fashion_classes(args.normal):
        return _table6(args, settings, fashion_classes(args.normal))
    normal = read_images(args.normal, "normal")
    test = read_images(labelled_test_spec(args.normal, args.test), "test") if args.test else None
    outliers = read_images(args.outliers, "outliers") if args.outliers else None
    fisher_images = read_images(args.fisher_images, "normal") if args.fisher_images else None
    for name, image_set in (("normal", normal), ("test", test), ("outliers", outliers)):
        if image_set is not None and image_set.problems and not args.quiet:
            print(f"{name}: skipped {len(image_set.problems)} files (first: {image_set.problems[0]})", file=sys.stderr)

    if args.time_cache:
        from core.adaptation.compare import time_prefix_cache

        timing = time_prefix_cache(normal, settings, epochs=1, rounds=max(1, args.rounds))
        print(f"epoch on {len(normal)} images: naive {timing.naive_epoch_seconds:.2f} s, "
              f"cached {timing.cached_epoch_seconds:.2f} s, ratio {timing.ratio:.2f} "
              f"(fastest of {timing.rounds}; cache {timing.cache_bytes / 2**20:.1f} MiB {timing.cache_dtype}, "
              f"built in {timing.cache_build_seconds:.1f} s; max weight difference {timing.max_weight_difference:.2g}; "
              f"peak memory {timing.peak_memory_bytes / 2**30:.2f} GiB)")
        if args.curves:
            Path(args.curves).write_text(json.dumps({"settings": dataclasses.asdict(settings), **timing.to_dict()}, indent=1))
        return 0

    if args.compare:
        from core.adaptation.compare import compare_strategies

        if test is None:
            raise SystemExit("--compare needs --test with labelled images")
        result = compare_strategies(
            normal, test, settings, epochs=args.epochs or None, early_epoch=args.early_epoch,
            ewc_epochs=args.ewc_epochs, fisher_reference=fisher_images, strategies=_strategies(args.strategies),
            ewc_curves=not args.no_ewc_curves,
            on_epoch=lambda name, record: _printer(args.quiet, f"[{name}] ")(record),
        )
        print(result.table())
        if args.curves:
            Path(args.curves).write_text(json.dumps({"settings": dataclasses.asdict(settings), **result.to_dict()}, indent=1))
        return 0

    from core.adaptation.curves import write_curves
    from core.detectors.panda import PandaDetector

    detector = PandaDetector(settings)
    detector.fit(normal, test=test, outliers=outliers, fisher_reference=fisher_images, on_epoch=_printer(args.quiet))
    summary = dict(detector.summary_)
    if summary.get("fisher_statistics") and not args.quiet:
        stats = summary["fisher_statistics"]
        print(f"Fisher diagonal ({summary['fisher_source']}): {stats['entries']} entries, mean {stats['mean']:.3g}, "
              f"median {stats['median']:.3g}, max {stats['max']:.3g}; lambda = {settings.ewc_lambda:g}", file=sys.stderr)
    if test is not None and test.has_labels:
        from core.metrics import image_auroc

        details = detector.score_details(test)
        summary["test_auroc"] = image_auroc(test.labels, details.scores)
        if details.choice is not None:
            summary["ses_choice_counts"] = [int((details.choice == i).sum()) for i in range(len(detector.states_))]
        print(f"test ROC AUC {100 * summary['test_auroc']:.2f}%  ({settings.strategy}, "
              f"{summary['epochs']} epochs, {summary['minibatches']} minibatches)")
        if details.pretrained is not None:
            summary["pretrained_auroc"] = image_auroc(test.labels, details.pretrained)
            summary["adapted_auroc"] = image_auroc(test.labels, details.adapted)
            print(f"  of which: the pretrained network alone {100 * summary['pretrained_auroc']:.2f}%, "
                  f"the trained one alone {100 * summary['adapted_auroc']:.2f}%")
    if summary.get("fused"):
        print(f"model fuses the pretrained network (epoch 0) with epoch {summary['kept_epoch']}: {summary['kept_reason']}")
    else:
        print(f"model keeps epoch {summary['kept_epoch']}: {summary['kept_reason']}")
    if args.out:
        print(f"model written to {detector.save(args.out)}")
    if args.curves:
        write_curves(args.curves, detector.curves_, {"settings": dataclasses.asdict(settings), "summary": summary})
    if args.save_fisher:
        from core.adaptation.fisher import save_fisher

        if detector.fisher_ is None:
            print("--save-fisher: only strategy ewc uses a Fisher diagonal; nothing written", file=sys.stderr)
        else:
            print(f"Fisher diagonal written to {save_fisher(args.save_fisher, detector.fisher_)}")
    return 0
