"""``python -m core bench-suite``: defaults, --tune, DN2 and Gaussian on every development line, the proxy's
fidelity, and the tuner's rules chosen leave-one-line-out (:mod:`core.tuning.suite`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from core.cli import add_param_option, add_threads_option, apply_threads, parse_params

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench-suite", aliases=["bench_suite"],
        help="defaults vs --tune vs DN2 vs Gaussian on every development line, with leave-one-line-out rules",
        description="Runs `bench` for DN2, Gaussian, SPADE defaults and SPADE --tune on each line (bottle, DeepPCB, "
        "BSData and non-square crops of the last two), measures how well synthetic defects rank the tuner's "
        "candidates against the real ones, and chooses the tuner's rules leave-one-line-out.",
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA), metavar="DIR",
                        help="folder holding mvtec_ad/bottle, deeppcb/pcb, bsdata/pitting (default ../shared/data)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "anomaly-detection" / "suite"), metavar="DIR",
                        help="where the crops stand-ins are cut once")
    parser.add_argument("--lines", help="comma-separated line names to run (default: all found)")
    parser.add_argument("--reports", nargs="*", metavar="LINE.json",
                        help="skip running: read earlier per-line reports and print the tables")
    parser.add_argument("--out", metavar="DIR", help="write one LINE.json per line here (and read them back)")
    parser.add_argument("--rows", help="with --out: recompute only these rows of lines already there "
                        "(comma-separated of dn2, gaussian, defaults, tuned), e.g. tuned after a tuner change")
    parser.add_argument("--json", metavar="OUT.json", help="write everything here")
    parser.add_argument("--markdown", metavar="OUT.md", help="write the tables as Markdown (what docs/RESULTS.md shows)")
    parser.add_argument("--labelled", default="0", metavar="N,N,...",
                        help="also tune with N marked defects and N good test images for each N (e.g. 0,3,5,10), "
                        "each left out of its own evaluation, beside the oracle (default 0: normal images only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", help="local weights file, or 'random' (tests only)")
    add_param_option(parser)
    add_threads_option(parser)
    return parser


def _fmt(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def tables(reports: list[dict], loo: list[dict]) -> str:
    """The three tables of the suite as text: rows per line, fidelity, leave-one-line-out."""
    lines = ["line            | DN2  | Gauss | defaults img/pix/PRO | tuned img/pix/PRO   | worst loss | tuned choice"]
    for r in reports:
        d, t = r["defaults"], r["tuned"]
        chosen = t.get("chosen") or {}
        kept = " (kept defaults)" if t.get("kept_base") else ""
        lines.append(
            f"{r['line']:<15} | {_fmt(r['dn2']['image_auroc']):>4} | {_fmt(r['gaussian']['image_auroc']):>5} | "
            f"{_fmt(d['image_auroc'])} / {_fmt(d['pixel_auroc'])} / {_fmt(d['pro'])} | "
            f"{_fmt(t['image_auroc'])} / {_fmt(t['pixel_auroc'])} / {_fmt(t['pro'])} | {100 * r['loss']['worst']:+.1f} | "
            f"{chosen.get('resolution')}² {chosen.get('aspect')} {'+'.join(map(str, chosen.get('strides', [])))} "
            f"σ{chosen.get('sigma')}{kept}, tuned in {t.get('tune_s', 0):.0f} s")
    lines.append("")
    lines.append("fidelity (Spearman synthetic vs real over the tuner's candidates; winner's real rank)")
    metrics = list(reports[0]["fidelity"]) if reports else []
    lines.append("line            | " + " | ".join(f"{m:>14}" for m in metrics))
    for r in reports:
        cells = [f"{r['fidelity'][m]['spearman']:+.2f} (#{r['fidelity'][m]['winner_real_rank']:>2})" for m in metrics]
        lines.append(f"{r['line']:<15} | " + " | ".join(f"{c:>14}" for c in cells))
    lines.append("")
    lines.append("leave one line out (rules chosen on the other lines; change vs the base settings on this line)")
    lines.append("held-out line   | margin | image rule | pixel AUROC | PRO    | image vs DN2")
    for row in loo:
        margin = "never" if math.isinf(row["margin"]) else f"{row['margin']:g} sd"
        lines.append(f"{row['line']:<15} | {margin:>6} | {row['image_rule']:>10} | {100 * row['pixel_auroc']:+11.1f} | "
                     f"{100 * row['pro']:+6.1f} | {100 * row['image_auroc']:+.1f}")
    if loo:
        worst = min(min(row["pixel_auroc"], row["pro"], row["image_auroc"]) for row in loo)
        lines.append(f"worst change over held-out lines and metrics: {100 * worst:+.1f}")
    marked = [r for r in reports if len(r.get("labelled", {})) > 1]
    if marked:
        lines.append("")
        lines.append("marked defects (N defective + N good test images as evidence, left out of N's evaluation)")
        lines.append("line            |  N | tuned img/pix/PRO   | oracle img/pix/PRO  | image score | cross-validated img")
        for r in marked:
            for n, row in sorted(r["labelled"].items(), key=lambda item: int(item[0])):
                oracle = row["oracle"]
                validated = row.get("cross_validated") or {}
                lines.append(
                    f"{r['line']:<15} | {int(n):>2} | {_fmt(row['image_auroc'])} / {_fmt(row.get('pixel_auroc'))} / "
                    f"{_fmt(row.get('pro'))} | {_fmt(oracle['image_auroc'])} / {_fmt(oracle.get('pixel_auroc'))} / "
                    f"{_fmt(oracle.get('pro'))} | {row['image_rule']:>11} | {_fmt(validated.get('image_auroc'))}")
    return "\n".join(lines)


def markdown(reports: list[dict], loo: list[dict]) -> str:
    """The suite's tables as Markdown: rows per line, fidelity, leave-one-line-out, marked defects."""
    out = ["| line | DN2 | Gaussian | SPADE defaults (image / pixel / PRO) | SPADE --tune (image / pixel / PRO) | "
           "tuned - defaults, worst metric | tuned image - max(DN2, defaults) | tuned choice | tuning s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        d, t, chosen = r["defaults"], r["tuned"], r["tuned"].get("chosen") or {}
        choice = (f"{chosen.get('resolution')}² {chosen.get('aspect')}, strides "
                  f"{'+'.join(map(str, chosen.get('strides', [])))}, σ {chosen.get('sigma')}"
                  + (f", {chosen['gallery']}" if chosen.get("gallery", "kmeans") != "kmeans" else "")
                  + (" (defaults kept)" if t.get("kept_base") else ""))
        out.append(f"| {r['line']} | {_fmt(r['dn2']['image_auroc'])} | {_fmt(r['gaussian']['image_auroc'])} | "
                   f"{_fmt(d['image_auroc'])} / {_fmt(d['pixel_auroc'])} / {_fmt(d['pro'])} | "
                   f"{_fmt(t['image_auroc'])} / {_fmt(t['pixel_auroc'])} / {_fmt(t['pro'])} | "
                   f"{100 * min(r['loss'][k] for k in ('image_auroc', 'pixel_auroc', 'pro')):+.1f} | "
                   f"{100 * r['loss']['image_vs_best_baseline']:+.1f} | {choice} | {t.get('tune_s', 0):.0f} |")
    metrics = list(reports[0]["fidelity"]) if reports else []
    out += ["", "| line | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
    for r in reports:
        out.append(f"| {r['line']} | " + " | ".join(
            f"{r['fidelity'][m]['spearman']:+.2f} (#{r['fidelity'][m]['winner_real_rank']} of {r['fidelity'][m]['n']})"
            for m in metrics) + " |")
    if loo:
        out += ["", "| held-out line | margin chosen on the others | image rule chosen on the others | "
                "pixel AUROC change | PRO change | image AUROC - DN2 |", "| --- | --- | --- | --- | --- | --- |"]
        for row in loo:
            margin = "never depart" if math.isinf(row["margin"]) else f"{row['margin']:g} sd"
            out.append(f"| {row['line']} | {margin} | {row['image_rule']} | {100 * row['pixel_auroc']:+.1f} | "
                       f"{100 * row['pro']:+.1f} | {100 * row['image_auroc']:+.1f} |")
    marked = [r for r in reports if len(r.get("labelled", {})) > 1]
    if marked:
        out += ["", "| line | marked N | evaluated | tuned (image / pixel / PRO) | oracle (image / pixel / PRO) | "
                "image score | cross-validated image AUROC |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in marked:
            for n, row in sorted(r["labelled"].items(), key=lambda item: int(item[0])):
                oracle, validated = row["oracle"], row.get("cross_validated") or {}
                out.append(f"| {r['line']} | {n} | {row['n_evaluated']} | {_fmt(row['image_auroc'])} / "
                           f"{_fmt(row.get('pixel_auroc'))} / {_fmt(row.get('pro'))} | {_fmt(oracle['image_auroc'])} / "
                           f"{_fmt(oracle.get('pixel_auroc'))} / {_fmt(oracle.get('pro'))} | {row['image_rule']} | "
                           f"{_fmt(validated.get('image_auroc'))} |")
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    from core.bench import BenchOptions
    from core.tuning.suite import ROWS, development_lines, leave_one_line_out, run_line

    apply_threads(args.threads)
    reports = []
    if args.reports:
        for path in args.reports:
            reports.append(json.loads(Path(path).read_text(encoding="utf-8")))
    else:
        lines = development_lines(Path(args.data), Path(args.cache))
        if args.lines:
            wanted = {name.strip() for name in args.lines.split(",")}
            lines = [line for line in lines if line.name in wanted]
        if not lines:
            print(f"no development line found under {args.data}", file=sys.stderr)
            return 2
        out = Path(args.out) if args.out else None
        rows = [r.strip() for r in args.rows.split(",")] if args.rows else None
        for line in lines:
            saved = out / f"{line.name}.json" if out else None
            earlier = json.loads(saved.read_text(encoding="utf-8")) if saved is not None and saved.exists() else None
            if earlier is not None and rows is None:
                reports.append(earlier)
                print(f"{line.name}: read {saved}")
                continue
            print(f"{line.name}: {line.root}", flush=True)
            options = BenchOptions(seed=args.seed, weights=args.weights, params=parse_params(args.param))
            report = run_line(line, options, lambda text: print(text, flush=True), earlier=earlier,
                              rows=rows if earlier is not None else ROWS,
                              labelled=[int(n) for n in args.labelled.split(",")])
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
            reports.append(report)
    loo = leave_one_line_out(reports) if len(reports) > 1 else []
    print(tables(reports, loo))
    if args.json:
        Path(args.json).write_text(json.dumps({"lines": reports, "leave_one_line_out": loo}, indent=1, default=float),
                                   encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(markdown(reports, loo), encoding="utf-8")
    return 0
