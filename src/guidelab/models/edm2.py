"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models", arXiv 2312.02696, Fig. 21), written here, with NVlabs/edm2's module names so
that their state dicts load unchanged (:func:`from_nvlabs`) and their ``.pkl`` files load without
running any code from the file (:func:`load_pkl`).

``net(x, sigma, class_labels=..., noise_embed_offset=...)`` is a guidelab denoiser (EDM
preconditioning, ``c_noise = ln(sigma) / 4``, ``sigma_data = 0.5``); ``net.logvar(sigma)`` is the learned
uncertainty ``u(sigma)`` of the EDM2 loss (eq. 21). The constructor takes NVlabs' ``Precond`` keyword
arguments with NVlabs' defaults, plus ``noise_cond``.

Conditioning:

* ``class_labels`` -- one-hot (or soft, entries in [0, 1]) float [batch, label_dim], or integers [batch]
  in ``[0, label_dim]``; the null label is the zero vector: ``None``, a zero row or the integer
  ``label_dim`` (``null_label``). That is what NVlabs' Precond feeds for ``class_labels=None``. EDM2
  trains without label dropout, so on the published networks the null is untrained: their CFG uses a
  separate unconditional network (``guide=``); a network trained here with label dropout learns it.
* ``noise_embed_offset`` (TSG's hook): [batch] is added to ``c_noise``, [batch, noise_embed_dim] to the
  Fourier noise embedding; neither reaches the preconditioning or ``logvar``.
* ``noise_cond=False``: the U-Net does not see the noise level (no ``emb_fourier`` / ``emb_noise``);
  the preconditioning and ``logvar`` still use sigma.

``use_fp16`` (NVlabs' default True) runs the U-Net in float16 on CUDA only, as NVlabs does; elsewhere,
and for the preconditioning, float32. The output has the dtype of ``x``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence, cast

import torch
from torch import nn

from ..denoisers import Condition, EDMPrecond, bcast
from ..errors import GuidelabError, as_sigma, check
from .edm2_latents import Standardization, VAELatents, load_vae
from .edm2_presets import PRESETS, Preset, guided, resolve
from .registry import register

__all__ = [
    "EDM2",
    "UNet",
    "Block",
    "MPConv",
    "MPFourier",
    "normalize",
    "mp_silu",
    "mp_sum",
    "mp_cat",
    "from_nvlabs",
    "load_pkl",
    "PRESETS",
    "Preset",
    "resolve",
    "guided",
    "Standardization",
    "VAELatents",
    "load_vae",
]


def normalize(x: torch.Tensor, dim: int | list[int] | tuple[int, ...] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """``x / (eps + |x| / sqrt(n))`` over ``dim`` (default: all but the first): unit RMS (EDM2 eq. 66; ``dim=1``: pixel norm)."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by 0.596, its RMS for unit-normal input (eq. 81); the scaling in place (SiLU's backward
    needs its input only)."""
    return nn.functional.silu(x).mul_(1 / 0.596)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving ``(1 - t) a + t b`` (eq. 88)."""
    return a.lerp(b, t).mul_(1 / math.sqrt((1 - t) ** 2 + t**2))


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation along ``dim``, ``t`` the weight of ``b`` (eq. 103)."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (C / math.sqrt(Na) * (1 - t)), b * (C / math.sqrt(Nb) * t)], dim=dim)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2x down- or up-sampling of [batch, C, H, W] with the separable filter ``f`` (``[1, 1]``: box / nearest)."""
    if mode == "keep":
        return x
    if list(f) == [1, 1]:  # the filter of every EDM2 config: the same result as filtered(), by cheaper ops
        return nn.functional.avg_pool2d(x, 2) if mode == "down" else nn.functional.interpolate(x, scale_factor=2.0)
    return filtered(x, f, mode)


def filtered(x: torch.Tensor, f: Sequence[float], mode: str) -> torch.Tensor:
    """NVlabs' resampling: depthwise (transposed) convolution with ``outer(f, f) / sum(f)^2``, stride 2."""
    f1 = torch.as_tensor(f, dtype=torch.float32)
    check(f1.ndim == 1 and len(f1) % 2 == 0, f"resample_filter must have an even length, got {f1.tolist()}")
    pad = (len(f1) - 1) // 2
    f2 = (torch.outer(f1, f1) / f1.sum() ** 2).to(x)[None, None].tile([x.shape[1], 1, 1, 1])
    if mode == "down":
        return nn.functional.conv2d(x, f2, groups=x.shape[1], stride=2, padding=(pad,))
    return nn.functional.conv_transpose2d(x, f2 * 4, groups=x.shape[1], stride=2, padding=(pad,))


class MPFourier(nn.Module):
    """``s`` [batch] -> ``sqrt(2) cos(f s + phi)`` [batch, n], ``f = 2 pi N(0, bandwidth^2)``, ``phi = 2 pi U(0, 1)`` (eq. 75).

    The frequencies are drawn from a fixed seed (a config alone rebuilds them); loaded ones replace them.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels, generator=g) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.freqs, torch.Tensor) and isinstance(self.phases, torch.Tensor)
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel=[k, k]``) or linear layer (``kernel=[]``), bias-free (eq. 47).

    The weight applied is ``gain * normalize(W) / sqrt(fan_in)``, computed once per forward; in training
    mode the stored ``W`` is first replaced by ``normalize(W)`` (forced weight normalisation, eq. 66).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = (normalize(w) * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))


class Block(nn.Module):
    """Encoder (``flavor='enc'``) or decoder block with optional self-attention (Fig. 21).

    ``emb_channels=0``: a block without conditioning (``noise_cond=False`` on an unconditional network).
    ``attention`` with ``out_channels < channels_per_head`` has no heads, as in NVlabs' code.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_filter, self.resample_mode = list(resample_filter), resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        check(
            self.num_heads == 0 or out_channels % self.num_heads == 0,
            f"{out_channels} channels do not split into {self.num_heads} attention heads (channels_per_head={channels_per_head})",
        )
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        if emb_channels:
            self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[]) if emb_channels else None
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        if self.emb_linear is not None:
            c = self.emb_linear(emb, gain=self.emb_gain) + 1  # learned per-channel scale, 1 at init
            y = y * c[:, :, None, None].to(y.dtype)
        y = mp_silu(y)
        if self.training and self.dropout:
            y = nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            assert self.attn_qkv is not None and self.attn_proj is not None
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)  # pixel norm of q, k, v per head; each [n, h, c, hw]
            y = nn.functional.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
            x = mp_sum(x, self.attn_proj(y.transpose(2, 3).reshape(x.shape)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp_(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """EDM2's U-Net ``F(x_in, c_noise, class_labels)`` (Fig. 21): NVlabs' ``UNet`` plus ``noise_cond``."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        noise_cond: bool = True,
        **block_kwargs: Any,
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.noise_channels = cnoise if noise_cond else None
        cemb = cemb if noise_cond or label_dim else 0
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise) if noise_cond else None
        self.emb_noise = MPConv(cnoise, cemb, kernel=[]) if noise_cond else None
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # the input gets a constant channel of ones
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=res in attn_resolutions, **block_kwargs
                )
        self.dec = nn.ModuleDict()
        skips: list[int] = [cast(Block, block).out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=res in attn_resolutions, **block_kwargs
                )
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def embedding(
        self, c_noise: torch.Tensor, class_labels: torch.Tensor | None, noise_embed_offset: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The block conditioning [batch, emb] from ``c_noise`` [batch] and one-hot labels (None if neither)."""
        emb = None
        if self.emb_fourier is not None:
            off = noise_embed_offset
            if off is not None and off.ndim != 2:
                c_noise = c_noise + off.reshape(c_noise.shape).to(c_noise.dtype)
            e = self.emb_fourier(c_noise)
            if off is not None and off.ndim == 2:
                check(off.shape == e.shape, f"noise_embed_offset must be [batch] or [batch, {e.shape[1]}], got {list(off.shape)}")
                e = e + off.to(e.dtype)
            assert self.emb_noise is not None
            emb = self.emb_noise(e)
        if self.emb_label is not None:
            assert class_labels is not None
            y = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            emb = y if emb is None else mp_sum(emb, y, t=self.label_balance)
        return None if emb is None else mp_silu(emb)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        noise_embed_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embedding(noise_labels, class_labels, noise_embed_offset)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class _NullLabel:
    """The null override of ``class_labels``: zero rows for float labels, ``label_dim`` for integer ones."""

    def __init__(self, label_dim: int):
        self.label_dim = label_dim

    def __call__(self, old: object) -> torch.Tensor | None:
        if not isinstance(old, torch.Tensor):
            return None
        return torch.zeros_like(old) if old.is_floating_point() else torch.full_like(old, self.label_dim)

    def __repr__(self) -> str:
        return "null (the zero label vector)"


def _check_int(name: str, v: object, lo: int) -> None:
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")


@register("EDM2")
class EDM2(nn.Module):
    """EDM2 network: NVlabs' ``Precond`` (EDM preconditioning + ``u(sigma)``) around :class:`UNet`.

    Keyword arguments and defaults are NVlabs' (``Precond``, ``UNet`` and ``Block``), plus ``noise_cond``.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        use_fp16: bool = True,
        sigma_data: float = 0.5,
        logvar_channels: int = 128,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        resample_filter: Sequence[float] = (1, 1),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        noise_cond: bool = True,
    ):
        super().__init__()
        for name, v, lo in (
            ("img_resolution", img_resolution, 1),
            ("img_channels", img_channels, 1),
            ("label_dim", label_dim, 0),
            ("logvar_channels", logvar_channels, 1),
            ("model_channels", model_channels, 1),
            ("num_blocks", num_blocks, 1),
            ("channels_per_head", channels_per_head, 1),
        ):
            _check_int(name, v, lo)
        channel_mult, attn_resolutions = list(channel_mult), list(attn_resolutions)
        check(
            len(channel_mult) >= 1 and all(isinstance(m, int) and m >= 1 for m in channel_mult),
            f"channel_mult must be a list of integers >= 1, got {channel_mult}",
        )
        check(
            img_resolution % 2 ** (len(channel_mult) - 1) == 0,
            f"img_resolution {img_resolution} must be divisible by 2^(levels - 1) = {2 ** (len(channel_mult) - 1)}",
        )
        check(isinstance(sigma_data, (int, float)) and sigma_data > 0, f"sigma_data must be > 0, got {sigma_data!r}")
        check(0 <= dropout < 1, f"dropout must lie in [0, 1), got {dropout!r}")
        self.kwargs: dict[str, Any] = dict(  # NVlabs' Precond kwargs (mixed types)
            img_resolution=img_resolution,
            img_channels=img_channels,
            label_dim=label_dim,
            use_fp16=bool(use_fp16),
            sigma_data=float(sigma_data),
            logvar_channels=logvar_channels,
            model_channels=model_channels,
            channel_mult=channel_mult,
            channel_mult_noise=channel_mult_noise,
            channel_mult_emb=channel_mult_emb,
            num_blocks=num_blocks,
            attn_resolutions=attn_resolutions,
            label_balance=label_balance,
            concat_balance=concat_balance,
            resample_filter=list(resample_filter),
            channels_per_head=channels_per_head,
            dropout=dropout,
            res_balance=res_balance,
            attn_balance=attn_balance,
            clip_act=clip_act,
            noise_cond=bool(noise_cond),
        )
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data, self.noise_cond = bool(use_fp16), float(sigma_data), bool(noise_cond)
        self.precond = EDMPrecond(self.sigma_data)
        self.num_classes = label_dim
        self.null_label = label_dim if label_dim else None  # integer null (label dropout); guiders read `condition`
        unet = {k: v for k, v in self.kwargs.items() if k not in ("use_fp16", "sigma_data", "logvar_channels")}
        self.unet = UNet(**unet)
        self.logvar_fourier = MPFourier(logvar_channels, seed=1)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def config(self) -> dict:
        return dict(self.kwargs)

    @property
    def condition(self) -> Condition | None:
        """``class_labels`` (one-hot or integer), null the zero vector; None if unconditional."""
        return Condition("class_labels", {"class_labels": _NullLabel(self.label_dim)}, self.label_dim) if self.label_dim else None

    @property
    def noise_embed_dim(self) -> int | None:
        """Size of the Fourier noise embedding a [batch, dim] ``noise_embed_offset`` shifts (TSG)."""
        return self.unet.noise_channels

    def one_hot(self, class_labels: torch.Tensor | int | None, x: torch.Tensor) -> torch.Tensor | None:
        """Validated float32 labels [batch, label_dim] (null rows zero); None for an unconditional network."""
        L, B = self.label_dim, x.shape[0]
        if not L:
            check(class_labels is None, "this EDM2 network is unconditional (label_dim=0) but was given class_labels")
            return None
        if class_labels is None:
            return torch.zeros(B, L, device=x.device)
        y = torch.as_tensor(class_labels, device=x.device)
        if y.is_floating_point():
            check(y.shape == (B, L), f"float class_labels must be one-hot [batch, label_dim]=[{B}, {L}], got {list(y.shape)}")
            check(bool(((y >= 0) & (y <= 1)).all()), "one-hot class_labels must lie in [0, 1] (a zero row is the null label)")
            return y.to(torch.float32)
        y = y.expand(B) if y.ndim == 0 else y
        check(
            y.shape == (B,) and y.dtype != torch.bool and not y.is_complex(),
            f"class_labels must be one-hot [batch, {L}] or integers [batch]=[{B}], got {y.dtype} {list(y.shape)}",
        )
        check(bool(((y >= 0) & (y <= L)).all()), f"integer class_labels must lie in [0, {L}] ({L} = null), got {y.tolist()[:8]}")
        return nn.functional.one_hot(y.long(), L + 1)[:, :L].to(torch.float32)

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | int | None = None,
        noise_embed_offset: torch.Tensor | None = None,
        **cond: Any,
    ) -> torch.Tensor:
        """``D(x; sigma, class_labels)`` [batch, C, H, W], the x0 estimate."""
        check(not cond, f"unknown conditioning {sorted(cond)}; EDM2 takes class_labels, noise_embed_offset")
        shape = [self.img_channels, self.img_resolution, self.img_resolution]
        check(
            isinstance(x, torch.Tensor) and x.ndim == 4 and list(x.shape[1:]) == shape,
            f"x must be a tensor of shape [batch, {', '.join(map(str, shape))}], got {list(getattr(x, 'shape', []))}",
        )
        check(noise_embed_offset is None or self.noise_cond, "noise_embed_offset needs a network with noise_cond=True")
        x32, sigma = x.to(torch.float32), as_sigma(sigma, x).to(torch.float32)
        labels = self.one_hot(class_labels, x)
        dtype = torch.float16 if self.use_fp16 and x.device.type == "cuda" else torch.float32
        c_skip, c_out, c_in, c_noise = self.precond.scalings(sigma)  # EDM Table 1; c_noise = ln(sigma) / 4
        F = self.unet((bcast(c_in, x32) * x32).to(dtype), c_noise, labels, noise_embed_offset)
        return (bcast(c_skip, x32) * x32 + bcast(c_out, x32) * F.to(torch.float32)).to(x.dtype)

    def logvar(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """The learned uncertainty ``u(sigma)`` [batch] of the EDM2 loss (eq. 21)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.logvar_linear.weight.device).reshape(-1)
        check(bool((sigma > 0).all()), "logvar needs sigma > 0")
        return self.logvar_linear(self.logvar_fourier(sigma.log() / 4)).reshape(-1)


def from_nvlabs(precond_kwargs: dict | str, state_dict: dict[str, torch.Tensor]) -> EDM2:
    """Build :class:`EDM2` from NVlabs' ``Precond`` keyword arguments (a dict or its JSON) and a state dict
    under NVlabs' names (a ``param.`` prefix, as in the reference file, is stripped). Eval mode, no grads."""
    kwargs = json.loads(precond_kwargs) if isinstance(precond_kwargs, str) else dict(precond_kwargs)
    kwargs.pop("class_name", None)  # as in NVlabs' network_kwargs
    try:
        net = EDM2(**kwargs)
    except TypeError as e:
        raise GuidelabError(f"not an EDM2 Precond configuration: {e}") from None
    if any(k.startswith("param.") for k in state_dict):
        state_dict = {k[len("param.") :]: v for k, v in state_dict.items() if k.startswith("param.")}
    ours = net.state_dict()
    missing, unexpected = sorted(set(ours) - set(state_dict)), sorted(set(state_dict) - set(ours))
    check(
        not missing and not unexpected,
        f"the state dict does not match EDM2{kwargs}: missing {missing[:4]}, unexpected {unexpected[:4]}",
    )
    for k, v in state_dict.items():
        check(
            v.shape == ours[k].shape,
            f"the state dict does not match EDM2{kwargs}: {k} is {list(v.shape)}, expected {list(ours[k].shape)}",
        )
    net.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()})
    return net.eval().requires_grad_(False)


def load_pkl(path: str | os.PathLike, key: str = "ema") -> EDM2:
    """Load an NVlabs ``.pkl`` network without running code from it (:mod:`guidelab.models.nvlabs_pickle`):
    rebuilt from its ``Precond`` kwargs, tensors copied; ``net.checkpoint_info`` records the source,
    the kwargs and the pickle's ``encoder``. Eval mode, no grads."""
    from .nvlabs_pickle import read_network

    kwargs, state, info = read_network(path, key)
    net = from_nvlabs(kwargs, state)
    net.checkpoint_info = info  # type: ignore[assignment]  # a plain attribute, not a submodule
    return net
