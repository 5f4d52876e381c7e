"""A private backbone copy split into a frozen prefix and a partly trainable top.

PANDA fine-tunes only the last pieces of the pretrained network (the paper's
"last two blocks"); everything below the first trainable piece is frozen, so
its output can be computed once and cached (:mod:`core.adaptation.prefix_cache`).

BatchNorm layers keep their pretrained running statistics: the network stays in
``eval()`` mode for the whole of training, so normalisation uses the frozen
statistics and they are never updated. The affine BN parameters of trainable
pieces are trained like any other weight.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from core.backbones import StagedNetwork


class TrainableNetwork(nn.Module):
    """A :class:`StagedNetwork` with trainable pieces ``trainable`` and everything else frozen.

    ``split`` is the index of the first trainable piece: pieces ``[0, split)``
    form the frozen prefix whose output may be cached; pieces ``[split, end)``
    (the "top") run at every step. A frozen piece above ``split`` still runs in
    the top, only without gradients for its parameters.
    """

    def __init__(self, network: StagedNetwork, trainable: Sequence[str]) -> None:
        super().__init__()
        names = network.piece_names
        unknown = [name for name in trainable if name not in names]
        if unknown or not trainable:
            raise ValueError(f"trainable pieces must be a non-empty subset of {names}; got {tuple(trainable)}")
        self.network = network
        self.trainable = tuple(name for name in names if name in set(trainable))
        self.split = min(names.index(name) for name in self.trainable)
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        for name in self.trainable:
            for parameter in network.pieces[name].parameters():
                parameter.requires_grad_(True)
        self.eval()

    def train(self, mode: bool = True) -> "TrainableNetwork":
        # BatchNorm statistics (and any dropout) must stay frozen while the weights
        # train, so the modules are kept in eval mode whatever the caller asks.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    # ------------------------------------------------------------------ forward
    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> frozen prefix output (B, C, h, w), without gradients."""
        with torch.no_grad():
            out, _ = self.network.forward_pieces(self.network.normalise(images.float()), 0, self.split)
        return out

    def top(self, prefix_output: torch.Tensor) -> torch.Tensor:
        """Prefix output (B, C, h, w) -> pooled features (B, D), differentiable in the trainable pieces."""
        out, _ = self.network.forward_pieces(prefix_output, self.split)
        return self.network.pool(out)

    def features(self, inputs: torch.Tensor, start: int) -> torch.Tensor:
        """Pooled features (B, D) from images (``start=0``) or from cached prefix outputs (``start=split``)."""
        if start == 0:
            return self.top(self.prefix(inputs))
        if start != self.split:
            raise ValueError(f"inputs start at piece {start}, but the trainable top starts at {self.split}")
        return self.top(inputs.float())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) -> the pretrained ImageNet logits (B, classes)."""
        return self.network.classifier(features)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of the trainable pieces (names as in the network's state dict)."""
        return {name: p for name, p in self.network.named_parameters() if p.requires_grad}

    def suffix_state(self) -> dict[str, torch.Tensor]:
        """Detached CPU float32 copies of the trainable parameters: a snapshot of what training changes."""
        return {name: p.detach().to("cpu", torch.float32).clone() for name, p in self.trainable_parameters().items()}

    def load_suffix_state(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the trainable parameters with ``state`` (from :meth:`suffix_state`); names must match."""
        params = self.trainable_parameters()
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"suffix state does not match the trainable pieces (missing {missing[:3]}, extra {extra[:3]})")
        with torch.no_grad():
            for name, parameter in params.items():
                value = torch.as_tensor(state[name])
                if value.shape != parameter.shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(parameter.shape)}")
                parameter.copy_(value.to(parameter.device, parameter.dtype))

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Everything that must not change while training: frozen parameters and all buffers (BN statistics)."""
        trainable = set(self.trainable_parameters())
        state = self.network.state_dict()
        return {name: value.detach().clone() for name, value in state.items() if name not in trainable}


def resolve_trainable(spec_default: Iterable[str], requested: Iterable[str]) -> tuple[str, ...]:
    """The pieces to train: ``requested`` when given, else the backbone's default."""
    requested = tuple(requested)
    return requested if requested else tuple(spec_default)
