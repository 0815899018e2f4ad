"""SuperDiff; the method's documentation is :func:`superdiff`'s docstring."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import check
from ..samplers.base import Callback, check_inputs, check_support, noise_seeds, report, resolve_noise
from ._base import Branch, batch_dot, evaluate
from .protocols import Guider, Run

MODES = ("or", "and")


def _branch(b: Branch | Callable[..., torch.Tensor]) -> Branch:
    return b if isinstance(b, Branch) else Branch(b)


def superdiff(
    model_1: Branch | Callable[..., torch.Tensor],
    model_2: Branch | Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    mode: str = "and",
    temperature: float = 1.0,
    bias: float = 0.0,
    uncond: Branch | Callable[..., torch.Tensor] | None = None,
    w: float = 1.0,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    noise: object = None,
    return_logq: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample the OR (mixture) or AND (equal-density) superposition of ``model_1`` and ``model_2``.

    Models are denoisers or :class:`~guidelab.guidance.Branch` es (e.g. one network with two labels:
    ``Branch(net, {"label": 0})``, ``Branch(net, {"label": 1})``, evaluated in one batched call).
    ``temperature`` ``T`` and ``bias`` ``l`` shape OR's kappa. ``uncond``/``w``: the guided form (``w = 1``:
    plain superposition, ``uncond`` unused). ``return_logq``: also return the Itô estimates
    ``log q_i(x_{N-1}; sigma_{N-1}) - log q_i(x_0; sigma_0)``, shape [2, batch] (up to the last nonzero sigma).

    SuperDiff: superposition of diffusion models (Skreta, Atanackovic, Bose, Tong, Neklyudov,
    ICLR 2025, arXiv 2412.17762; methods.md §12).

    Two models ``q_1, q_2`` drive one reverse SDE with the mixed score ``s = kappa s_1 + (1 - kappa) s_2``
    (``kappa`` per sample, per step). Each model's log-density along the *generated* path is tracked
    without divergences by the Itô density estimator [derived with Itô's formula for the EDM heat
    process, reverse time, ``h = sigma |d sigma|``]::

        d log q_i(x) = <dx, s_i> - h |s_i|^2

    (= the official AND update ``-|d sigma| / sigma |eps_i|^2 - <dx, eps_i> / sigma`` with
    ``eps_i = -sigma s_i``). Sign caveat: the official Stable-Diffusion OR branch
    (``applications/images/clip_eval.py``) uses ``+h |s_i|^2``, which contradicts Itô's formula; here
    both modes use the derived sign (a test checks the estimate against the exact log-density).

    * **OR** (mixture ``(q_1 + q_2) / 2``): ``kappa = softmax(T (log q_1 + l), T log q_2)[0]``; with
      ``T = 1, l = 0`` this is the exact mixture score ``sum_i q_i s_i / sum_i q_i``.
    * **AND** (equal densities): ``kappa`` solves the linear equation ``d log q_1 = d log q_2`` for the
      step actually taken (noise included); with ``delta = s_1 - s_2`` and ``dx = 2h s + sqrt(2h) n``::

          kappa = [h (|s_1|^2 - |s_2|^2) - 2h <delta, base> - sqrt(2h) <delta, n>] / (2 h w |delta|^2)

      (``base`` the score without the kappa term; ``w = 1``: ``kappa = 1/2 - <delta, n> / (sqrt(2h) |delta|^2)``).

    With an unconditional ``uncond`` and ``w`` the paper's guided form is used:
    ``s = s_u + w ((s_2 - s_u) + kappa (s_1 - s_2))``. Sampler: Euler-Maruyama on the reverse SDE
    (``dx = 2h s + sqrt(2h) n``, as the official code); the last step returns the mixed ``D``. Cost: 2
    NFE per step (3 with ``uncond``), same-network branches in one batched call. No coupling between
    samples: with ``noise=SampleNoise(seeds)`` each sample depends only on its own seed.
    """
    check(mode in MODES, f"unknown superdiff mode {mode!r}; allowed: {list(MODES)}")
    check(math.isfinite(temperature) and math.isfinite(bias), "temperature and bias must be finite")
    check(isinstance(w, (int, float)) and math.isfinite(w) and w != 0, f"w must be a finite nonzero number, got {w!r}")
    check(w == 1 or uncond is not None, "superdiff with w != 1 needs an unconditional model uncond=...")
    sigmas = check_inputs(x, sigmas)
    branches = [_branch(model_1), _branch(model_2)] + ([_branch(uncond)] if w != 1 and uncond is not None else [])
    for b in branches:
        check_support(b.denoiser, "superdiff", frozenset())
    run = Run(x, sigmas, noise_seeds(noise))
    branches = [Branch(b.denoiser.start(run) if isinstance(b.denoiser, Guider) else b.denoiser, b.overrides) for b in branches]
    draw = resolve_noise(noise, x, sigmas)
    cond = cond or {}
    sig = sigmas.tolist()
    B = x.shape[0]
    logq = torch.zeros(2, B, dtype=torch.float64, device=x.device)
    for i in run.steps(progress, f"superdiff-{mode}"):
        sigma, sigma_next = sig[i], sig[i + 1]
        run.evaluations += 1
        Ds = evaluate(branches, x, torch.full((B,), sigma, dtype=x.dtype, device=x.device), cond, run)
        s1, s2 = ((D - x) / sigma**2 for D in Ds[:2])
        base = s2 if w == 1 else (Ds[2] - x) / sigma**2 + w * (s2 - (Ds[2] - x) / sigma**2)
        delta = s1 - s2
        last = sigma_next == 0
        h = sigma * (sigma - sigma_next)
        n = None if last else draw(sigma, sigma_next)
        if mode == "or":
            kappa = torch.softmax(torch.stack([temperature * (logq[0] + bias), temperature * logq[1]]), 0)[0]
        else:  # solve d log q_1 = d log q_2 for this step's dx (noise included)
            num = h * (batch_dot(s1, s1) - batch_dot(s2, s2)) - 2 * h * batch_dot(delta, base)
            if n is not None:
                num = num - math.sqrt(2 * h) * batch_dot(delta, n)
            kappa = num.double() / (2 * h * w * batch_dot(delta, delta).double().clamp_min(1e-300))
        k = kappa.to(x.dtype).reshape((B,) + (1,) * (x.ndim - 1))
        s = base + w * k * delta
        report(callback, x, i, sigmas, sigma, x + sigma**2 * s)
        if last:
            return (x + sigma**2 * s, logq) if return_logq else x + sigma**2 * s  # D of the mixed score
        assert n is not None
        dx = 2 * h * s + math.sqrt(2 * h) * n  # Euler-Maruyama, reverse SDE
        for j, si in enumerate((s1, s2)):
            logq[j] += (batch_dot(dx, si) - h * batch_dot(si, si)).double()  # Itô density estimator
        x = x + dx
    return (x, logq) if return_logq else x
