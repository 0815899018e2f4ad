"""Linear measurement operators ``y = A x`` on samples of a fixed shape: masks, average-pool
downsampling, grayscale, blur and any matrix.

Every operator maps ``x`` [B, *shape] (or [B, d], d = prod(shape): the flat view of the same sample)
to ``y`` [B, *out_shape], and gives its dense ``matrix()`` [m, d] (for :func:`guidelab.toy.linear_posterior`).
Projection operators also give the pseudo-inverse ``pinv(y)`` = ``A^+ y`` and the orthogonal projection
``project(x)`` = ``A^+ A x`` onto the row space of A: RePaint's "known region", ILVR's low-pass filter
``phi_N``, Score-SDE's "known dimensions" (for a mask, ``project(x) = m * x``). All are element-wise
ops, pooling or per-sample reductions, so a sample's result never depends on its batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import GuidelabError, check, check_finite


class Operator:
    """A linear measurement ``A`` on samples of shape ``shape``; subclasses define :meth:`forward`."""

    shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    projection = True  # has an exact pinv / project (RePaint, ILVR, Score-SDE, steered "projection")

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def _as_sample(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` viewed as [B, *shape]; [B, *shape] and the flat [B, d] are accepted."""
        ok = isinstance(x, torch.Tensor) and x.ndim >= 2 and (tuple(x.shape[1:]) == self.shape or x[0].numel() == self.dim)
        check(
            ok,
            f"{self.name} was built for samples of shape {list(self.shape)} (or {self.dim} values), "
            f"got x of shape {list(getattr(x, 'shape', []))}",
        )
        return x.reshape(x.shape[0], *self.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``: [B, *out_shape] (differentiable)."""
        return self.forward(self._as_sample(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """``A^+ y``: [B, *shape]."""
        raise GuidelabError(
            f"{self.name} has no exact pseudo-inverse: use a gradient method (dps, steered "
            f"mode='gradient', tfg) or a projection operator (Mask, Downsample, Grayscale, Matrix)"
        )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``A^+ A x``, the orthogonal projection onto the row space of A, shaped like ``x``."""
        return self.pinv(self(x)).reshape(x.shape)

    def matrix(self) -> torch.Tensor:
        """The dense ``A`` [m, d] in float64 (applies the operator to the identity)."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return self(eye).reshape(self.dim, -1).T.contiguous()

    def measurement(self, y: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``y`` checked and broadcast to [batch, *out_shape] in ``like``'s dtype and device."""
        y = torch.as_tensor(y)
        if tuple(y.shape) == self.out_shape:
            y = y.expand(batch, *self.out_shape)
        check(
            tuple(y.shape) == (batch, *self.out_shape),
            f"the observation y must have shape {list(self.out_shape)} or "
            f"[batch={batch}, {', '.join(map(str, self.out_shape))}] for {self.name}, got {list(y.shape)}",
        )
        check_finite(y, "the observation y")
        return y.to(dtype=like.dtype, device=like.device)

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}(shape={list(self.shape)} -> {list(self.out_shape)})"


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    check(
        isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 1 and all(isinstance(s, int) and s >= 1 for s in shape),
        f"shape must be a sample shape of positive integers, e.g. (1, 8, 8), got {shape!r}",
    )
    return tuple(int(s) for s in shape)


class Mask(Operator):
    """Inpainting / imputation: ``A x`` = the known values ``x[mask]`` [B, m] (``mask``: True = known)."""

    def __init__(self, mask: torch.Tensor):
        check(isinstance(mask, torch.Tensor) and mask.ndim >= 1, "mask must be a tensor of the sample shape (True = known)")
        if mask.dtype != torch.bool:
            check(bool(((mask == 0) | (mask == 1)).all()), "a mask must be boolean or contain only 0 and 1")
            mask = mask == 1
        check(bool(mask.any()), "the mask marks no value as known")
        self.mask, self.shape = mask, tuple(mask.shape)
        self.out_shape = (int(mask.sum()),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.mask.to(x.device)]

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(y)
        out = y.new_zeros((y.shape[0], *self.shape))
        out[:, self.mask.to(y.device)] = y
        return out

    def project(self, x: torch.Tensor) -> torch.Tensor:
        self._as_sample(x)
        return x * self.mask.to(device=x.device, dtype=x.dtype).reshape(x.shape[1:])


