"""``python -m core bench-scale``: how the streaming scorer behaves on many images.

It writes N small images to a folder (Fashion-MNIST's 70,000 as PNG files, or
MVTec bottle images replicated with flips and crops), fits a DN2 model on
normal images, then measures:

* the bare scoring speed: pre-decoded tensors straight through the detector's
  ``score_batch`` (backbone + kNN, no decoding, no file access);
* the streaming run (``--engine local``): images/s, and the process's resident
  memory (RSS) and peak (high-water mark) at 10 %, 50 % and 100 % of the run;
* the resume check: a ``python -m core score`` subprocess on the first
  ``--resume-n`` images is killed with SIGKILL half-way, resumed with
  ``--resume``, and its rows compared with the streaming run's;
* the same scoring on a local Ray cluster (``--engine ray``): images/s and the
  largest relative score difference from the in-process run.

Prints a table and writes everything to ``--json``. Timings depend on what
else runs on the machine: say so when you quote them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core.cli import add_threads_option, apply_threads

_COMPLETE = ".complete"  # hidden: the listing ignores it


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench-scale", aliases=["bench_scale"],
        help="scale benchmark: images/s, memory over the run, kill-and-resume, Ray vs in-process",
        description="Score N images with the streaming path and report throughput against the bare detector, "
        "peak memory at 10/50/100 %% of the run, a SIGKILL-and-resume check and the Ray engine's speed and "
        "score agreement.",
    )
    parser.add_argument("--n", type=int, default=70_000, help="number of images (default 70000)")
    parser.add_argument("--source", choices=("fashion-mnist", "bottle"), default="fashion-mnist",
                        help="fashion-mnist: the 70,000 28x28 images; bottle: MVTec bottle images replicated "
                        "with flips and crops (128x128)")
    parser.add_argument("--fashion-dir", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX files")
    parser.add_argument("--bottle-dir", default="../shared/data/mvtec_ad/bottle", help="MVTec bottle folder")
    parser.add_argument("--data-dir", default=None,
                        help="where the N images are written once and reused (default: /tmp/bench-scale-<source>-<N>)")
    parser.add_argument("--out", default=None, help="work folder for model and results (default: <data-dir>-runs)")
    parser.add_argument("--size", type=int, default=32, help="input size (resize = crop) of the model (default 32)")
    parser.add_argument("--weights", default=None, help="backbone weights (default: the packaged ImageNet ones; "
                        "'random' for a quick try)")
    parser.add_argument("--normal", type=int, default=1000, help="normal images the DN2 model is fitted on")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads or processes (local engine)")
    parser.add_argument("--decode", choices=("auto", "threads", "processes"), default="auto",
                        help="local engine: decode in threads or worker processes (auto: processes from 2,000 "
                        "images on, as `score` does)")
    parser.add_argument("--engines", default="local,ray", help="comma-separated: local, ray (default both)")
    parser.add_argument("--ray-workers", type=int, default=2, help="Ray actors (1 torch thread each)")
    parser.add_argument("--bare-n", type=int, default=2048, help="images for the bare scoring speed")
    parser.add_argument("--resume-n", type=int, default=3000, help="images in the kill-and-resume check (0 = skip)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="then alternate local and Ray runs on --round-n images this many times: on a busy "
                        "machine only runs side by side compare fairly (0 = skip)")
    parser.add_argument("--round-n", type=int, default=10_000, help="images per alternating run (default 10000)")
    parser.add_argument("--json", metavar="REPORT.json", help="write the report here")
    add_threads_option(parser)
    return parser


# --------------------------------------------------------------------------- memory


def memory_mb() -> dict[str, float]:
    """This process's resident memory now (``rss``) and its peak so far (``peak``), in MB (Linux /proc)."""
    values = {}
    try:
        with open("/proc/self/status", encoding="ascii") as stream:
            for line in stream:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    values["rss" if name == "VmRSS" else "peak"] = int(rest.split()[0]) / 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        values = {"rss": peak, "peak": peak}
    values["children_rss"] = children_rss_mb()
    return values


def children_rss_mb() -> float:
    """Resident memory of this process's children (the decoding processes), in MB; 0 where /proc is missing."""
    total = 0.0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            children = open(f"/proc/self/task/{task}/children", encoding="ascii").read().split()
        except OSError:
            continue
        for pid in children:
            try:
                with open(f"/proc/{pid}/status", encoding="ascii") as stream:
                    total += sum(int(line.split()[1]) / 1024 for line in stream if line.startswith("VmRSS:"))
            except OSError:
                continue  # it ended meanwhile
    return total


