"""Image denoisers under EDM preconditioning (Karras et al. 2022, Table 1).

:class:`PixelMLP` -- a residual MLP on the flattened pixels, fast on a CPU for small images (the 8x8
digits). ``D(x; sigma) = c_skip x + c_out F(c_in x; emb)`` with the output layer zero-initialised, so
an untrained model is ``D = c_skip x``.

Conditioning, the same on every image network (all optional):

* ``noise_cond`` -- the network sees ``c_noise = log(sigma) / 4``; ``False`` gives a
  noise-unconditional network (Sun et al. 2025): the preconditioning still uses sigma, ``F`` does not.
* ``num_classes`` -- labels in ``[0, num_classes]``, ``null_label = num_classes`` (``label=None`` means
  null; what ``guidance.cfg`` uses and what label dropout trains).
* ``extra_scalar`` -- the name of one more per-sample scalar input, passed as a keyword
  (e.g. ``extra_scalar="w"`` for a guidance-distilled student called as ``net(x, sigma, label=y, w=w)``,
  or ``"beta"`` for GFT); required at every call.
* ``noise_embed_offset`` ([batch]) is added to ``c_noise`` only: the hook of ``guidance.tsg``.

Scalars enter through fixed random Fourier features ``sqrt(2) cos(2 pi (f s + phi))`` (EDM2's
MPFourier), with frequencies drawn from a fixed seed, so a config alone rebuilds the same network.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..denoisers import EDMPrecond
from ..errors import as_sigma, check
from .registry import register


class Fourier(nn.Module):
    """``s`` [batch] -> ``sqrt(2) cos(2 pi (f s + phi))`` [batch, n] with fixed ``f ~ N(0, 1)``, ``phi ~ U(0, 1)``."""

    def __init__(self, n: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(n, generator=g))
        self.register_buffer("phases", torch.rand(n, generator=g))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        y = s.to(torch.float32)[:, None] * self.freqs[None] + self.phases[None]
        return (math.sqrt(2) * torch.cos(2 * math.pi * y)).to(s.dtype)


def _int(name, v, lo):
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")


class ImageDenoiser(nn.Module):
    """Shared conditioning of the image networks: labels, ``c_noise``, the extra scalar -> embedding [batch, emb]."""

    def _init_cond(self, img_channels, img_resolution, sigma_data, num_classes, noise_cond, extra_scalar, emb):
        for name, v, lo in (("img_channels", img_channels, 1), ("img_resolution", img_resolution, 1),
                            ("num_classes", num_classes, 0), ("emb", emb, 1)):
            _int(name, v, lo)
        check(isinstance(sigma_data, (int, float)) and sigma_data > 0, f"sigma_data must be > 0, got {sigma_data!r}")
        check(extra_scalar is None or (isinstance(extra_scalar, str) and extra_scalar.isidentifier()
                                       and extra_scalar not in ("label", "noise_embed_offset")),
              f"extra_scalar must be None or a keyword name other than label / noise_embed_offset, got {extra_scalar!r}")
        self.img_channels, self.img_resolution = img_channels, img_resolution
        self.sigma_data, self.num_classes = float(sigma_data), num_classes
        self.noise_cond, self.extra_scalar, self.emb = bool(noise_cond), extra_scalar, emb
        self.null_label = num_classes if num_classes else None  # found by guidance.cfg
        self.precond = EDMPrecond(self.sigma_data)
        n_in = (emb if self.noise_cond else 0) + (emb if extra_scalar else 0) + (num_classes + 1 if num_classes else 0)
        self.noise_fourier = Fourier(emb, seed=1) if self.noise_cond else None
        self.extra_fourier = Fourier(emb, seed=2) if extra_scalar else None
        self.emb_layer = nn.Linear(n_in, emb) if n_in else None

    def _cond_config(self) -> dict:
        return dict(img_channels=self.img_channels, img_resolution=self.img_resolution, sigma_data=self.sigma_data,
                    num_classes=self.num_classes, noise_cond=self.noise_cond, extra_scalar=self.extra_scalar,
                    emb=self.emb)

    def _label(self, label, x):
        n = x.shape[0]
        if not self.num_classes:
            check(label is None, "this model is unconditional (num_classes=0) but was given a label")
            return []
        label = torch.as_tensor(self.num_classes if label is None else label, device=x.device)
        if label.ndim == 0:
            label = label.expand(n)
        check(label.shape == (n,) and not label.is_floating_point() and not label.is_complex(),
              f"label must be an integer tensor of shape [batch]=[{n}], got {label.dtype} {list(label.shape)}")
        check(bool(((label >= 0) & (label <= self.num_classes)).all()),
              f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null), got {label.tolist()[:8]}")
        return [nn.functional.one_hot(label.long(), self.num_classes + 1).to(x.dtype) * math.sqrt(self.num_classes + 1)]

    def embedding(self, x, c_noise, label, noise_embed_offset, extra: dict) -> torch.Tensor | None:
        """The conditioning embedding [batch, emb] (None when the network has no conditioning)."""
        name = self.extra_scalar
        unknown = sorted(set(extra) - ({name} if name else set()))
        check(not unknown, f"unknown conditioning {unknown}; this model takes label"
              + (f", {name}" if name else "") + ", noise_embed_offset")
        parts = []
        if self.noise_cond:
            if noise_embed_offset is not None:
                c_noise = c_noise + noise_embed_offset.reshape(c_noise.shape)
            parts.append(self.noise_fourier(c_noise))
        if name:
            check(name in extra, f"this model needs the scalar {name}=... (a number or a [batch] tensor)")
            s = torch.as_tensor(extra[name], dtype=x.dtype, device=x.device)
            s = s.expand(x.shape[0]) if s.ndim == 0 else s
            check(s.shape == (x.shape[0],), f"{name} must be a scalar or a [batch]=[{x.shape[0]}] tensor, got {list(s.shape)}")
            parts.append(self.extra_fourier(s))
        parts += self._label(label, x)
        if not parts:
            return None
        return nn.functional.silu(self.emb_layer(torch.cat(parts, 1)))

    def forward(self, x: torch.Tensor, sigma, label=None, noise_embed_offset=None, **extra) -> torch.Tensor:
        """``D(x; sigma, label, <extra_scalar>)`` [batch, C, H, W], the x0 estimate."""
        shape = [self.img_channels, self.img_resolution, self.img_resolution]
        check(isinstance(x, torch.Tensor) and x.ndim == 4 and list(x.shape[1:]) == shape,
              f"x must be a tensor of shape [batch, {', '.join(map(str, shape))}], got {list(getattr(x, 'shape', []))}")
        sigma = as_sigma(sigma, x)
        return self.precond.denoise(self._F, x, sigma, label=label, noise_embed_offset=noise_embed_offset, extra=extra)

    def _F(self, x_in, c_noise, label, noise_embed_offset, extra):
        return self.raw(x_in, self.embedding(x_in, c_noise, label, noise_embed_offset, extra))


@register("PixelMLP")
class PixelMLP(ImageDenoiser):
    """Residual MLP denoiser on flattened pixels; ``depth`` blocks ``h += W2 SiLU(W1 LN(h) + A emb)``."""

    def __init__(self, img_channels: int = 1, img_resolution: int = 8, hidden: int = 512, depth: int = 4,
                 emb: int = 128, sigma_data: float = 0.5, num_classes: int = 0, noise_cond: bool = True,
                 extra_scalar: str | None = None):
        super().__init__()
        self._init_cond(img_channels, img_resolution, sigma_data, num_classes, noise_cond, extra_scalar, emb)
        _int("hidden", hidden, 1)
        _int("depth", depth, 0)
        self.hidden, self.depth = hidden, depth
        n = img_channels * img_resolution ** 2
        self.inp = nn.Linear(n, hidden)
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(depth)])
        self.fc1 = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.fc2 = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.cond = nn.ModuleList([nn.Linear(emb, hidden, bias=False) for _ in range(depth)]) if self.emb_layer else None
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, n)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def config(self) -> dict:
        return dict(self._cond_config(), hidden=self.hidden, depth=self.depth)

    def raw(self, x_in: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """``F`` on ``x_in = c_in x`` [batch, C, H, W] and the embedding [batch, emb] (or None)."""
        h = self.inp(x_in.flatten(1))
        for i in range(self.depth):
            a = self.fc1[i](self.norms[i](h))
            if emb is not None:
                a = a + self.cond[i](emb)
            h = h + self.fc2[i](nn.functional.silu(a))
        return self.out(self.out_norm(h)).reshape(x_in.shape)
