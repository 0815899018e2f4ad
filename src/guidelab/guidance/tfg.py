"""Training-free guidance, TFG; the method's documentation is :func:`tfg_sample`'s docstring."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..errors import GuidelabError, check
from ..samplers.base import Callback, ancestral_step, begin_run, check_inputs, euler_step, evaluator, report, resolve_noise
from ..samplers.noise import BrownianNoise

_C = dict(rho_schedule="constant", mu_schedule="constant")  # the original methods' constant step sizes
#: TFG's defaults and the TFG-space analogues of DPS, LGD, FreeDoM, MPGD and UGD (TFG paper, Sec. 3).
PRESETS: dict[str, dict] = {
    "tfg": dict(rho=1.0, mu=1.0, gamma=0.01, n_recur=1, n_iter=1, eps_bsz=4),
    "dps": dict(rho=1.0, mu=0.0, gamma=0.0, n_recur=1, n_iter=0, eps_bsz=1, **_C),
    "lgd": dict(rho=1.0, mu=0.0, gamma=1.0, n_recur=1, n_iter=0, eps_bsz=4, **_C),
    "freedom": dict(rho=1.0, mu=0.0, gamma=0.0, n_recur=2, n_iter=0, eps_bsz=1),
    "mpgd": dict(rho=0.0, mu=1.0, gamma=0.0, n_recur=1, n_iter=1, eps_bsz=1, **_C),
    "ugd": dict(rho=1.0, mu=1.0, gamma=0.0, n_recur=2, n_iter=2, eps_bsz=1, **_C),
}
_SCHEDULES = ("increase", "decrease", "constant")


def _step_weights(sig: list[float], kind: str) -> list[float]:
    """``s_t N / sum(s)`` for each step (official ``get_rho``/``get_mu``): alpha_t, 1 - alpha_t or 1."""
    check(kind in _SCHEDULES, f"unknown schedule {kind!r}; allowed: {list(_SCHEDULES)}")
    alpha = [(1 + b * b) / (1 + a * a) for a, b in zip(sig[:-1], sig[1:])]  # alpha_t = abar_t / abar_{t-1}
    s = {"increase": alpha, "decrease": [1 - a for a in alpha], "constant": [1.0] * len(alpha)}[kind]
    total = sum(s)
    return [v * len(s) / total for v in s]


def _smoothed(objective: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, eps: list[torch.Tensor | None]) -> torch.Tensor:
    """``log mean_i f(y + eps_i)`` [batch] (Gaussian-smoothed objective, TFG eq. 6)."""
    logf = [objective(y if e is None else y + e) for e in eps]
    for v in logf:
        check(
            isinstance(v, torch.Tensor) and v.shape == y.shape[:1],
            f"objective must return log f of shape [batch]=[{y.shape[0]}], got {getattr(v, 'shape', type(v).__name__)}",
        )
    return torch.logsumexp(torch.stack(logf), 0) - math.log(len(eps))


def _clip_range(clip_x0: str | float | Sequence[float] | None, x: torch.Tensor) -> tuple[float, float] | None:
    """``clip_x0`` as ``(lo, hi)``: ``"images"`` ([-1, 1] for [batch, C, H, W], else None), None, a number
    ``c > 0`` (``[-c, c]``) or a pair ``lo < hi``."""
    if isinstance(clip_x0, str):
        check(clip_x0 == "images", f"clip_x0 must be 'images', None, a number or a pair, got {clip_x0!r}")
        return (-1.0, 1.0) if x.ndim == 4 else None
    if clip_x0 is None:
        return None
    if isinstance(clip_x0, (int, float)) and not isinstance(clip_x0, bool):
        check(math.isfinite(clip_x0) and clip_x0 > 0, f"clip_x0 must be a finite number > 0, got {clip_x0!r}")
        return -float(clip_x0), float(clip_x0)
    if not (
        isinstance(clip_x0, (tuple, list))
        and len(clip_x0) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in clip_x0)
        and clip_x0[0] < clip_x0[1]
    ):
        raise GuidelabError(
            f"clip_x0 must be 'images', None, a number c > 0 (range [-c, c]) or a pair (lo, hi) with lo < hi, got {clip_x0!r}"
        )
    return float(clip_x0[0]), float(clip_x0[1])


def measurement_objective(
    A: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor, y: torch.Tensor, *, kind: str = "dps", sigma_y: float = 1.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Objective ``log f(x0)`` [batch] for a measurement ``y = A(x0) + noise`` (inverse problems).

    ``A``: a callable ``A(x0) -> [batch, ...]`` or a matrix [m, d] applied to the flattened x0 [batch, d];
    ``y``: [batch, ...] (one measurement per sample) or one measurement broadcast over the batch.
    ``kind="dps"``: ``-|y - A(x0)|`` per sample, DPS's normalised step (see :func:`tfg_sample`);
    ``kind="gaussian"``: ``-|y - A(x0)|^2 / (2 sigma_y^2)``, the Gaussian log-likelihood.
    """
    check(kind in ("dps", "gaussian"), f"unknown measurement objective kind {kind!r}; allowed: 'dps', 'gaussian'")
    check(isinstance(sigma_y, (int, float)) and sigma_y > 0, f"sigma_y must be > 0, got {sigma_y!r}")
    if isinstance(A, torch.Tensor):
        check(A.ndim == 2, f"a matrix A must be [m, d], got shape {list(A.shape)}")
        M = A
        A = lambda x0: x0.flatten(1) @ M.to(x0).t()  # noqa: E731
    check(callable(A), "A must be a callable A(x0) or a matrix [m, d]")

    def objective(x0: torch.Tensor) -> torch.Tensor:
        Ax = A(x0)
        check(
            isinstance(Ax, torch.Tensor) and Ax.ndim >= 1 and Ax.shape[0] == x0.shape[0],
            f"A(x0) must return a tensor [batch={x0.shape[0]}, ...], got {getattr(Ax, 'shape', type(Ax).__name__)}",
        )
        r = (y.to(Ax) - Ax).reshape(x0.shape[0], -1)  # y broadcasts over the batch
        if kind == "dps":
            return -torch.linalg.vector_norm(r, dim=1)  # DPS: grad of the norm (Chung et al. 2023, Alg. 1)
        return -r.square().sum(1) / (2 * sigma_y**2)

    return objective


