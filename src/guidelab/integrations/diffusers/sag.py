"""Self-attention guidance (SAG; Hong et al. 2023, arXiv 2210.00939) for diffusers UNets.

One step, in EDM variables (paper Sec. 4, eq. 16-17; diffusers' ``StableDiffusionSAGPipeline``):

1. ``D = D(x, sigma)``; the middle block's self-attention map of that call, averaged over heads and summed over
   queries, is the attention each token receives; tokens receiving more than ``threshold`` (1: the mean) form the
   mask, upsampled (nearest) to the latent size;
2. ``x0' = blur(D) M + D (1 - M)`` (Gaussian blur, ``kernel_size`` 9, ``blur_sigma`` 1, reflect padding);
3. re-noised with the model's own noise estimate ``eps = (x - D) / sigma``: ``x' = x0' + sigma eps``;
4. ``D_ref = x - sigma eps(x')`` (the degraded prediction's noise applied at x: the paper combines noise
   predictions, ``eps~ = eps + s (eps - eps(x'))``), ``D_ref = D(x') + (x - x')``;
5. ``D_sag = D_ref + w (D - D_ref)``, i.e. the paper's / diffusers' ``sag_scale = w - 1``.

With ``cfg_weight`` (the pipeline at ``guidance_scale > 1``): the mask and the degraded input come from the
unconditional branch, ``D = D_u + cfg_weight (D_c - D_u) + (w - 1)(D_u - D_ref,u)`` (paper eq. 25); D_c and D_u
are one batched call. Two network calls per step in sequence (the second needs the first's map).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ...denoisers import Guider
from ...errors import check
from ...guidance._base import Branch, _batchable
from .adapter import DiffusersDenoiser
from .hooks import Perturbation, perturbed_attention

#: The paper's / diffusers' settings: Gaussian blur kernel 9, sigma 1; mask threshold 1 (the mean attention).
KERNEL_SIZE, BLUR_SIGMA, THRESHOLD = 9, 1.0, 1.0


def gaussian_blur(x: torch.Tensor, kernel_size: int = KERNEL_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Depthwise Gaussian blur of [B, C, H, W] with reflect padding (the SAG code's kernel: float32 taps on
    ``linspace(-(k-1)/2, (k-1)/2, k)``, normalised, cast to x's dtype)."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (t / sigma).pow(2))
    k1 = (pdf / pdf.sum()).to(device=x.device, dtype=x.dtype)
    k2 = torch.mm(k1[:, None], k1[None, :]).expand(x.shape[1], 1, kernel_size, kernel_size)
    p = kernel_size // 2
    return F.conv2d(F.pad(x, [p, p, p, p], mode="reflect"), k2, groups=x.shape[1])


class SAG(Guider):
    """The SAG guider (module docstring); build it with :func:`sag`."""

    name = "sag"

    def __init__(
        self, den: DiffusersDenoiser, w: float, blur_sigma: float, kernel_size: int, threshold: float, cfg_weight: float | None
    ):
        self.den, self.w, self.cfg_weight = den, w, cfg_weight
        self.blur_sigma, self.kernel_size, self.threshold = blur_sigma, kernel_size, threshold
        assert den.perturbation is not None  # sag() sets it
        self.pert: Perturbation = den.perturbation

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.den(x, sigma, **cond)

    def _mapped(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any], capture: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``D`` of one call and, with ``capture``, the received-attention map of its last ``x.shape[0]`` rows."""
        if not capture:
            return self.den(x, sigma, **cond), None
        store: list = []
        with perturbed_attention(
            self.den.model, self.pert, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), store=store
        ):
            D = self.den(x, sigma, **cond)
        check(len(store) == 1, f"sag: the selected attention layer ran {len(store)} times in one call (need once)")
        return D, store[0][1]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        B, cfg = x.shape[0], self.cfg_weight is not None
        if cfg:
            assert self.den.condition is not None  # sag() checks the null condition for cfg_weight
            cu = Branch(self.den, self.den.condition.null).cond(cond, x, sigma)
            cc = dict(cond)
            if _batchable([cc, cu], B):  # conditional and unconditional rows in one call, the map from the latter
                merged = {k: torch.cat([cc[k], cu[k]]) if isinstance(cc[k], torch.Tensor) else cc[k] for k in cc}
                store: list = []
                marks = torch.arange(2 * B, device=x.device) >= B
                with perturbed_attention(self.den.model, self.pert, marks, store=store):
                    both = self.den(torch.cat([x, x]), torch.cat([sigma, sigma]), **merged)
                check(len(store) == 1, f"sag: the selected attention layer ran {len(store)} times in one call")
                D_c, D, received = both[:B], both[B:], store[0][1]
            else:
                D_c = self.den(x, sigma, **cc)
                D, received = self._mapped(x, sigma, cu, True)
            ref_cond = cu
        else:
            D, received = self._mapped(x, sigma, cond, True)
            ref_cond = cond
        assert received is not None
        L = received.shape[-1]
        h = math.isqrt(L)
        check(h * h == L, f"sag needs a square attention grid, got {L} tokens")
        mask = (received > self.threshold).reshape(B, 1, h, h).to(x.dtype)
        mask = F.interpolate(mask, x.shape[-2:])  # nearest, as the SAG code
        x0_deg = gaussian_blur(D, self.kernel_size, self.blur_sigma) * mask + D * (1 - mask)
        x_deg = x0_deg + (x - D)  # = x0' + sigma eps, eps = (x - D) / sigma
        D_ref = self.den(x_deg, sigma, **ref_cond) + (x - x_deg)
        if self.cfg_weight is None:
            return D_ref.lerp(D, self.w)
        return D.lerp(D_c, self.cfg_weight) + (self.w - 1) * (D - D_ref)

    def __repr__(self) -> str:
        return f"sag(w={self.w})"


