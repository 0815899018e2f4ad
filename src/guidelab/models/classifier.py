"""Noise-aware classifiers ``p_phi(y | x; sigma)`` for classifier guidance (Dhariwal & Nichol 2021).

A classifier is a function ``clf(x, sigma) -> logits [batch, num_classes]``; the guider takes
``log_softmax`` itself. Two are offered for the exact 2-D worlds:

* :class:`ExactClassifier` -- the exact posterior of a mixture of exact worlds (Bayes):
  ``logit_y = log pi_y + log p_y(x; sigma)``; :func:`tree_classifier` is the tree's A/B one.
* :class:`ToyClassifier` -- a small MLP on the EDM-preconditioned input, trained by
  :func:`train_tree_classifier` on exact noisy samples with the exact posterior as soft target.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import as_sigma, check
from ..toy import tree
from ..toy.mixture import GaussianMixture
from ..toy.tree import _components
from .mlp import MPLinear, mp_silu
from .registry import register


class ExactClassifier:
    """``p(y | x; sigma) = pi_y p_y(x; sigma) / sum_k pi_k p_k(x; sigma)`` for exact worlds ``p_y``.

    ``clf(x, sigma)`` returns the logits ``log pi_y + log p_y(x; sigma)`` [batch, len(worlds)];
    differentiable in ``x`` (autograd through the mixtures' log-densities).
    """

    def __init__(self, worlds: Sequence[GaussianMixture], priors: Sequence[float]):
        check(len(worlds) == len(priors) >= 2, "ExactClassifier needs one prior per world and at least two worlds")
        check(all(p > 0 for p in priors), f"priors must be > 0, got {list(priors)}")
        total = float(sum(priors))
        self.worlds = list(worlds)
        self.log_prior = [math.log(p / total) for p in priors]
        self.num_classes = len(self.worlds)

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        s = as_sigma(sigma, x)
        return torch.stack([lp + w.logp(x, s) for lp, w in zip(self.log_prior, self.worlds)], 1)

    def posterior(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """``p(y | x; sigma)`` [batch, num_classes]."""
        return self(x, sigma).softmax(1)


def tree_classifier(*, dtype: torch.dtype = torch.float32) -> ExactClassifier:
    """The exact A/B classifier of the tree (label 0 = A, 1 = B); priors are the classes' weights in "AB"."""
    cls, phi, _, _ = _components()
    priors = [float(np.sum(phi[cls == c])) for c in "AB"]
    return ExactClassifier([tree("A", dtype=dtype), tree("B", dtype=dtype)], priors)


@register("ToyClassifier")
class ToyClassifier(nn.Module):
    """MLP classifier ``forward(x, sigma) -> logits`` [batch, num_classes] for points of dimension ``dim``.

    Features ``[x / sqrt(sd^2 + sigma^2), log(sigma) / 4, 1]`` (EDM's c_in and c_noise), a
    magnitude-preserving trunk as in :class:`~guidelab.models.ToyMLP`, and a linear head with bias.
    """

    def __init__(self, dim: int = 2, num_classes: int = 2, hidden: int = 64, depth: int = 3, sigma_data: float = 0.5):
        super().__init__()
        for name, v, lo in (("dim", dim, 1), ("num_classes", num_classes, 2), ("hidden", hidden, 1), ("depth", depth, 0)):
            check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")
        check(isinstance(sigma_data, (int, float)) and sigma_data > 0, f"sigma_data must be > 0, got {sigma_data!r}")
        self.dim, self.num_classes, self.hidden, self.depth = dim, num_classes, hidden, depth
        self.sigma_data = float(sigma_data)
        self.layers = nn.ModuleList([MPLinear(dim + 2, hidden)] + [MPLinear(hidden, hidden) for _ in range(depth)])
        self.head = nn.Linear(hidden, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def config(self) -> dict:
        return dict(dim=self.dim, num_classes=self.num_classes, hidden=self.hidden, depth=self.depth, sigma_data=self.sigma_data)

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        check(
            isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == self.dim,
            f"x must be a tensor of shape [batch, {self.dim}], got {list(getattr(x, 'shape', []))}",
        )
        s = as_sigma(sigma, x).clamp_min(1e-20)
        x_in = x / (self.sigma_data**2 + s**2).sqrt()[:, None]
        y = self.layers[0](torch.cat([x_in, s.log()[:, None] / 4, torch.ones_like(x_in[:, :1])], 1))
        for layer in self.layers[1:]:
            y = layer(mp_silu(y))
        return self.head(mp_silu(y))


def train_tree_classifier(
    model: ToyClassifier | None = None,
    *,
    steps: int = 1500,
    batch: int = 512,
    n_data: int = 32768,
    lr: float = 1e-2,
    sigma_min: float = 0.002,
    sigma_max: float = 10.0,
    seed: int = 0,
) -> ToyClassifier:
    """Fit a noise-aware A/B classifier on the exact tree; returns the model in eval mode.

    Data: ``n_data`` pairs ``(x, sigma)`` with ``log sigma ~ U[log sigma_min, log sigma_max]`` and
    ``x ~ p_AB(.; sigma)`` drawn exactly; target: the exact posterior ``p(y | x; sigma)`` (soft
    cross-entropy, whose minimiser is that posterior, with far less variance than hard labels).
    Adam with ``lr`` decayed as ``1/sqrt(step / 256)``; deterministic given ``seed``.
    """
    check(0 < sigma_min < sigma_max, f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    model = model if model is not None else ToyClassifier()
    check(model.num_classes == 2 and model.dim == 2, "train_tree_classifier needs a 2-D, 2-class ToyClassifier")
    g = torch.Generator().manual_seed(seed)
    sigma = (
        (math.log(sigma_min) + torch.rand(n_data, generator=g, dtype=torch.float64) * (math.log(sigma_max) - math.log(sigma_min)))
        .exp()
        .float()
    )
    x = tree("AB").sample(n_data, sigma, generator=g)
    with torch.no_grad():
        target = tree_classifier().posterior(x, sigma)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr / math.sqrt(max(step / 256, 1))
        i = torch.randint(n_data, (batch,), generator=g)
        loss = -(target[i] * model(x[i], sigma[i]).log_softmax(1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)
