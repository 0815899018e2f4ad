"""EDM2's latent space: Stable Diffusion VAE latents with per-channel standardisation.

EDM2's ImageNet-512 networks run on the 4-channel 64x64 latents of the SD VAE (``sd-vae-ft-mse``),
standardised per channel (Karras et al. 2024, App. "latent diffusion"; NVlabs/edm2
``training/encoders.py::StabilityVAEEncoder``): ``z = scale * raw + bias`` with ``scale = final_std /
raw_std`` and ``bias = final_mean - raw_mean * scale`` (``raw_mean = [5.81, 3.25, 0.12, -2.15]``,
``raw_std = [4.17, 4.62, 3.71, 3.28]``, ``final_mean = 0``, ``final_std = 0.5``). As in EDM2 the VAE sees
pixels in [0, 1] and its decoder output is clamped to [0, 1].

The VAE is a diffusers ``AutoencoderKL`` read from a local folder (``save_pretrained`` layout); nothing
is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import GuidelabError, check


@dataclass(frozen=True)
class Standardization:
    """EDM2's per-channel latent standardisation ``z = scale * raw + bias`` (defaults: EDM2's constants)."""

    raw_mean: tuple[float, ...] = (5.81, 3.25, 0.12, -2.15)
    raw_std: tuple[float, ...] = (4.17, 4.62, 3.71, 3.28)
    final_mean: float = 0.0
    final_std: float = 0.5

    def scale_bias(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, bias)`` as [1, C, 1, 1] float32 (EDM2 computes them in float32)."""
        mean, std = torch.tensor(self.raw_mean, dtype=torch.float32), torch.tensor(self.raw_std, dtype=torch.float32)
        scale = torch.tensor(self.final_std, dtype=torch.float32) / std
        bias = torch.tensor(self.final_mean, dtype=torch.float32) - mean * scale
        return scale.reshape(1, -1, 1, 1).to(like.device), bias.reshape(1, -1, 1, 1).to(like.device)

    def standardize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents [B, C, h, w] -> the network's latents."""
        scale, bias = self.scale_bias(raw)
        return raw.to(torch.float32) * scale + bias

    def unstandardize(self, z: torch.Tensor) -> torch.Tensor:
        """The network's latents -> raw VAE latents."""
        scale, bias = self.scale_bias(z)
        return (z.to(torch.float32) - bias) / scale

    @classmethod
    def of(cls, encoder: dict | None) -> "Standardization | None":
        """From a pickle's encoder record (``checkpoint_info["encoder"]`` of :func:`edm2.load_pkl`): None for
        ``StandardRGBEncoder`` (pixels in [-1, 1]), EDM2's constants with its overrides for ``StabilityVAEEncoder``."""
        if encoder is None or encoder.get("class_name") == "StandardRGBEncoder":
            return None
        check(encoder.get("class_name") == "StabilityVAEEncoder", f"unknown EDM2 encoder {encoder.get('class_name')!r}")
        kw = encoder.get("init_kwargs") or {}
        keys = ("raw_mean", "raw_std", "final_mean", "final_std")
        fields: dict[str, Any] = {k: tuple(kw[k]) if isinstance(kw[k], (list, tuple)) else kw[k] for k in keys if k in kw}
        return cls(**fields)


def load_vae(vae_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """A diffusers ``AutoencoderKL`` from a local folder (``config.json`` + weights), eval mode, no grads."""
    d = Path(vae_dir)
    check((d / "config.json").is_file(), f"--vae {d} is not a diffusers AutoencoderKL folder (no config.json)")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise GuidelabError("decoding EDM2 latents needs diffusers (pip install diffusers)") from None
    return AutoencoderKL.from_pretrained(str(d), local_files_only=True).to(device).eval().requires_grad_(False)


class VAELatents:
    """EDM2's ``StabilityVAEEncoder`` on a local VAE: ``encode`` uint8 images -> latents, ``decode`` back."""

    def __init__(self, vae: Any, standardization: Standardization | None = None, batch_size: int = 8):
        self.vae, self.std = vae, standardization or Standardization()
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> latents [B, 4, H/8, W/8]: the posterior mean, or ``mean + noise * std``
        with ``noise`` [B, 4, H/8, W/8] (EDM2 draws it per training step)."""
        check(images.dtype == torch.uint8 and images.ndim == 4, "encode takes uint8 images [batch, 3, H, W]")
        x = (images.to(self.vae.device, torch.float32) / 255).to(self.vae.dtype)
        dists = [self.vae.encode(b).latent_dist for b in x.split(self.batch_size)]
        mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
        mean, std = mean.float(), std.float()
        return self.std.standardize(mean if noise is None else mean + noise.to(mean) * std)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, 4, h, w] -> uint8 images [B, 3, 8h, 8w]."""
        raw = self.std.unstandardize(z).to(self.vae.device, self.vae.dtype)
        x = torch.cat([self.vae.decode(b).sample for b in raw.split(self.batch_size)])
        return x.float().clamp(0, 1).mul(255).to(torch.uint8)  # truncation, as EDM2