def tfg_sample(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    *,
    preset: str = "tfg",
    rho: float | None = None,
    mu: float | None = None,
    gamma: float | None = None,
    n_recur: int | None = None,
    n_iter: int | None = None,
    eps_bsz: int | None = None,
    rho_schedule: str | None = None,
    mu_schedule: str | None = None,
    gamma_schedule: str = "decrease",
    clip_x0: str | float | Sequence[float] | None = "images",
    eta: float = 1.0,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    noise: object = None,
) -> torch.Tensor:
    """Sample with TFG guidance toward ``objective(x0) -> log f(x0)`` [batch] (differentiable).

    ``preset`` picks the method (see the table below); any of ``rho, mu, gamma, n_recur, n_iter,
    eps_bsz, rho_schedule, mu_schedule`` overrides it. ``x`` starts at ``sigmas[0]``; ``cond`` goes to
    the denoiser; ``noise`` (``SampleNoise`` for per-sample seeds, or a noise sampler) feeds the DDIM
    noise, the smoothing draws and the renoising, independent draws for each use; ``BrownianNoise`` is
    refused (one Brownian path gives the same increment for every draw on a step). ``objective`` is
    called once per smoothing draw on a [batch] tensor, so it may hold per-sample targets. With
    ``rho = mu = 0`` (and ``clip_x0=None``) this is exactly :func:`guidelab.samplers.euler_ancestral`.

    Training-free guidance, TFG (Ye et al., NeurIPS 2024, arXiv 2409.15761, Alg. 1; methods.md §10).

    Guides an *unconditional* denoiser toward high values of any differentiable objective ``log f(x0)``
    (a classifier's log-probability, a measurement log-likelihood ``-|y - A x0|^2 / 2s^2``, a user
    energy ``-E(x0)`` as in SDG ...) with no training. Each step, repeated ``n_recur`` times:

    * smoothed objective ``log f~(y) = log mean_i f(y + gamma_t n_i)``, ``i = 1..eps_bsz``;
    * ``Delta_t = rho_t grad_x log f~(D(x))`` -- the gradient *through the denoiser* (DPS-like);
    * ``y <- y + mu_t grad_y log f~(y)`` ``n_iter`` times from ``y = D(x)``, ``Delta_0 = y - D`` (MPGD-like);
    * a DDIM(eta) step from ``(x, D)``, plus the two shifts; if more recurrences follow, renoise back
      to sigma (the "time travel" of FreeDoM/UGD).

    Why a sampler and not a guider: TFG changes the *step* (gradients w.r.t. ``x``, an x0-space shift,
    recurrence with renoising between sigma and sigma_next), so it cannot be written as a denoiser of
    ``(x, sigma)`` alone without lying about what it does. ``tfg_sample`` has the sampler signature,
    with the objective added.

    EDM form [derived from the official VP code ``methods/tfg.py::guide_step``]: with
    ``z = x / sqrt(1 + sigma^2)``, ``abar_t = 1 / (1 + sigma^2)`` and ``alpha_t = abar_t / abar_{t-1} =
    (1 + sigma_next^2) / (1 + sigma^2)``, the VP update ``z' = DDIM + Delta_t(z) / sqrt(alpha_t) +
    sqrt(abar_{t-1}) Delta_0`` becomes ``x' = DDIM_EDM(x, D) + rho_t (1 + sigma^2) grad_x log f~ + Delta_0``;
    the VP renoise ``z = sqrt(alpha_t) z' + sqrt(1 - alpha_t) n`` becomes ``x = x' + sqrt(sigma^2 - sigma_next^2) n``;
    DDIM(eta) is the ancestral split of :func:`guidelab.samplers.base.ancestral_step` (eta = 1: DDPM).
    Schedules as the official code: ``rho_t = rho s_t N / sum(s)`` with ``s_t = alpha_t`` ("increase",
    TFG's and FreeDoM's default), ``1 - alpha_t`` ("decrease") or 1 ("constant": the DPS, LGD, MPGD and UGD
    codes' fixed ``guidance_strength``), the same for mu; ``gamma_t = gamma sqrt(1 - abar_t)`` ("decrease")
    or ``gamma`` ("constant").

    Presets (TFG paper, Sec. 3: the earlier methods are points of this design space). ``dps``, ``lgd``,
    ``freedom``, ``mpgd`` and ``ugd`` are the *TFG-space analogues* of those methods: their settings in TFG's
    update (one DDIM step in TFG's parameterisation), not re-implementations of each paper's own sampler:

    ========  ======================================================  ==============================
    preset    what is on                                              defaults
    ========  ======================================================  ==============================
    tfg       everything (official defaults)                          rho 1, mu 1, gamma 0.01, eps 4
    dps       rho only, no smoothing, no recurrence                   rho 1
    lgd       rho with Monte-Carlo smoothing gamma_t = sqrt(1-abar_t)  rho 1, gamma 1, eps_bsz 4
    freedom   rho with recurrence (time travel)                       rho 1, n_recur 2
    mpgd      mu only: one gradient step on x0, no network gradient    mu 1, n_iter 1
    ugd       rho + mu (n_iter steps on x0) + recurrence              rho 1, mu 1, n_iter 2, n_recur 2
    ========  ======================================================  ==============================

    DPS's own step (Chung et al. 2023, Alg. 1) is ``zeta / |y - A(x0)|`` times ``grad |y - A(x0)|^2``,
    i.e. a multiple of the gradient of the *norm*; the official code takes ``zeta grad_x |y - A(x0)|``. That is
    TFG-DPS with ``log f = -|y - A(x0)|``: :func:`measurement_objective` with ``kind="dps"`` and
    ``rho = zeta`` (the code's ``scale``; the paper's ``zeta'`` is ``rho / 2``). The norm is per sample
    (the official code takes it over the whole batch, run at batch 1). ``kind="gaussian"`` is the
    plain log-likelihood ``-|y - A(x0)|^2 / (2 sigma_y^2)`` that the other presets use. One difference
    remains, shared by every preset: TFG adds ``Delta_t / sqrt(alpha_t)`` where the original methods add
    ``Delta_t`` (a factor ``sqrt(alpha_t) -> 1`` as steps get small; TFG folds it into ``rho``).

    ``clip_x0``: the official code clips the x0 estimate right after the network (``_predict_x0``), so the
    clipped estimate is what the objective sees (its gradient through the clamp is zero outside the range),
    what ``y`` starts from and what the DDIM step uses. Its default (``utils/configs.py``: ``clip_x0=True``,
    ``clip_sample_range=1.0``; only the molecule scripts turn it off) is followed for images: ``"images"``
    (default) clips image batches ``x`` [batch, C, H, W] (guidelab's image data lie in [-1, 1]) to
    ``[-1, 1]`` and leaves any other data (points, the exact worlds) unclipped. ``None``: no clipping;
    ``c``: ``[-c, c]``; ``(lo, hi)``: that range.

    Cost per step: ``n_recur`` NFE, plus a backward pass through the denoiser when ``rho != 0``, plus
    ``eps_bsz (1[rho != 0] + n_iter 1[mu != 0])`` objective evaluations.
    """
    if preset not in PRESETS:
        raise GuidelabError(f"unknown TFG preset {preset!r}; allowed: {sorted(PRESETS)}")
    p = {"rho_schedule": "increase", "mu_schedule": "increase", **PRESETS[preset]}
    for k, v in dict(
        rho=rho,
        mu=mu,
        gamma=gamma,
        n_recur=n_recur,
        n_iter=n_iter,
        eps_bsz=eps_bsz,
        rho_schedule=rho_schedule,
        mu_schedule=mu_schedule,
    ).items():
        if v is not None:
            p[k] = v
    for k in ("rho", "mu", "gamma"):
        check(isinstance(p[k], (int, float)) and math.isfinite(p[k]), f"{k} must be a finite number, got {p[k]!r}")
    check(p["gamma"] >= 0, f"gamma must be >= 0, got {p['gamma']}")
    for k, lo in (("n_recur", 1), ("n_iter", 0), ("eps_bsz", 1)):
        check(
            isinstance(p[k], int) and not isinstance(p[k], bool) and p[k] >= lo, f"{k} must be an integer >= {lo}, got {p[k]!r}"
        )
    check(eta >= 0, f"eta must be >= 0, got {eta}")
    check(
        gamma_schedule in ("decrease", "constant"), f"unknown gamma_schedule {gamma_schedule!r}; allowed: 'decrease', 'constant'"
    )
    check(callable(objective), "objective must be a callable objective(x0) -> log f(x0) of shape [batch]")
    check(
        not isinstance(noise, BrownianNoise),
        "tfg_sample draws several independent noises per step (smoothing, "
        "DDIM noise, renoising), which one Brownian path cannot give: use SampleNoise or a noise sampler",
    )
    clip = _clip_range(clip_x0, x)

    sigmas = check_inputs(x, sigmas)
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "tfg_sample", supports=frozenset())
    noise = resolve_noise(noise, x, sigmas)
    cond = cond or {}
    sig = sigmas.tolist()
    rho_w, mu_w = _step_weights(sig, p["rho_schedule"]), _step_weights(sig, p["mu_schedule"])
    evaluate = evaluator(denoiser, x, cond, run)

    def D_of(x_: torch.Tensor, s: float) -> torch.Tensor:
        D = evaluate(x_, s)
        return D if clip is None else D.clamp(*clip)  # official _predict_x0: clip, grad through it

    for i in run.steps(progress, f"tfg-{preset}"):
        sigma, sigma_next = sig[i], sig[i + 1]
        rho_t, mu_t = p["rho"] * rho_w[i], p["mu"] * mu_w[i]
        gamma_t = p["gamma"] * (sigma / math.sqrt(1 + sigma**2) if gamma_schedule == "decrease" else 1.0)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        for r in range(p["n_recur"]):
            eps = [gamma_t * noise(sigma, sigma_next) for _ in range(p["eps_bsz"])] if gamma_t > 0 else [None]
            if rho_t != 0:
                with torch.inference_mode(False), torch.enable_grad():  # also works under inference_mode
                    xg = x.detach().clone().requires_grad_(True)
                    eps = [None if e is None else e.clone() for e in eps]
                    D = D_of(xg, sigma)
                    (grad_x,) = torch.autograd.grad(_smoothed(objective, D, eps).sum(), xg)
                D = D.detach()
                delta_t = rho_t * (1 + sigma**2) * grad_x  # VP Delta_t / sqrt(alpha_t), in EDM x units
            else:
                D, delta_t = D_of(x, sigma), None
            y = D
            if mu_t != 0:
                for _ in range(p["n_iter"]):  # gradient ascent on x0 (TFG Alg. 1, line 8)
                    with torch.inference_mode(False), torch.enable_grad():
                        yg = y.detach().clone().requires_grad_(True)
                        eps = [None if e is None else e.clone() for e in eps]
                        (grad_y,) = torch.autograd.grad(_smoothed(objective, yg, eps).sum(), yg)
                    y = y + mu_t * grad_y
            if r == 0:
                report(callback, x, i, sigmas, sigma, D)
            x_prev = euler_step(None, x, D, sigma, sigma_down)  # DDIM(eta) step, deterministic part
            if sigma_next > 0 and sigma_up > 0:
                x_prev = x_prev + noise(sigma, sigma_next) * sigma_up
            if delta_t is not None:
                x_prev = x_prev + delta_t
            if mu_t != 0 and p["n_iter"] > 0:
                x_prev = x_prev + (y - D)  # sqrt(abar_{t-1}) Delta_0 in VP units
            if r < p["n_recur"] - 1:  # renoise sigma_next -> sigma (time travel)
                x = x_prev + math.sqrt(sigma**2 - sigma_next**2) * noise(sigma, sigma_next)
        x = x_prev.detach()
    return x
