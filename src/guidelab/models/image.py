"""Image denoisers under EDM preconditioning (Karras et al. 2022, Table 1).

:class:`PixelMLP` -- a residual MLP on the flattened pixels, fast on a CPU for small images (the 8x8
digits). ``D(x; sigma) = c_skip x + c_out F(c_in x; emb)`` with the output layer zero-initialised, so
an untrained model is ``D = c_skip x``.

Conditioning, the same on every image network (all optional):

* ``noise_cond`` -- the network sees ``c_noise = log(sigma) / 4``; ``False`` gives a
  noise-unconditional network (Sun et al. 2025): the preconditioning still uses sigma, ``F`` does not.
* ``num_classes`` -- labels in ``[0, num_classes]``, ``null_label = num_classes`` (``label=None`` means
  null; what label dropout trains); declared to guiders as ``condition`` (``guidance.Condition``).
* ``extra_scalar`` -- the name of one more per-sample scalar input, passed as a keyword
  (e.g. ``extra_scalar="w"`` for a guidance-distilled student called as ``net(x, sigma, label=y, w=w)``,
  or ``"beta"`` for GFT); required at every call.
* ``noise_embed_offset``, the hook of ``guidance.tsg``: a [batch] offset is added to ``c_noise``, a
  [batch, emb] offset to the noise-level embedding vector (TSG's vector form; ``noise_embed_dim = emb``);
  either reaches the network's noise input only, never the preconditioning.

Scalars enter through fixed random Fourier features ``sqrt(2) cos(2 pi (f s + phi))`` (EDM2's
MPFourier), with frequencies drawn from a fixed seed, so a config alone rebuilds the same network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..denoisers import Condition, EDMPrecond
from ..errors import as_sigma, check
from ._common import check_extra_scalar, one_hot_label
from .registry import register


class Fourier(nn.Module):
    """``s`` [batch] -> ``sqrt(2) cos(2 pi (f s + phi))`` [batch, n] with fixed ``f ~ N(0, 1)``, ``phi ~ U(0, 1)``."""

    freqs: torch.Tensor
    phases: torch.Tensor

    def __init__(self, n: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(n, generator=g))
        self.register_buffer("phases", torch.rand(n, generator=g))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        y = s.to(torch.float32)[:, None] * self.freqs[None] + self.phases[None]
        return (math.sqrt(2) * torch.cos(2 * math.pi * y)).to(s.dtype)


def _int(name: str, v: object, lo: int) -> None:
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")


class ImageDenoiser(nn.Module):
    """Shared conditioning of the image networks: labels, ``c_noise``, the extra scalar -> embedding [batch, emb]."""

    def _init_cond(
        self,
        img_channels: int,
        img_resolution: int,
        sigma_data: float,
        num_classes: int,
        noise_cond: bool,
        extra_scalar: str | None,
        emb: int,
    ) -> None:
        for name, v, lo in (
            ("img_channels", img_channels, 1),
            ("img_resolution", img_resolution, 1),
            ("num_classes", num_classes, 0),
            ("emb", emb, 1),
        ):
            _int(name, v, lo)
        check(isinstance(sigma_data, (int, float)) and sigma_data > 0, f"sigma_data must be > 0, got {sigma_data!r}")
        check_extra_scalar(extra_scalar)
        self.img_channels, self.img_resolution = img_channels, img_resolution
        self.sigma_data, self.num_classes = float(sigma_data), num_classes
        self.noise_cond, self.extra_scalar, self.emb = bool(noise_cond), extra_scalar, emb
        self.null_label = num_classes if num_classes else None  # label dropout's label; guiders read `condition`
        self.precond = EDMPrecond(self.sigma_data)
        n_in = (emb if self.noise_cond else 0) + (emb if extra_scalar else 0) + (num_classes + 1 if num_classes else 0)
        self.noise_fourier = Fourier(emb, seed=1) if self.noise_cond else None
        self.extra_fourier = Fourier(emb, seed=2) if extra_scalar else None
        self.emb_layer = nn.Linear(n_in, emb) if n_in else None

    @property
    def condition(self) -> Condition | None:
        """``label`` in ``[0, num_classes)``, null ``num_classes`` (read by guidance.cfg / icg); None if unconditional."""
        return Condition("label", {"label": self.num_classes}, self.num_classes) if self.num_classes else None

    @property
    def noise_embed_dim(self) -> int | None:
        """Size of the noise-level embedding a [batch, emb] ``noise_embed_offset`` shifts (TSG's vector form)."""
        return self.emb if self.noise_cond else None

    def _cond_config(self) -> dict:
        return dict(
            img_channels=self.img_channels,
            img_resolution=self.img_resolution,
            sigma_data=self.sigma_data,
            num_classes=self.num_classes,
            noise_cond=self.noise_cond,
            extra_scalar=self.extra_scalar,
            emb=self.emb,
        )

    def _label(self, label: torch.Tensor | int | None, x: torch.Tensor) -> list[torch.Tensor]:
        onehot = one_hot_label(label, self.num_classes, x)
        return [] if onehot is None else [onehot * math.sqrt(self.num_classes + 1)]

    def embedding(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        label: torch.Tensor | int | None,
        noise_embed_offset: torch.Tensor | None,
        extra: dict[str, Any],
    ) -> torch.Tensor | None:
        """The conditioning embedding [batch, emb] (None when the network has no conditioning)."""
        name = self.extra_scalar
        unknown = sorted(set(extra) - ({name} if name else set()))
        check(
            not unknown,
            f"unknown conditioning {unknown}; this model takes label" + (f", {name}" if name else "") + ", noise_embed_offset",
        )
        parts = []
        if self.noise_cond:
            off = noise_embed_offset
            vector = off is not None and off.ndim == 2  # TSG's vector form: a [batch, emb] offset of the embedding
            if off is not None and not vector:
                c_noise = c_noise + off.reshape(c_noise.shape)  # scalar form: an offset of c_noise
            assert self.noise_fourier is not None  # built with noise_cond
            e = self.noise_fourier(c_noise)
            if off is not None and vector:
                check(off.shape == e.shape, f"noise_embed_offset must be [batch] or [batch, {e.shape[1]}], got {list(off.shape)}")
                e = e + off.to(e.dtype)
            parts.append(e)
        if name:
            check(name in extra, f"this model needs the scalar {name}=... (a number or a [batch] tensor)")
            s = torch.as_tensor(extra[name], dtype=x.dtype, device=x.device)
            s = s.expand(x.shape[0]) if s.ndim == 0 else s
            check(s.shape == (x.shape[0],), f"{name} must be a scalar or a [batch]=[{x.shape[0]}] tensor, got {list(s.shape)}")
            assert self.extra_fourier is not None  # built with extra_scalar
            parts.append(self.extra_fourier(s))
        parts += self._label(label, x)
        if not parts:
            return None
        assert self.emb_layer is not None  # built whenever there is a part
        return nn.functional.silu(self.emb_layer(torch.cat(parts, 1)))

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        label: torch.Tensor | int | None = None,
        noise_embed_offset: torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        """``D(x; sigma, label, <extra_scalar>)`` [batch, C, H, W], the x0 estimate."""
        shape = [self.img_channels, self.img_resolution, self.img_resolution]
        check(
            isinstance(x, torch.Tensor) and x.ndim == 4 and list(x.shape[1:]) == shape,
            f"x must be a tensor of shape [batch, {', '.join(map(str, shape))}], got {list(getattr(x, 'shape', []))}",
        )
        sigma = as_sigma(sigma, x)
        return self.precond.denoise(self._F, x, sigma, label=label, noise_embed_offset=noise_embed_offset, extra=extra)

    def raw(self, x_in: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """``F`` on ``x_in = c_in x`` [batch, C, H, W] and the embedding [batch, emb] (or None); each network's own."""
        raise NotImplementedError(f"{type(self).__name__} must define raw(x_in, emb)")

    def _F(
        self,
        x_in: torch.Tensor,
        c_noise: torch.Tensor,
        label: torch.Tensor | int | None,
        noise_embed_offset: torch.Tensor | None,
        extra: dict[str, Any],
    ) -> torch.Tensor:
        return self.raw(x_in, self.embedding(x_in, c_noise, label, noise_embed_offset, extra))


@register("PixelMLP")
class PixelMLP(ImageDenoiser):
    """Residual MLP denoiser on flattened pixels; ``depth`` blocks ``h += W2 SiLU(W1 LN(h) + A emb)``."""

    def __init__(
        self,
        img_channels: int = 1,
        img_resolution: int = 8,
        hidden: int = 512,
        depth: int = 4,
        emb: int = 128,
        sigma_data: float = 0.5,
        num_classes: int = 0,
        noise_cond: bool = True,
        extra_scalar: str | None = None,
    ):
        super().__init__()
        self._init_cond(img_channels, img_resolution, sigma_data, num_classes, noise_cond, extra_scalar, emb)
        _int("hidden", hidden, 1)
        _int("depth", depth, 0)
        self.hidden, self.depth = hidden, depth
        n = img_channels * img_resolution**2
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
                assert self.cond is not None
                a = a + self.cond[i](emb)
            h = h + self.fc2[i](nn.functional.silu(a))
        return self.out(self.out_norm(h)).reshape(x_in.shape)


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


class _ResBlock(nn.Module):
    """GN-SiLU-Conv, + embedding (per-channel scale and shift), GN-SiLU-Conv (zero init), skip (EDM/ADM style)."""

    def __init__(self, c_in: int, c_out: int, emb: int | None, attention: bool):
        super().__init__()
        self.norm0, self.conv0 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * c_out) if emb else None
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)  # type: ignore[arg-type]  # built with bias=True
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = _Attention(c_out) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv0(nn.functional.silu(self.norm0(x)))
        h = self.norm1(h)
        if self.affine is not None:
            scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        x = self.skip(x) + self.conv1(nn.functional.silu(h))
        return x if self.attn is None else self.attn(x)