class MemoryTrace:
    """A progress callback that records RSS and peak at 10 %, 50 % and 100 % of a run."""

    MARKS = (10, 50, 100)

    def __init__(self) -> None:
        self.points: dict[int, dict[str, float]] = {}
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        for mark in self.MARKS:
            if mark not in self.points and total and done * 100 >= mark * total:
                self.points[mark] = {**memory_mb(), "done": done, "seconds": time.perf_counter() - self.started}


# --------------------------------------------------------------------------- data


def _write_all(paths_and_pixels, count: int) -> None:
    from PIL import Image

    def save(item) -> None:
        path, pixels = item
        Image.fromarray(pixels).save(path, compress_level=1)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for done, _ in enumerate(pool.map(save, paths_and_pixels), start=1):
            if done % 10_000 == 0:
                print(f"  wrote {done}/{count} images", file=sys.stderr)


def _shard(folder: Path, index: int) -> Path:
    # 1,000 files per folder: large flat folders are slow on some file systems.
    return folder / f"{index // 1000:03d}" / f"{index:06d}.png"


def fashion_images(directory: str, n: int) -> np.ndarray:
    """The first ``n`` of Fashion-MNIST's 60,000 training then 10,000 test images, (n, 28, 28) uint8, and classes."""
    from core.datasets.fashion_mnist import _read_idx_pair

    train, train_classes = _read_idx_pair(Path(directory), "train")
    test, test_classes = _read_idx_pair(Path(directory), "t10k")
    images, classes = np.concatenate([train, test]), np.concatenate([train_classes, test_classes])
    if n > len(images):
        raise ValueError(f"--n {n}: Fashion-MNIST has {len(images)} images")
    return images[:n], classes[:n]


def bottle_images(directory: str, n: int, side: int = 128, seed: int = 0):
    """``n`` (side, side, 3) variants of the MVTec bottle images: random crops (80-100 %) and flips."""
    import cv2

    from core.datasets import read_mvtec

    train, test = read_mvtec(directory)
    bases = [cv2.resize(item.load(), (2 * side, 2 * side), interpolation=cv2.INTER_AREA) for item in train.concat(test.with_prefix("test"))]
    labels = [0] * len(train) + [int(item.label) for item in test]
    rng = np.random.default_rng(seed)

    def variant(i: int) -> np.ndarray:
        base = bases[i % len(bases)]
        if i < len(bases):
            return cv2.resize(base, (side, side), interpolation=cv2.INTER_AREA)
        crop = int(rng.uniform(0.8, 1.0) * base.shape[0])
        top, left = rng.integers(0, base.shape[0] - crop + 1, 2)
        pixels = base[top:top + crop, left:left + crop]
        pixels = pixels[:, ::-1] if rng.random() < 0.5 else pixels
        pixels = pixels[::-1] if rng.random() < 0.5 else pixels
        return cv2.resize(np.ascontiguousarray(pixels), (side, side), interpolation=cv2.INTER_AREA)

    return variant, labels, len(bases)


def prepare(args: argparse.Namespace, folder: Path) -> Path:
    """Write the N images into ``folder`` once (a marker file says it is complete)."""
    marker = folder / _COMPLETE
    if marker.is_file() and marker.read_text().strip() == str(args.n):
        return folder
    print(f"writing {args.n} {args.source} images to {folder} (once)", file=sys.stderr)
    if args.source == "fashion-mnist":
        images, _ = fashion_images(args.fashion_dir, args.n)
        work = ((_shard(folder, i), images[i]) for i in range(args.n))
    else:
        variant, _, _ = bottle_images(args.bottle_dir, args.n)
        work = ((_shard(folder, i), variant(i)) for i in range(args.n))
    for shard in range(0, args.n, 1000):
        _shard(folder, shard).parent.mkdir(parents=True, exist_ok=True)
    _write_all(work, args.n)
    marker.write_text(str(args.n))
    return folder


def fit_model(args: argparse.Namespace, out: Path) -> Path:
    """A DN2 model on ``--normal`` normal images (T-shirts for Fashion-MNIST, good training bottles)."""
    from core.config import DN2Settings, FeatureSettings
    from core.datasets import ImageItem, ImageSet
    from core.detectors import make_detector

    if args.source == "fashion-mnist":
        images, classes = fashion_images(args.fashion_dir, 60_000)
        normal = np.flatnonzero(classes == 0)[: args.normal]
        items = [ImageItem(name=f"n{i}", array=images[i], label=0) for i in normal]
    else:
        variant, labels, bases = bottle_images(args.bottle_dir, args.normal)
        good = [i for i in range(bases) if labels[i] == 0][: args.normal]
        items = [ImageItem(name=f"n{i}", array=variant(i), label=0) for i in good]
    settings = DN2Settings(features=FeatureSettings(resize=args.size, crop=args.size, weights=args.weights,
                                                    batch_size=args.batch_size))
    detector = make_detector("dn2", settings).fit(ImageSet(items))
    return detector.save(out / "dn2.npz")