class Downsample(Operator):
    """Super-resolution / ILVR low-pass: average over ``factor x factor`` blocks of the last two dims.

    ``pinv`` is nearest-neighbour upsampling (``A A^T = I / factor^2``), so ``project = up(down(x))`` is
    ILVR's ``phi_N`` (the paper and its code use bicubic resizing, which is not a projection).
    """

    def __init__(self, shape: Sequence[int], factor: int):
        self.shape = _shape(shape)
        check(len(self.shape) >= 2, f"Downsample needs samples of shape [..., H, W], got {list(self.shape)}")
        check(
            isinstance(factor, int) and factor >= 1 and self.shape[-1] % factor == 0 and self.shape[-2] % factor == 0,
            f"factor must be an integer >= 1 dividing H and W of {list(self.shape)}, got {factor!r}",
        )
        self.factor = factor
        self.out_shape = (*self.shape[:-2], self.shape[-2] // factor, self.shape[-1] // factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, f = x.shape[0], self.factor
        z = x.reshape(B, -1, *self.shape[-2:])
        return F.avg_pool2d(z, f).reshape(B, *self.out_shape)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        f = self.factor
        return y.repeat_interleave(f, -2).repeat_interleave(f, -1)


class Grayscale(Operator):
    """Colourisation: ``A x`` = the mean over the channel axis ``channel`` (of the sample shape).

    ``pinv`` repeats the gray value over the channels (``A A^T = I / C``); Song et al.'s decoupling
    matrix has the same first row direction ``(1, ..., 1) / sqrt(C)``, so ``project`` is their "known"
    gray channel.
    """

    def __init__(self, shape: Sequence[int], channel: int = 0):
        self.shape = _shape(shape)
        check(
            isinstance(channel, int) and 0 <= channel < len(self.shape) and self.shape[channel] >= 2,
            f"channel must index an axis of {list(self.shape)} with at least 2 channels, got {channel!r}",
        )
        self.channel = channel
        self.out_shape = tuple(s for i, s in enumerate(self.shape) if i != channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.channel + 1)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return y.unsqueeze(self.channel + 1).expand(y.shape[0], *self.shape).contiguous()


class Matrix(Operator):
    """Any linear ``A`` [m, d] on flattened samples of shape ``shape`` (``pinv`` by ``torch.linalg.pinv``)."""

    def __init__(self, A: torch.Tensor, shape: Sequence[int] | None = None):
        check(isinstance(A, torch.Tensor) and A.ndim == 2 and A.shape[0] >= 1, "A must be a matrix [m, d]")
        check_finite(A, "A")
        self.shape = _shape(shape) if shape is not None else (A.shape[1],)
        check(
            math.prod(self.shape) == A.shape[1],
            f"A has {A.shape[1]} columns but the sample shape {list(self.shape)} has {math.prod(self.shape)} values",
        )
        self.A = A
        self._pinv = torch.linalg.pinv(A.double()).to(A.dtype)
        self.out_shape = (A.shape[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.A.to(x).T

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return (y @ self._pinv.to(y).T).reshape(y.shape[0], *self.shape)

    def matrix(self) -> torch.Tensor:
        return self.A.double()


class Blur(Operator):
    """Gaussian blur (``size x size`` kernel of std ``std``, zero padding) on the last two dims; no exact pinv."""

    projection = False

    def __init__(self, shape: Sequence[int], size: int = 3, std: float = 1.0):
        self.shape = self.out_shape = _shape(shape)
        check(len(self.shape) >= 2, f"Blur needs samples of shape [..., H, W], got {list(self.shape)}")
        check(isinstance(size, int) and size >= 1 and size % 2 == 1, f"size must be an odd integer >= 1, got {size!r}")
        check(std > 0, f"std must be > 0, got {std!r}")
        t = torch.arange(size, dtype=torch.float64) - size // 2
        g = torch.exp(-0.5 * (t / std) ** 2)
        k = g[:, None] * g[None]
        self.kernel = (k / k.sum())[None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        z = x.reshape(-1, 1, *self.shape[-2:])
        out = F.conv2d(z, self.kernel.to(z), padding=self.kernel.shape[-1] // 2)
        return out.reshape(B, *self.shape)


def as_operator(operator: object) -> Operator:
    """Check that ``operator`` is an :class:`Operator` (a clear error otherwise)."""
    if not isinstance(operator, Operator):
        raise GuidelabError(
            f"operator must be a guidelab.inverse operator (Mask, Downsample, Grayscale, Matrix, Blur), "
            f"got {type(operator).__name__}"
        )
    return operator


def need_projection(operator: object, method: str) -> Operator:
    """The operator, if it has an exact projection (RePaint, ILVR, Score-SDE need one)."""
    op = as_operator(operator)
    check(
        op.projection,
        f"{method} replaces the known component and needs a projection operator "
        f"(Mask, Downsample, Grayscale, Matrix), got {op.name}",
    )
    return op
