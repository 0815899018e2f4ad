"""Named inverse tasks and methods for one image (the ``guidelab inverse`` command builds on this).

``make_task(task, image)`` turns a clean image [C, H, W] into the operator and its measurement:

* ``inpaint``: a mask (``centre``: the middle half of each side missing, ``left`` / ``right``: that half
  known, ``random``: each pixel known with probability 1/2, seeded), ``y`` the known pixels;
* ``superres``: ``Downsample(factor)``, ``y`` the low-resolution image;
* ``lowpass``: the same operator, used by ILVR as "follow the reference's low frequencies";
* ``colorize``: ``Grayscale`` over the channels, ``y`` the gray image.

``solve`` runs one method with its paper's defaults (steps, jump settings, step sizes) unless overridden.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import GuidelabError, check
from ..rng import SampleNoise
from .dps import dps
from .ilvr import ilvr
from .operators import Downsample, Grayscale, Mask, Operator
from .repaint import repaint
from .score_sde_imputation import score_sde_impute
from .sdg import energy
from .steered import steered

TASKS = ("inpaint", "superres", "lowpass", "colorize")
MASKS = ("centre", "left", "right", "random")
#: The papers' number of steps and options (RePaint 250 steps, j = r = 10; ILVR / DPS 1000 DDPM steps; steered
#: 100 respaced; Score-SDE 1000 (VE, CIFAR-10); TFG 50 (its DDIM default); SDG 100 respaced).
DEFAULTS: dict[str, dict[str, Any]] = {
    "repaint": dict(steps=250, jump_length=10, jump_n_sample=10),
    "ilvr": dict(steps=1000),
    "score_sde": dict(steps=1000, snr=0.16),
    "dps": dict(steps=1000, zeta=1.0),
    "steered": dict(steps=100, mode="projection"),
    "tfg": dict(steps=50, rho=1.0),
    "sdg": dict(steps=100, w=2.0),
}
METHODS = tuple(DEFAULTS)


def make_task(
    task: str, image: torch.Tensor, *, mask: str = "centre", factor: int = 2, seed: int = 0
) -> tuple[Operator, torch.Tensor]:
    """``(operator, y)`` for ``task`` on a clean ``image`` [C, H, W]."""
    check(task in TASKS, f"unknown inverse task {task!r}; allowed: {', '.join(TASKS)}")
    check(
        isinstance(image, torch.Tensor) and image.ndim == 3,
        f"image must be a tensor [C, H, W], got {list(getattr(image, 'shape', []))}",
    )
    shape = tuple(image.shape)
    if task == "inpaint":
        check(mask in MASKS, f"unknown mask {mask!r}; allowed: {', '.join(MASKS)}")
        C, H, W = shape
        known = torch.ones(shape, dtype=torch.bool)
        if mask == "centre":
            known[:, H // 4 : H - H // 4, W // 4 : W - W // 4] = False
        elif mask in ("left", "right"):
            known[:, :, W // 2 :] = False
            known = known if mask == "left" else known.flip(-1)
        else:
            keep = torch.rand(H, W, generator=torch.Generator().manual_seed(seed)) < 0.5
            known = keep.expand(C, H, W).clone()
        op: Operator = Mask(known)
    elif task in ("superres", "lowpass"):
        op = Downsample(shape, factor)
    else:
        op = Grayscale(shape, 0)
    return op, op(image[None])[0]


def solve(
    denoiser: Callable[..., torch.Tensor],
    op: Operator,
    y: torch.Tensor,
    method: str,
    *,
    n: int = 8,
    seed: int = 0,
    steps: int | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    progress: bool = False,
    **options: Any,
) -> torch.Tensor:
    """``n`` samples [n, *op.shape] of ``method`` for the measurement ``y`` (seeds ``seed .. seed + n - 1``)."""
    from ..guidance.tfg import measurement_objective, tfg_sample
    from ..samplers import euler_ancestral
    from ..schedules import karras

    check(method in METHODS, f"unknown inverse method {method!r}; allowed: {', '.join(METHODS)}")
    opts: dict[str, Any] = {**DEFAULTS[method], **{k: v for k, v in options.items() if v is not None}}
    steps = opts.pop("steps") if steps is None else steps
    opts.pop("steps", None)
    sigmas = karras(steps, sigma_min, sigma_max, rho)
    noise = SampleNoise(range(seed, seed + n))
    x = noise.randn(list(op.shape)) * sigmas[0]
    common: dict[str, Any] = dict(noise=noise, progress=progress)
    if method == "repaint":
        return repaint(denoiser, x, sigmas, op, y, **opts, **common)
    if method == "ilvr":
        return ilvr(denoiser, x, sigmas, op.pinv(y[None])[0], operator=op, **opts, **common)
    if method == "score_sde":
        return score_sde_impute(denoiser, x, sigmas, op, y, **opts, **common)
    if method == "dps":
        return dps(denoiser, x, sigmas, op, y, **opts, **common)
    if method == "steered":
        return steered(denoiser, x, sigmas, op, y, **opts, **common)
    if method == "tfg":
        return tfg_sample(denoiser, x, sigmas, measurement_objective(op, y[None]), preset="dps", **opts, **common)
    w = opts.pop("w")
    if opts:
        raise GuidelabError(f"sdg takes only w (and steps), got {sorted(opts)}")
    return euler_ancestral(energy(denoiser, measurement_energy(op, y, sigma_min), w), x, sigmas, **common)


def measurement_energy(
    op: Operator, y: torch.Tensor, sigma_min: float = 0.002
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """SDG's energy for a measurement: ``F(x, sigma) = -|y - A x|^2 / (2 max(sigma, sigma_min)^2)`` on the
    *noisy* sample (``A x_sigma`` is ``y`` plus noise of std ``sigma`` per row of an orthonormal A)."""

    def F(x_: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        r = (y - op(x_)).flatten(1)
        return -r.square().sum(1) / (2 * sigma.clamp_min(sigma_min) ** 2)

    return F
