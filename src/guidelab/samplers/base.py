"""The building blocks of sampler loops, written once: input checks, the denoiser call, noise, churn,
ancestral step sizes, the single-step updates, callbacks, progress and the two loops. Public: new
samplers (and sampler-like methods: guidance.fkc, tfg, superdiff, guidelab.inverse) build on it.

Inside the loops, step sizes are Python floats (``sigmas.tolist()``): the coefficient arithmetic is
then plain float64 and costs no tensor op. Noise samplers are called as ``noise(sigma, sigma_next)``
with floats and return standard normal noise shaped like ``x``.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from typing import Any, Callable, Iterator, TypeVar

import torch

from ..denoisers import Guider
from ..errors import GuidelabError, NonFiniteError, check
from ..rng import NoiseSampler, SampleNoise, global_noise
from .catalog import INFO, supporting
from .noise import BrownianNoise
from .run import Run

Callback = Callable[[dict[str, Any]], None]
#: ``step(evaluate, x, D, sigma, sigma_next) -> x_next``: one deterministic step from sigma to sigma_next
#: given ``D = evaluate(x, sigma)``; ``evaluate(x, s)`` calls the denoiser at the float noise level s.
Step = Callable[..., torch.Tensor]
_T = TypeVar("_T")


def check_inputs(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a sampler's ``x`` and ``sigmas``; return sigmas in x's dtype and device."""
    check(
        isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] >= 1,
        f"x must be a tensor of shape [batch, ...], got {type(x).__name__} {getattr(x, 'shape', '')}",
    )
    sigmas = torch.as_tensor(sigmas)
    check(
        sigmas.ndim == 1 and sigmas.numel() >= 2,
        f"sigmas must be a 1-D tensor of at least 2 values (n steps + final 0), got shape {list(sigmas.shape)}",
    )
    check(bool(torch.isfinite(sigmas).all()), "sigmas must be finite")
    check(float(sigmas[-1]) == 0.0, f"sigmas must end in 0, got last value {float(sigmas[-1]):g}")
    check(bool((sigmas[1:] < sigmas[:-1]).all()), "sigmas must be strictly decreasing")
    check(bool(torch.isfinite(x).all()), "x (the starting sample) contains NaN or inf values")
    return sigmas.to(dtype=x.dtype, device=x.device)


def resolve_noise(noise: object, x: torch.Tensor, sigmas: torch.Tensor | None = None) -> NoiseSampler:
    """``None`` -> torch's global generator; a ``SampleNoise`` -> per-sample; a ``BrownianNoise`` ->
    per-sample Brownian trees over ``[0, sigmas[0]]``; else a noise sampler ``(sigma, sigma_next) -> tensor``."""
    if noise is None:
        return global_noise(x)
    if isinstance(noise, SampleNoise):
        return noise.sampler(x)
    if isinstance(noise, BrownianNoise):
        return noise.tree_sampler(x, float(sigmas[0]) if sigmas is not None else None)
    if not callable(noise):
        raise GuidelabError(
            f"noise must be None, a SampleNoise, a BrownianNoise or a callable (sigma, sigma_next) -> tensor, "
            f"got {type(noise).__name__}"
        )
    return noise


def check_support(denoiser: object, sampler: str, supports: frozenset[str] | None = None) -> None:
    """Refuse a guider whose ``requires`` the sampler does not support (plain denoisers require nothing).

    ``supports`` defaults to ``catalog.INFO[sampler].supports`` (sampler-like methods pass their own).
    """
    if not isinstance(denoiser, Guider):
        check(callable(denoiser), f"{sampler} needs a denoiser D(x, sigma, **cond), got {type(denoiser).__name__}")
        return
    supports = INFO[sampler].supports if supports is None else supports
    missing = denoiser.requires - supports
    if missing:
        need = " and ".join(f"the {f} step" for f in sorted(missing))
        raise GuidelabError(
            f"{denoiser.name} needs a sampler with {need}: {', '.join(supporting(denoiser.requires)) or 'none'}; got {sampler}"
        )


def noise_seeds(noise: object) -> list[int] | None:
    """The per-sample seeds of a ``SampleNoise`` / ``BrownianNoise`` (None for other noise)."""
    return noise.seeds if isinstance(noise, (SampleNoise, BrownianNoise)) else None


