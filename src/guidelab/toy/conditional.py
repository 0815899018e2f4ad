"""A label-conditional exact world: the tree's classes behind one denoiser ``D(x, sigma, label)``.

Labels: 0 = class A, 1 = class B, 2 = the null label = A and B together (``tree("AB")``), so the null
branch is the *exact* unconditional denoiser, as a CFG-trained network approximates it.

``leak > 0`` makes the conditional branches imperfect in a controlled, still exact way: label 0 is
the mixture ``(1 - leak) A + leak B`` (and label 1 the mirror), as a network that has not fully
learned the label would be. The null label stays ``AB``. Guidance then has something to fix.
"""

from __future__ import annotations

import numpy as np
import torch

from ..denoisers import Condition
from ..errors import as_sigma, check
from .mixture import GaussianMixture
from .tree import _components, tree


class ConditionalTree:
    """``D(x, sigma, label) = E[x0 | x; class(label)]``, exact; ``label`` an int or a [batch] tensor."""

    classes = ("A", "B", "AB")
    num_classes = 2  # real classes; label 2 is the null label
    null_label = 2
    condition = Condition("label", {"label": 2}, 2)  # read by guidance.cfg / icg

    def __init__(self, *, leak: float = 0.0, dtype: torch.dtype = torch.float32):
        check(0 <= leak < 0.5, f"leak must be in [0, 0.5), got {leak!r}")
        self.dtype, self.leak = dtype, leak
        self.worlds = [tree(c, dtype=dtype) for c in self.classes]
        if leak > 0:
            self.worlds[:2] = [_leaky(c, leak, dtype) for c in "AB"]

    def world(self, label: int) -> GaussianMixture:
        """The exact mixture of one label (2 = null = both classes)."""
        check(label in (0, 1, 2), f"label must be 0 (A), 1 (B) or 2 (null = AB), got {label!r}")
        return self.worlds[label]

    def _apply(self, fn: str, x: torch.Tensor, sigma: float | torch.Tensor, label: int | torch.Tensor) -> torch.Tensor:
        sigma = as_sigma(sigma, x)
        label = torch.as_tensor(label, device=x.device)
        if label.ndim == 0:
            label = label.expand(x.shape[0])
        check(
            label.shape == (x.shape[0],),
            f"label must be an int or a tensor of shape [batch]=[{x.shape[0]}], got {list(label.shape)}",
        )
        check(bool(((label >= 0) & (label <= 2)).all()), "labels must be 0 (A), 1 (B) or 2 (null = AB)")
        out = None
        for k in range(3):
            m = label == k
            if not bool(m.any()):
                continue
            part = getattr(self.worlds[k], fn)(x[m], sigma[m])
            if out is None:
                out = part.new_empty((x.shape[0],) + part.shape[1:])
            out[m] = part
        assert out is not None
        return out

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor, label: int | torch.Tensor) -> torch.Tensor:
        """Exact ``E[x0 | x]`` of each sample's class, shape [batch, 2]."""
        return self._apply("denoise", x, sigma, label)

    __call__ = denoise

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor, label: int | torch.Tensor) -> torch.Tensor:
        return self._apply("score", x, sigma, label)

    def logp(self, x: torch.Tensor, sigma: float | torch.Tensor, label: int | torch.Tensor) -> torch.Tensor:
        return self._apply("logp", x, sigma, label)


def _leaky(cls: str, leak: float, dtype: torch.dtype) -> GaussianMixture:
    """``(1 - leak) p_cls + leak p_other`` as one exact mixture."""
    classes, phi, mu, Sigma = _components()
    phi = np.where(classes == cls, (1 - leak) * phi / phi[classes == cls].sum(), leak * phi / phi[classes != cls].sum())
    return GaussianMixture(phi, mu, Sigma, dtype=dtype)


def conditional_tree(*, leak: float = 0.0, dtype: torch.dtype = torch.float32) -> ConditionalTree:
    """The label-conditional tree world (0 = A, 1 = B, null label 2 = AB); see the module for ``leak``."""
    return ConditionalTree(leak=leak, dtype=dtype)