class _Attention(nn.Module):
    """Multi-head self-attention over pixels with a zero-initialised output projection (residual)."""

    def __init__(self, c: int, head_channels: int = 32):
        super().__init__()
        self.heads = max(1, c // head_channels)
        self.norm, self.qkv, self.proj = nn.GroupNorm(_groups(c), c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)  # type: ignore[arg-type]  # built with bias=True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        y = nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(y.transpose(-1, -2).reshape(b, c, h, w))


@register("UNet")
class UNet(ImageDenoiser):
    """A U-Net in the EDM / ADM style (Karras et al. 2022; Dhariwal & Nichol 2021) for GPU-sized images.

    Encoder levels of ``hidden * channel_mult[i]`` channels with ``depth`` residual blocks each,
    average-pool down-sampling, self-attention at the resolutions in ``attn_resolutions``, a decoder
    with ``depth + 1`` blocks per level fed by concatenated encoder skips, and nearest up-sampling.
    Every residual block takes the conditioning embedding (noise level, label with null, extra scalar)
    as a per-channel scale and shift. Standard GroupNorm layers, not EDM2's magnitude-preserving ones.
    """

    def __init__(
        self,
        img_channels: int = 1,
        img_resolution: int = 8,
        hidden: int = 32,
        depth: int = 1,
        channel_mult: tuple[int, ...] | list[int] = (1, 2),
        attn_resolutions: tuple[int, ...] | list[int] = (4,),
        emb: int = 128,
        sigma_data: float = 0.5,
        num_classes: int = 0,
        noise_cond: bool = True,
        extra_scalar: str | None = None,
    ):
        super().__init__()
        self._init_cond(img_channels, img_resolution, sigma_data, num_classes, noise_cond, extra_scalar, emb)
        _int("hidden", hidden, 1)
        _int("depth", depth, 1)
        channel_mult, attn_resolutions = [int(m) for m in channel_mult], [int(r) for r in attn_resolutions]
        check(
            len(channel_mult) >= 1 and all(m >= 1 for m in channel_mult),
            f"channel_mult must be integers >= 1, got {channel_mult}",
        )
        check(
            img_resolution % 2 ** (len(channel_mult) - 1) == 0,
            f"img_resolution {img_resolution} must be divisible by 2^(levels - 1) = {2 ** (len(channel_mult) - 1)}",
        )
        self.hidden, self.depth = hidden, depth
        self.channel_mult, self.attn_resolutions = channel_mult, attn_resolutions
        e = emb if self.emb_layer is not None else None
        self.conv_in = nn.Conv2d(img_channels, hidden, 3, padding=1)
        self.enc, skips, c, res = nn.ModuleList(), [hidden], hidden, img_resolution
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.enc.append(nn.AvgPool2d(2))
                res //= 2
                skips.append(c)
            for _ in range(depth):
                self.enc.append(_ResBlock(c, hidden * mult, e, res in attn_resolutions))
                c = hidden * mult
                skips.append(c)
        self.mid = nn.ModuleList([_ResBlock(c, c, e, True), _ResBlock(c, c, e, False)])
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(depth + 1):
                self.dec.append(_ResBlock(c + skips.pop(), hidden * mult, e, res in attn_resolutions))
                c = hidden * mult
            if level > 0:
                self.dec.append(nn.Upsample(scale_factor=2, mode="nearest"))
                res *= 2
        self.norm_out, self.conv_out = nn.GroupNorm(_groups(c), c), nn.Conv2d(c, img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)  # type: ignore[arg-type]  # built with bias=True

    def config(self) -> dict:
        return dict(
            self._cond_config(),
            hidden=self.hidden,
            depth=self.depth,
            channel_mult=list(self.channel_mult),
            attn_resolutions=list(self.attn_resolutions),
        )

    def raw(self, x_in: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv_in(x_in)
        skips = [h]
        for layer in self.enc:
            h = layer(h) if isinstance(layer, nn.AvgPool2d) else layer(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for layer in self.dec:
            h = layer(h) if isinstance(layer, nn.Upsample) else layer(torch.cat([h, skips.pop()], 1), emb)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))
