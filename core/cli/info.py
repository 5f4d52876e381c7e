"""``python -m core info``: the device, the kNN backend and which backbones work offline."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        "info", help="show the device, the kNN backend and the backbones' weights",
        description="Show the compute device, the kNN backend and, for each backbone, whether its "
        "pretrained weights are available offline.",
    )


def describe_device() -> str:
    import torch

    from core.backbones import default_device

    device = default_device()
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def describe_knn() -> str:
    from core import knn

    backend = knn.choose_backend()
    if knn.faiss is None:
        return f"{backend} (FAISS not installed)"
    version = getattr(knn.faiss, "__version__", "unknown version")
    return f"{backend} (FAISS {version}, GPU support: {knn.faiss_gpu_available()})"


def run(args: argparse.Namespace) -> int:
    from core import __version__
    from core.backbones import DEFAULT_BACKBONE, list_backbones, weights_status

    print(f"anomaly-features {__version__}")
    print(f"device:  {describe_device()}")
    print(f"kNN:     {describe_knn()}")
    print("backbones:")
    for name in list_backbones():
        marker = " (default)" if name == DEFAULT_BACKBONE else ""
        print(f"  {name}{marker}: {weights_status(name)}")
    return 0