def sag(
    denoiser: DiffusersDenoiser,
    w: float,
    *,
    blur_sigma: float = BLUR_SIGMA,
    kernel_size: int = KERNEL_SIZE,
    threshold: float = THRESHOLD,
    layers: str | Sequence[str] | None = None,
    cfg_weight: float | None = None,
) -> Guider:
    """Self-attention guidance (module docstring): ``D = D_ref + w (D - D_ref)``, ``D_ref`` the prediction of the
    input whose highly attended regions were blurred; diffusers' ``sag_scale = w - 1`` (its default 0.75: ``w =
    1.75``). ``layers``: the self-attention whose map makes the mask (default the middle block's, as the paper and
    diffusers; exactly one layer). ``cfg_weight``: CFG as well, the mask from the unconditional branch. UNets
    only (``UNet2DModel``, ``UNet2DConditionModel``). At ``w == 1`` without ``cfg_weight``: the plain model."""
    check(
        isinstance(denoiser, DiffusersDenoiser) and type(denoiser.model).__name__.startswith("UNet"),
        "sag needs a diffusers UNet (its middle block's self-attention map: the official code's ADM UNet and SD "
        "pipeline, diffusers' StableDiffusionSAGPipeline; no transformer form is published), got "
        f"{type(getattr(denoiser, 'model', denoiser)).__name__}",
    )
    for name, v in (("w", w), ("cfg_weight", cfg_weight)):
        check(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
            f"sag's {name} must be a finite number, got {v!r}",
        )
    check(w is not None, "sag needs w")
    check(blur_sigma > 0 and math.isfinite(blur_sigma), f"sag's blur_sigma must be finite and > 0, got {blur_sigma}")
    check(
        isinstance(kernel_size, int) and kernel_size >= 1 and kernel_size % 2 == 1,
        f"sag's kernel_size must be an odd integer >= 1, got {kernel_size!r}",
    )
    check(
        cfg_weight is None or (denoiser.condition is not None and bool(denoiser.condition.null)),
        "sag's cfg_weight needs the null condition: pass null_label=... (class models) or null_text=... (text models)",
    )
    pert = Perturbation("sag", layers)
    den = denoiser.with_perturbation(pert)
    found = pert.modules(den.model)
    check(
        len(found) == 1,
        f"sag takes its mask from one self-attention layer; layers={pert.selection(den.model)} "
        f"selects {len(found)}: {', '.join(n for n, _ in found)}",
    )
    if w == 1 and cfg_weight is None:
        from ...guidance.protocols import OnePass

        return OnePass(denoiser, denoiser, "sag")
    return SAG(den, float(w), blur_sigma, kernel_size, threshold, cfg_weight)
