"""The diagonal Fisher information that weights PANDA-EWC's penalty (paper, Eq. 3).

F_theta = E_x E_{y ~ p(y|x)} [ (d log p(y|x) / d theta)^2 ]

is estimated with the pretrained network's own ImageNet classifier: for each
reference image a label is drawn from the network's predictive distribution
(the "true" Fisher of Kirkpatrick et al., not the empirical one, which would
need ImageNet labels) and the squared per-sample gradient is averaged. Only
the trainable parameters need it.

EWC runs use :func:`estimate_fisher_minibatch` instead: the paper's Eq. 3 over
100 minibatches (squared gradients of the minibatch loss, labels = the
network's own top-1), which keeps F on the scale lambda = 1e4 was chosen
for. ImageNet is not available here, so its images come from an offline
photo pool (:mod:`core.adaptation.fisher_pool`, the default), or from the
normal training images (``PandaSettings.fisher_source="normal"``), or a user
passes a Fisher file estimated elsewhere (:func:`load_fisher`).

Fisher files are ``.npz`` archives with one float32 array per parameter name
and a JSON header; they are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from core.adaptation.network import TrainableNetwork
from core.adaptation.prefix_cache import TrainingInputs
from core.npz_io import NpzFileError, open_npz, write_npz
from core.progress import CancelFn, ProgressFn, check_cancel, report_progress

_HEADER = "__fisher_header__"
FISHER_BATCH = 32
"""Images per minibatch of the Fisher estimate (the paper's 100 minibatches of 32)."""
FISHER_FORMAT = 1


class FisherFileError(NpzFileError):
    """A Fisher file cannot be read or does not fit the network."""


@dataclass(frozen=True)
class FisherDiagonal:
    """Per-parameter Fisher diagonals: name -> CPU float32 tensor of the parameter's shape."""

    values: dict[str, torch.Tensor]
    samples: int
    source: str
    backbone: str

    def total(self) -> float:
        return float(sum(v.double().sum() for v in self.values.values()))

    def statistics(self) -> dict[str, float]:
        """Size of the diagonal: entries, mean, median and max. lambda*F sets how far each weight may move
        (a weight moves freely only where lr*steps*lambda*F << 1), so these say what lambda means here."""
        flat = torch.cat([v.reshape(-1).float() for v in self.values.values()])
        return {"entries": int(flat.numel()), "mean": float(flat.double().mean()),
                "median": float(flat.median()), "max": float(flat.max())}

    def for_network(self, network: TrainableNetwork) -> dict[str, torch.Tensor]:
        """The entries of ``network``'s trainable parameters; every one must be present with its shape."""
        params = network.trainable_parameters()
        missing = [name for name in params if name not in self.values]
        if missing:
            raise FisherFileError(
                f"the Fisher diagonal ({self.source}) has no entry for {len(missing)} trainable parameters, "
                f"e.g. {missing[0]!r}; it was estimated for other trainable pieces"
            )
        for name, parameter in params.items():
            if tuple(self.values[name].shape) != tuple(parameter.shape):
                raise FisherFileError(f"Fisher entry {name!r} has shape {tuple(self.values[name].shape)}, "
                                      f"the parameter {tuple(parameter.shape)}")
        return {name: self.values[name] for name in params}


class _TopLogits(nn.Module):
    """Prefix output -> ImageNet logits, as one module so torch.func can call it with other parameters."""

    def __init__(self, network: TrainableNetwork) -> None:
        super().__init__()
        self.net = network

    def forward(self, inputs: torch.Tensor, start: int) -> torch.Tensor:
        return self.net.logits(self.net.features(inputs, start))


def _per_sample_squared_grads(
    module: _TopLogits, params: dict[str, torch.Tensor], inputs: torch.Tensor, onehot: torch.Tensor, start: int
) -> dict[str, torch.Tensor]:
    """Sum over the batch of squared per-sample gradients of log p(y|x); (B, ...) inputs, (B, K) one-hot labels."""
    buffers = dict(module.named_buffers())

    def log_likelihood(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(module, (p, buffers), (x[None], start), strict=False)
        # One-hot product instead of indexing: vmap cannot index by a batched label.
        return (torch.log_softmax(logits, dim=-1)[0] * y).sum()

    grads = vmap(grad(log_likelihood), in_dims=(None, 0, 0))(params, inputs, onehot)
    return {name: g.pow(2).sum(dim=0) for name, g in grads.items()}


def estimate_fisher(
    network: TrainableNetwork,
    reference: TrainingInputs,
    max_samples: int = 3200,
    chunk: int = 8,
    seed: int = 0,
    source: str = "normal training images",
    backbone: str = "",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> FisherDiagonal:
    """Diagonal Fisher of the trainable parameters at the network's current (pretrained) weights.

    ``reference``: inputs (images or prefix cache) of the reference images; the
    first ``max_samples`` of a seeded permutation are used (paper: 100
    minibatches of 32 = 3200). ``chunk`` images are differentiated at once
    (per-sample gradients cost chunk x the trainable parameter memory).
    """
    module = _TopLogits(network)
    names = {f"net.network.{name}": name for name in network.trainable_parameters()}
    params = {full: p.detach() for full, p in module.named_parameters() if full in names}
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(reference), generator=generator)[:max_samples]
    done = 0
    for part in torch.split(order, chunk):
        check_cancel(cancel)
        inputs = reference.batch(part).to(network.device)
        with torch.no_grad():
            probs = torch.softmax(module(inputs, reference.start).float(), dim=-1)
        labels = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
        onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(inputs.device, torch.float32)
        for name, value in _per_sample_squared_grads(module, params, inputs, onehot, reference.start).items():
            totals[name] += value
        done += len(part)
        report_progress(progress, done, len(order))
    values = {names[full]: (total / max(done, 1)).cpu().float() for full, total in totals.items()}
    return FisherDiagonal(values=values, samples=done, source=source, backbone=backbone)


def estimate_fisher_minibatch(
    network: TrainableNetwork,
    batches: Iterable[tuple[torch.Tensor, int]],
    count: int,
    source: str,
    backbone: str = "",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> FisherDiagonal:
    """Eq. 3 as the paper computes it: the mean over minibatches of the squared gradient of the pretraining loss.

    ``batches`` yields ``count`` pairs (inputs (B, ...), start piece): images
    (start 0) or prefix outputs. The loss of a minibatch is the mean
    cross-entropy of the ImageNet classifier against its own top-1 labels
    (the stand-in for ImageNet's labels, which agree with them on images the
    network knows). Squaring the *minibatch* gradient, as the paper's Eq. 3 over
    its 100 minibatches of 32 does, keeps F on the paper's scale, so that
    lambda = 1e4 weighs the penalty as it did there.
    """
    params = network.trainable_parameters()
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    done = samples = 0
    for inputs, start in batches:
        check_cancel(cancel)
        inputs = inputs.to(network.device)
        logits = network.logits(network.features(inputs, start)).float()
        labels = logits.argmax(dim=1).detach()
        loss = torch.nn.functional.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, list(params.values()))
        for name, g in zip(params, grads):
            totals[name] += g.detach().pow(2)
        done += 1
        samples += len(inputs)
        report_progress(progress, done, count)
    if done == 0:
        raise ValueError("no minibatches to estimate the Fisher diagonal on")
    values = {name: (total / done).cpu().float() for name, total in totals.items()}
    return FisherDiagonal(values=values, samples=samples, source=source, backbone=backbone)


def save_fisher(path: str | os.PathLike, fisher: FisherDiagonal) -> Path:
    """Write ``fisher`` as an ``.npz`` of float32 arrays plus a JSON header (no pickled objects), atomically."""
    header = {"format": FISHER_FORMAT, "samples": fisher.samples, "source": fisher.source, "backbone": fisher.backbone}
    arrays = {name: value.numpy().astype(np.float32) for name, value in fisher.values.items()}
    return write_npz(path, arrays, header, _HEADER)


def load_fisher(path: str | os.PathLike) -> FisherDiagonal:
    """Read a Fisher file written by :func:`save_fisher` (or any npz of name -> float array).

    Without a header the file is accepted as long as every array is a finite,
    non-negative float array; ``source`` then names the file. Every problem
    raises :class:`FisherFileError` naming the file.
    """
    path = Path(path)
    header: dict = {"samples": 0, "source": f"file {path.name}", "backbone": ""}
    with open_npz(path, "Fisher file", FisherFileError) as npz:
        if _HEADER in npz:
            header.update(npz.header(_HEADER))
            if header.get("format", FISHER_FORMAT) != FISHER_FORMAT:
                raise npz.fail(f"Fisher format {header.get('format')!r} is not supported")
            if not isinstance(header["samples"], int) or isinstance(header["samples"], bool):
                raise npz.fail(f"damaged Fisher header (samples {header['samples']!r})")
        arrays = npz.arrays(exclude=(_HEADER,))
    values = {}
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise FisherFileError(f"{path}: entry {name!r} is {array.dtype}, expected floats")
        if not np.isfinite(array).all() or (array < 0).any():
            raise FisherFileError(f"{path}: entry {name!r} has negative or non-finite values")
        values[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not values:
        raise FisherFileError(f"{path}: the Fisher file holds no arrays")
    return FisherDiagonal(values=values, samples=header["samples"], source=str(header["source"]),
                          backbone=str(header["backbone"]))