def begin_run(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise: object,
    sampler: str,
    supports: frozenset[str] | None = None,
) -> tuple[Callable[..., torch.Tensor], Run]:
    """Start one sampling run: check the guider's ``requires`` (:func:`check_support`), create the
    :class:`~guidelab.samplers.run.Run` (seeds from a ``SampleNoise`` / ``BrownianNoise``) and bind
    the guider to it. Returns ``(denoiser, run)``; the loop iterates ``run.steps(...)``."""
    check_support(denoiser, sampler, supports)
    run = Run(x, sigmas, noise_seeds(noise))
    run.sampler = sampler
    return (denoiser.start(run) if isinstance(denoiser, Guider) else denoiser), run


def evaluator(denoiser: Callable[..., _T], x: torch.Tensor, cond: dict | None, run: Run) -> Callable[[torch.Tensor, float], _T]:
    """``evaluate(x, s)``: the denoiser at float noise level ``s``, broadcast to the per-sample [batch] shape;
    counts ``run.evaluations``."""
    cond = cond or {}
    batch, dtype, device = x.shape[0], x.dtype, x.device

    def evaluate(x_: torch.Tensor, s: float) -> _T:
        run.evaluations += 1
        out: Any = denoiser(x_, torch.full((batch,), s, dtype=dtype, device=device), **cond)
        for D in out if isinstance(out, tuple) else (out,):
            check_finite_output(D, run, s)
        return out

    return evaluate


_ALLOW_NONFINITE: ContextVar[bool] = ContextVar("guidelab_allow_nonfinite", default=False)


@contextlib.contextmanager
def allow_nonfinite(allow: bool = True) -> Iterator[None]:
    """Inside this context samplers do not check denoiser outputs for NaN / inf (``--allow-nonfinite``)."""
    token = _ALLOW_NONFINITE.set(allow)
    try:
        yield
    finally:
        _ALLOW_NONFINITE.reset(token)


def nonfinite_allowed() -> bool:
    """Whether the caller is inside :func:`allow_nonfinite` (the non-finite check is off)."""
    return _ALLOW_NONFINITE.get()


def check_finite_output(D: torch.Tensor, run: Run, sigma: float) -> None:
    """Raise :class:`NonFiniteError` naming the sampler, step, sigma and rows if ``D`` holds NaN or inf.

    One reduction per evaluation: the sum of ``D`` is finite exactly when every value is, unless it overflows
    (then ``isfinite(D).all()`` decides); ~10x cheaper than ``isfinite(D).all()`` on images. The rows are found
    only after a failure."""
    if _ALLOW_NONFINITE.get() or math.isfinite(D.sum().item()) or bool(torch.isfinite(D).all()):
        return
    rows = (~torch.isfinite(D.detach().flatten(1))).any(1).nonzero().flatten().tolist()
    more = f" (+{len(rows) - 8} more)" if len(rows) > 8 else ""
    raise NonFiniteError(
        f"{run.sampler or 'sampler'}: the denoiser returned NaN/inf at step {run.step} (sigma {sigma:g}) in rows "
        f"{rows[:8]}{more}; samplers.allow_nonfinite() / --allow-nonfinite turns this check off"
    )


def pair_evaluator(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, cond: dict | None, run: Run
) -> Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]:
    """``evaluate_pair(x, s) -> (D_data, D_renoise)`` for samplers with the renoise step (``"renoise"`` in
    their ``supports``): :meth:`Guider.pair` of a guider that requires it (CFG++: ``(D_lam, D_u)``), else
    ``(D, D)``, the same tensor twice."""
    if isinstance(denoiser, Guider) and "renoise" in denoiser.requires:
        return evaluator(denoiser.pair, x, cond, run)
    evaluate = evaluator(denoiser, x, cond, run)

    def pair(x_: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        D = evaluate(x_, s)
        return D, D

    return pair


def renoise_inner(
    evaluate_pair: Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]],
    D: torch.Tensor,
    D_r: torch.Tensor,
    sigma: float,
    sigma_next: float,
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The inner evaluations (Heun's corrector) of a renoise step sigma -> sigma_next started from
    ``x_s = x + g``, ``g = D - D_r`` (:func:`shifted`): CFG at the step's CFG++ weight
    ``w = lam sigma / (sigma - sigma_next)`` (methods.md §4), seen from ``x_s``::

        D_eff(x', s') = D'_r + (sigma g' - s' g) / (sigma - sigma_next),    g' = D'_lam - D'_u

    so that a step from ``x_s`` with ``d' = (x' - D_eff) / s'`` is the step from ``x`` with ``d' = (x' - D'_w) / s'``
    (derivation: :func:`heun_step`). ``g = g' = 0`` (lam = 0) gives ``D'_r`` bit for bit."""

    def inner(x_: torch.Tensor, s: float) -> torch.Tensor:
        D2, D2_r = evaluate_pair(x_, s)
        return D2_r + (sigma * (D2 - D2_r) - s * (D - D_r)) / (sigma - sigma_next)

    return inner


def shifted(x: torch.Tensor, D: torch.Tensor, D_r: torch.Tensor) -> torch.Tensor:
    """The renoise step (CFG++): a step from ``x + (D - D_r)`` with data term ``D`` uses ``D_r`` in its
    direction terms; ``x`` itself when D_r is D. Euler: ``D + (s'/s)(x + D - D_r - D) = D + (s'/s)(x - D_r)``
    (CFG++, methods.md §4); DPM++(2S) as ComfyUI's ``sample_dpmpp_2s_ancestral_cfg_pp``; Heun:
    :func:`heun_step`."""
    return x if D_r is D else x + (D - D_r)


def report(callback: Callback | None, x: torch.Tensor, i: int, sigmas: torch.Tensor, sigma_hat: float, D: torch.Tensor) -> None:
    """The k-diffusion callback dict: ``x`` (at sigma_hat), step ``i``, ``sigma``, ``sigma_hat``, ``denoised``."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas.new_tensor(sigma_hat), "denoised": D})


