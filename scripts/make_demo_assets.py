"""Build the small demo sets bundled under ``assets/demo/`` (run from the repository root).

    python scripts/make_demo_assets.py [--mvtec /work/shared/data/mvtec_ad/bottle]
                                       [--fashion /usr/share/datasets/fashion-mnist]

Two sets, both small enough to ship in the repository (< 5 MB together):

* ``assets/demo/bottle``: 40 ``train/good`` images and 20 test images (8 good,
  4 of each defect type) of MVTec AD "bottle", with their ground-truth masks,
  in the MVTec layout so that ``core.datasets.read_mvtec`` reads it unchanged.
  Images are resized from 900x900 to 256x256 JPEG; masks to 256x256 PNG with
  nearest-neighbour sampling so they stay binary.
* ``assets/demo/fashion``: Fashion-MNIST one-class sample, normal class
  "Trouser": 100 training trousers and 100 test images stratified over all ten
  classes, as 28x28 PNGs in ``train/<class>`` / ``test/<class>`` folders
  (``core.datasets.read_class_folders``).

The selection is deterministic (evenly spaced over the sorted file names, and
a fixed seed for Fashion-MNIST), so running the script again reproduces the
same files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.datasets import FASHION_MNIST_DIR, read_fashion_mnist  # noqa: E402

DEMO_ROOT = Path(__file__).resolve().parents[1] / "assets" / "demo"
SIDE = 256
JPEG_QUALITY = 88
TRAIN_GOOD = 40
TEST_PER_TYPE = {"good": 8, "broken_large": 4, "broken_small": 4, "contamination": 4}
FASHION_NORMAL = "Trouser"
FASHION_TRAIN, FASHION_TEST = 100, 100


def evenly_spaced(paths: list[Path], count: int) -> list[Path]:
    """``count`` paths spread over the sorted list, so the sample covers the whole set."""
    paths = sorted(paths)
    if count >= len(paths):
        return paths
    positions = np.linspace(0, len(paths) - 1, count).round().astype(int)
    return [paths[i] for i in positions]


def save_image(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.LANCZOS).save(
            target, "JPEG", quality=JPEG_QUALITY, optimize=True
        )


def save_mask(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as mask:
        binary = mask.convert("L").resize((SIDE, SIDE), Image.Resampling.NEAREST).point(lambda v: 255 if v else 0)
        binary.save(target, "PNG", optimize=True)


def make_bottle(mvtec_bottle: Path, target: Path) -> int:
    count = 0
    for path in evenly_spaced(list((mvtec_bottle / "train" / "good").glob("*.png")), TRAIN_GOOD):
        save_image(path, target / "train" / "good" / f"{path.stem}.jpg")
        count += 1
    for defect, wanted in TEST_PER_TYPE.items():
        for path in evenly_spaced(list((mvtec_bottle / "test" / defect).glob("*.png")), wanted):
            save_image(path, target / "test" / defect / f"{path.stem}.jpg")
            count += 1
            if defect != "good":
                mask = mvtec_bottle / "ground_truth" / defect / f"{path.stem}_mask.png"
                save_mask(mask, target / "ground_truth" / defect / f"{path.stem}_mask.png")
    shutil.copyfile(mvtec_bottle / "license.txt", target / "LICENSE.txt")
    (target / "ATTRIBUTION.md").write_text(
        "# MVTec AD, category \"bottle\" (demo subset)\n\n"
        "A subset of the MVTec Anomaly Detection data set, resized to 256x256 by\n"
        "`scripts/make_demo_assets.py` (images as JPEG, masks as binary PNG).\n\n"
        "Copyright 2019 MVTec Software GmbH. Licensed under the Creative Commons\n"
        "Attribution-NonCommercial-ShareAlike 4.0 International License (full text in\n"
        "`LICENSE.txt`, also at https://creativecommons.org/licenses/by-nc-sa/4.0/).\n"
        "Changes: subset selected and resized. Non-commercial use only; derivatives must\n"
        "be shared under the same licence.\n\n"
        "Citation: Paul Bergmann, Michael Fauser, David Sattlegger, Carsten Steger,\n"
        "\"MVTec AD - A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection\",\n"
        "IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR), 2019.\n",
        encoding="utf-8",
    )
    return count


def folder_name(class_name: str) -> str:
    # "T-shirt/top" would otherwise become a nested folder.
    return class_name.replace("/", "-")


def make_fashion(idx_folder: Path, target: Path) -> int:
    train, test = read_fashion_mnist(
        idx_folder, normal_class=FASHION_NORMAL, max_train=FASHION_TRAIN, max_test=FASHION_TEST, seed=0
    )
    count = 0
    for split, image_set in (("train", train), ("test", test)):
        for item in image_set:
            path = target / split / folder_name(item.group) / f"{item.name.split('/')[-1]}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(item.array)).save(path, "PNG", optimize=True)
            count += 1
    (target / "LICENSE.txt").write_text(
        "The MIT License (MIT)\n\nCopyright (c) 2017 Zalando SE, https://tech.zalando.com\n\n"
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this\n"
        "software and associated documentation files (the \"Software\"), to deal in the Software\n"
        "without restriction, including without limitation the rights to use, copy, modify, merge,\n"
        "publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons\n"
        "to whom the Software is furnished to do so, subject to the following conditions:\n\n"
        "The above copyright notice and this permission notice shall be included in all copies or\n"
        "substantial portions of the Software.\n\n"
        "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,\n"
        "INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR\n"
        "PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE\n"
        "FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR\n"
        "OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER\n"
        "DEALINGS IN THE SOFTWARE.\n",
        encoding="utf-8",
    )
    (target / "ATTRIBUTION.md").write_text(
        "# Fashion-MNIST (demo subset)\n\n"
        f"{FASHION_TRAIN} training images of the class \"{FASHION_NORMAL}\" (the normal class) and\n"
        f"{FASHION_TEST} test images stratified over all ten classes, written as 28x28 PNG by\n"
        "`scripts/make_demo_assets.py` from the Debian package `dataset-fashion-mnist`.\n\n"
        "Copyright (c) 2017 Zalando SE; MIT licence (`LICENSE.txt`).\n"
        "Han Xiao, Kashif Rasul, Roland Vollgraf, \"Fashion-MNIST: a Novel Image Dataset for\n"
        "Benchmarking Machine Learning Algorithms\", arXiv:1708.07747, 2017.\n",
        encoding="utf-8",
    )
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mvtec", type=Path, default=Path("/work/shared/data/mvtec_ad/bottle"))
    parser.add_argument("--fashion", type=Path, default=Path(FASHION_MNIST_DIR))
    parser.add_argument("--out", type=Path, default=DEMO_ROOT)
    args = parser.parse_args()
    for name in ("bottle", "fashion"):
        shutil.rmtree(args.out / name, ignore_errors=True)
    bottle = make_bottle(args.mvtec, args.out / "bottle")
    fashion = make_fashion(args.fashion, args.out / "fashion")
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"wrote {bottle} bottle and {fashion} Fashion-MNIST images to {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
