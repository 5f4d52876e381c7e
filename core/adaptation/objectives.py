"""The losses PANDA trains with: compactness (Eq. 1), the EWC penalty (Eq. 4), outlier exposure (Eq. 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compactness_loss(features: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(B, D) features, (D,) centre -> scalar mean over the batch of ||psi(x) - c||^2 / D.

    Dividing by D (the mean over coordinates) keeps the loss independent of the
    feature width, as the authors' implementation does; it also sets the
    balance against the EWC penalty that lambda = 1e4 was chosen for.
    """
    return (features - centre).pow(2).mean()


def squared_distances(features: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(N, D), (D,) -> (N,) ||psi(x) - c||^2 (summed over coordinates): the curves' distance."""
    return (features - centre).pow(2).sum(dim=1)


class EwcPenalty(nn.Module):
    """lambda/2 * sum_i F_i (theta_i - theta0_i)^2 over the trainable parameters (paper, Eq. 4).

    ``fisher`` and ``anchor`` (theta0, the pretrained values) map parameter
    names to tensors of the parameters' shapes; parameters without a Fisher
    entry are not penalised (the caller checks coverage when it matters).
    """

    def __init__(self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], lam: float) -> None:
        super().__init__()
        missing = sorted(set(fisher) - set(anchor))
        if missing:
            raise ValueError(f"Fisher entries without an anchor value: {missing[:3]}")
        self.lam = float(lam)
        self.names = tuple(sorted(fisher))
        for index, name in enumerate(self.names):
            if fisher[name].shape != anchor[name].shape:
                raise ValueError(f"{name}: Fisher shape {tuple(fisher[name].shape)} != parameter shape {tuple(anchor[name].shape)}")
            # Buffers (not parameters) so that .to(device) moves them and nothing trains them.
            self.register_buffer(f"fisher_{index}", fisher[name].detach().float().clone())
            self.register_buffer(f"anchor_{index}", anchor[name].detach().float().clone())

    def forward(self, parameters: dict[str, torch.Tensor]) -> torch.Tensor:
        """Name -> current parameter -> scalar penalty (zero at theta0)."""
        total = None
        for index, name in enumerate(self.names):
            fisher = getattr(self, f"fisher_{index}")
            anchor = getattr(self, f"anchor_{index}")
            term = (fisher * (parameters[name] - anchor).pow(2)).sum()
            total = term if total is None else total + term
        if total is None:
            raise ValueError("the EWC penalty has no parameters")
        return 0.5 * self.lam * total

    @torch.no_grad()
    def proximal_(self, parameters: dict[str, torch.Tensor], step: float) -> None:
        """Exact proximal step of the penalty, in place: theta <- argmin_t penalty(t) + ||t - theta||^2 / (2 step).

        Per coordinate that is theta <- (theta + step*lam*F*theta0) / (1 + step*lam*F).
        Unlike a gradient step on the penalty it never overshoots theta0, however
        stiff lam*F is, so it stays stable at learning rates where the explicit
        penalty gradient oscillates (and, clipped together with the compactness
        gradient, would inject that oscillation as noise into the weights).
        """
        for index, name in enumerate(self.names):
            stiffness = step * self.lam * getattr(self, f"fisher_{index}")
            anchor = getattr(self, f"anchor_{index}")
            parameter = parameters[name]
            parameter.copy_((parameter + stiffness * anchor) / (1.0 + stiffness))


def outlier_exposure_loss(normal_logits: torch.Tensor, outlier_logits: torch.Tensor) -> torch.Tensor:
    """(B,), (B',) head outputs w.psi(x) -> scalar logistic loss of Eq. 5, averaged over all samples.

    Eq. 5 is the log-likelihood of "outlier" (sigma(w.psi) -> 1) for D_OE and
    "normal" (-> 0) for D_train; minimising its negative is binary cross-entropy
    with labels 0 for normal and 1 for outliers, so w.psi(x) grows with anomaly.
    """
    logits = torch.cat([normal_logits, outlier_logits])
    labels = torch.cat([torch.zeros_like(normal_logits), torch.ones_like(outlier_logits)])
    return F.binary_cross_entropy_with_logits(logits, labels)