def churn(
    x: torch.Tensor,
    sigma: float,
    n_steps: int,
    noise: NoiseSampler | None,
    sigma_next: float,
    *,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> tuple[torch.Tensor, float]:
    """EDM Algorithm 2, lines 4-6: raise the noise level to sigma_hat = (1 + gamma) sigma, adding fresh noise."""
    gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    assert noise is not None, "churn with s_churn > 0 needs a noise sampler"
    sigma_hat = sigma * (gamma + 1)
    return x.add(noise(sigma, sigma_next), alpha=math.sqrt(sigma_hat**2 - sigma**2) * s_noise), sigma_hat


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split sigma -> sigma_next into a deterministic step to sigma_down and fresh noise of std sigma_up.

    ``sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))`` and
    ``sigma_down^2 = sigma_next^2 - sigma_up^2``; eta = 1 is the DDPM posterior (Ho et al. 2020,
    eq. 7 in EDM coordinates), eta = 0 the deterministic step.
    """
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


# ---------------------------------------------------------------------------------------------
# Single-step updates (deterministic; sigma -> sigma_next). d = (x - D) / sigma is dx/dsigma (EDM eq. 3).


def euler_step(
    evaluate: Callable[[torch.Tensor, float], torch.Tensor] | None,
    x: torch.Tensor,
    D: torch.Tensor,
    sigma: float,
    sigma_next: float,
) -> torch.Tensor:
    """Euler on the PF-ODE: ``x + (sigma_next - sigma) (x - D) / sigma = D + (sigma_next / sigma) (x - D)``
    (one fused lerp; 1 NFE, already spent)."""
    return torch.lerp(D, x, sigma_next / sigma)


def heun_step(
    evaluate: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    D: torch.Tensor,
    sigma: float,
    sigma_next: float,
) -> torch.Tensor:
    """Heun's method (EDM Alg. 2 lines 8-11); Euler when sigma_next = 0.

    ``x + (sigma_next - sigma) (d + d') / 2`` with ``d = (x - D) / sigma``, ``d' = (x' - D') / sigma_next``.

    CFG++ (guidelab's derivation, not a published form). One CFG++ Euler step is a CFG Euler step at
    ``w = lam s / (s - s')`` (methods.md §4); CFG++ Heun is CFG Heun at that ``w`` held over the step, with
    ``g = D_lam - D_u = lam (D_c - D_u)`` (``g'``, ``D'_u`` at the predictor)::

        x'     = x + (s' - s)(x - D_w)/s = D_lam + (s'/s)(x - D_u)          # first stage = CFG++ Euler
        x_next = (x + x')/2 + (s' - s)/(2 s') (x' - D'_u) + s/(2 s') g'     # trapezoid of the CFG drift at w

    data terms from ``D_lam`` (both guidance vectors), directions from ``D_u``; :func:`churn_loop` passes
    ``x_s = x + g`` (:func:`shifted`), ``D = D_lam`` and :func:`renoise_inner`. As in the official DPM++(2S)-a
    CFG++ (CFGpp-diffusion/CFGpp), the second evaluation enters with both branches. ``lam = 0``: Heun; the step
    to sigma = 0: CFG++ Euler's (``D_lam``).
    """
    x_next = torch.lerp(D, x, sigma_next / sigma)
    if sigma_next == 0:
        return x_next
    dt = 0.5 * (sigma_next - sigma)
    d_next = x_next - evaluate(x_next, sigma_next)
    return x.add(x - D, alpha=dt / sigma).add_(d_next, alpha=dt / sigma_next)


def dpm2_step(
    evaluate: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    D: torch.Tensor,
    sigma: float,
    sigma_next: float,
) -> torch.Tensor:
    """Midpoint method with the midpoint at the geometric mean of the sigmas (DPM-Solver-2, Lu et al. 2022,
    in the form of k-diffusion's ``sample_dpm_2``); Euler when sigma_next = 0."""
    if sigma_next == 0:
        return torch.lerp(D, x, 0.0)
    s_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_next)))
    x_mid = torch.lerp(D, x, s_mid / sigma)  # Euler to s_mid
    return x.add(x_mid - evaluate(x_mid, s_mid), alpha=(sigma_next - sigma) / s_mid)


def dpmpp_2s_step(
    evaluate: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    D: torch.Tensor,
    sigma: float,
    sigma_next: float,
) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1 with r = 1/2) in lambda = -log sigma; D when sigma_next = 0.

    First-order exponential-integrator steps are lerps: ``(s'/s) x - expm1(-h) D = D + (s'/s)(x - D)``.
    """
    if sigma_next == 0:
        return D
    s_mid = math.sqrt(sigma * sigma_next)  # lambda_mid = lambda + h / 2
    x_mid = torch.lerp(D, x, s_mid / sigma)
    return torch.lerp(evaluate(x_mid, s_mid), x, sigma_next / sigma)


# ---------------------------------------------------------------------------------------------
# The two loops every one-step sampler is made of.


@torch.no_grad()
def churn_loop(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    step: Step,
    *,
    name: str,
    cond: dict | None,
    callback: Callback | None,
    progress: bool,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    noise: object,
) -> torch.Tensor:
    """EDM Algorithm 2 with any ``step``: churn to sigma_hat, then a deterministic step to sigma_next.

    The renoise step (CFG++, where ``name`` supports it): the step starts from :func:`shifted`; its inner
    evaluations (Heun's corrector) are :func:`renoise_inner`.
    """
    sigmas = check_inputs(x, sigmas)
    denoiser, run = begin_run(denoiser, x, sigmas, noise, name)
    noise = resolve_noise(noise, x, sigmas) if s_churn > 0 else None
    evaluate = evaluator(denoiser, x, cond, run)
    evaluate_pair = pair_evaluator(denoiser, x, cond, run)
    sig = sigmas.tolist()
    n = len(sig) - 1
    for i in run.steps(progress, name):
        x, sigma_hat = churn(x, sig[i], n, noise, sig[i + 1], s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
        D, D_r = evaluate_pair(x, sigma_hat)
        report(callback, x, i, sigmas, sigma_hat, D)
        inner = evaluate if D_r is D else renoise_inner(evaluate_pair, D, D_r, sigma_hat, sig[i + 1])
        x = step(inner, shifted(x, D, D_r), D, sigma_hat, sig[i + 1])
    return x


@torch.no_grad()
def ancestral_loop(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    step: Step,
    *,
    name: str,
    cond: dict | None,
    callback: Callback | None,
    progress: bool,
    s_noise: float,
    noise: object,
    eta: float = 1.0,
    split: Callable[[float, float], tuple[float, float]] | None = None,
) -> torch.Tensor:
    """Ancestral sampling: a deterministic ``step`` to sigma_down, then fresh noise of std sigma_up.

    ``split(sigma, sigma_next) -> (sigma_down, sigma_up)`` defaults to :func:`ancestral_step` with ``eta``.
    The renoise step (CFG++, where ``name`` supports it): the step starts from :func:`shifted`.
    """
    sigmas = check_inputs(x, sigmas)
    check(eta >= 0, f"eta must be >= 0, got {eta}")
    denoiser, run = begin_run(denoiser, x, sigmas, noise, name)
    split = split or (lambda s, s_next: ancestral_step(s, s_next, eta))
    noise = resolve_noise(noise, x, sigmas)
    evaluate = evaluator(denoiser, x, cond, run)
    evaluate_pair = pair_evaluator(denoiser, x, cond, run)
    sig = sigmas.tolist()
    for i in run.steps(progress, name):
        sigma, sigma_next = sig[i], sig[i + 1]
        D, D_r = evaluate_pair(x, sigma)
        report(callback, x, i, sigmas, sigma, D)
        sigma_down, sigma_up = split(sigma, sigma_next)
        x = step(evaluate, shifted(x, D, D_r), D, sigma, sigma_down)
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise(sigma, sigma_next) * (s_noise * sigma_up)  # (guidance.fkc relies on this exact form)
    return x