# --------------------------------------------------------------------------- measurements


def bare_speed(model: Path, folder: Path, n: int, batch_size: int) -> float:
    """Images/s of ``score_batch`` on pre-decoded tensors (no decoding, no files): the ceiling."""
    import torch

    from core.detectors import load_detector
    from core.scoring import iter_sources
    from core.scoring.stream import decode_one

    detector = load_detector(model)
    sources = []
    for source in iter_sources([folder]):
        if source.problem is None:
            sources.append(source)
        if len(sources) >= n:
            break
    tensors = torch.from_numpy(np.stack([decode_one(s, detector.image_size).tensor for s in sources]))
    detector.score_batch(tensors[:batch_size])  # warm-up: first call builds the network and the index
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(tensors), batch_size):
            detector.score_batch(tensors[first:first + batch_size])
    return len(tensors) / (time.perf_counter() - start)


def _score_command(model: Path, listing: Path, out: Path, batch_size: int, threads: int, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "core", "score", "--model", str(model), str(listing), "--csv", str(out),
               "--batch-size", str(batch_size), "--threads", str(threads), "--quiet"]
    return command + (["--resume"] if resume else [])


def resume_check(model: Path, folder: Path, reference: dict[str, dict], n: int, out: Path, batch_size: int,
                 threads: int) -> dict:
    """SIGKILL a ``score`` subprocess half-way through ``n`` images, ``--resume`` it, compare with ``reference``."""
    from core.scoring import read_results

    listing = out / "resume-list.txt"
    files = _first_files(folder, n)
    listing.write_text("\n".join(files) + "\n")
    result_file = out / "resume.csv"
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen(_score_command(model, listing, result_file, batch_size, threads, False), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        if result_file.exists() and result_file.read_bytes().count(b"\n") > n // 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    killed_rows = len(read_results(result_file))
    subprocess.run(_score_command(model, listing, result_file, batch_size, threads, True), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = read_results(result_file)
    names = [row["file"] for row in rows]
    worst = max(abs(float(row["score"]) - float(reference[row["file"]]["score"])) / abs(float(reference[row["file"]]["score"]))
                for row in rows)
    return {
        "images": n, "killed": process.returncode == -signal.SIGKILL, "rows_when_killed": killed_rows,
        "rows_after_resume": len(rows), "duplicates": len(names) - len(set(names)),
        "same_files": set(names) == set(files), "max_relative_score_difference": worst,
        "ok": len(rows) == n and len(set(names)) == n and set(names) == set(files) and worst <= 1e-6,
    }


def _first_files(folder: Path, n: int) -> list[str]:
    from core.scoring import iter_sources

    files = []
    for source in iter_sources([folder]):
        if source.problem is None:
            files.append(source.file)
        if len(files) >= n:
            break
    return files


def alternate(model: Path, folder: Path, out: Path, args: argparse.Namespace) -> dict:
    """Local and Ray runs on the same images, one after the other, ``args.rounds`` times: speeds and their ratios."""
    from core.scoring import EngineOptions, score_files

    listing = out / "round-list.txt"
    listing.write_text("\n".join(_first_files(folder, min(args.round_n, args.n))) + "\n")
    engines = {"local": EngineOptions(batch_size=args.batch_size, workers=args.workers, decode=args.decode),
               "ray": EngineOptions("ray", batch_size=args.batch_size, workers=args.ray_workers, threads=1)}
    rounds = []
    for _ in range(args.rounds):
        speeds = {}
        for name, engine in engines.items():
            summary = score_files(model, [listing], out / f"round-{name}.csv", engine=engine)
            speeds[name] = summary.images_per_s
            speeds[f"{name}_steady"] = summary.steady_images_per_s
            speeds[f"{name}_first_rows_seconds"] = summary.first_rows_seconds
        speeds["ray_over_local"] = speeds["ray"] / speeds["local"]
        speeds["ray_over_local_steady"] = speeds["ray_steady"] / speeds["local_steady"]
        rounds.append(speeds)
        print(f"round: local {speeds['local']:.0f} ({speeds['local_steady']:.0f} after the first batch), ray "
              f"{speeds['ray']:.0f} ({speeds['ray_steady']:.0f} after the first batch, which came after "
              f"{speeds['ray_first_rows_seconds']:.1f} s) images/s", file=sys.stderr)
    return {"images": min(args.round_n, args.n), "rounds": rounds,
            "median_ray_over_local": float(np.median([r["ray_over_local"] for r in rounds])),
            "median_ray_over_local_steady": float(np.median([r["ray_over_local_steady"] for r in rounds]))}


def run(args: argparse.Namespace) -> int:
    from core.scoring import EngineOptions, read_results, score_files

    apply_threads(args.threads)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"local", "ray"}
    if unknown or not engines:
        raise ValueError(f"--engines takes local and/or ray, got {args.engines!r}")
    folder = Path(args.data_dir or f"/tmp/bench-scale-{args.source}-{args.n}")
    out = Path(args.out or f"{folder}-runs")
    out.mkdir(parents=True, exist_ok=True)
    prepare(args, folder)
    model = fit_model(args, out)
    import torch

    report: dict = {"n": args.n, "source": args.source, "size": args.size, "batch_size": args.batch_size,
                    "torch_threads": torch.get_num_threads(), "decode_workers": args.workers, "decode": args.decode,
                    "cpus": os.cpu_count(), "weights": args.weights or "pretrained"}
    bare_n = min(args.bare_n, args.n)
    report["bare_images_per_s"] = bare_speed(model, folder, bare_n, args.batch_size)
    print(f"bare scoring (pre-decoded tensors): {report['bare_images_per_s']:.0f} images/s", file=sys.stderr)

    local_csv = out / "local.csv"
    if "local" in engines or args.resume_n or "ray" in engines:
        trace = MemoryTrace()
        before = memory_mb()
        summary = score_files(model, [folder], local_csv, engine=EngineOptions(batch_size=args.batch_size,
                                                                                workers=args.workers,
                                                                                decode=args.decode),
                              progress=trace)
        # On a shared machine the speed drifts: measure the bare speed again after the run and use the mean.
        bare_after = bare_speed(model, folder, bare_n, args.batch_size)
        report["bare_images_per_s_before_after"] = [report["bare_images_per_s"], bare_after]
        report["bare_images_per_s"] = (report["bare_images_per_s"] + bare_after) / 2
        report["local"] = {
            "images_per_s": summary.images_per_s, "seconds": summary.seconds, "scored": summary.scored,
            "steady_images_per_s": summary.steady_images_per_s, "first_rows_seconds": summary.first_rows_seconds,
            "model_share_of_wall_time": summary.model_seconds / summary.seconds if summary.seconds else None,
            "errors": summary.errors, "rss_before_mb": before["rss"], "memory_mb": trace.points,
            "rss_growth_10_to_100_mb": trace.points[100]["rss"] - trace.points[10]["rss"],
            "children_rss_growth_10_to_100_mb": trace.points[100]["children_rss"] - trace.points[10]["children_rss"],
            "peak_growth_10_to_100_mb": trace.points[100]["peak"] - trace.points[10]["peak"],
            "relative_to_bare": summary.images_per_s / report["bare_images_per_s"],
        }
        print(f"local streaming: {summary.images_per_s:.0f} images/s over {summary.scored} images "
              f"({report['local']['relative_to_bare']:.2f} x bare); RSS at 10/50/100 %: "
              + " / ".join(f"{trace.points[m]['rss']:.0f}" for m in MemoryTrace.MARKS) + " MB (decoding processes: "
              + " / ".join(f"{trace.points[m]['children_rss']:.0f}" for m in MemoryTrace.MARKS) + " MB); detector busy "
              f"{report['local']['model_share_of_wall_time']:.0%} of the wall time", file=sys.stderr)
    reference = {row["file"]: row for row in read_results(local_csv)}

    if args.resume_n:
        report["resume"] = resume_check(model, folder, reference, min(args.resume_n, args.n), out, args.batch_size,
                                        args.threads or 1)
        print(f"resume check: {report['resume']}", file=sys.stderr)

    if "ray" in engines:
        from core.scoring.ray_engine import connect, describe_cluster, shutdown

        started = time.perf_counter()
        connect()
        report["ray_start_seconds"] = time.perf_counter() - started
        ray_csv = out / "ray.csv"
        summary = score_files(model, [folder], ray_csv, engine=EngineOptions(
            "ray", batch_size=args.batch_size, workers=args.ray_workers, threads=1))
        rows = read_results(ray_csv)
        worst = max((abs(float(r["score"]) - float(reference[r["file"]]["score"])) / abs(float(reference[r["file"]]["score"]))
                     for r in rows if not r["error"]), default=0.0)
        report["ray"] = {
            "images_per_s": summary.images_per_s, "seconds": summary.seconds, "scored": summary.scored,
            "steady_images_per_s": summary.steady_images_per_s, "first_rows_seconds": summary.first_rows_seconds,
            "workers": args.ray_workers, "cluster": describe_cluster(), "max_relative_score_difference": worst,
            "relative_to_local": summary.images_per_s / report["local"]["images_per_s"],
            "driver_peak_mb": memory_mb()["peak"],
        }
        print(f"ray ({args.ray_workers} workers): {summary.images_per_s:.0f} images/s "
              f"({report['ray']['relative_to_local']:.2f} x local), max relative score difference {worst:.2e}",
              file=sys.stderr)
        if args.rounds:
            report["alternating"] = alternate(model, folder, out, args)
        shutdown()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
