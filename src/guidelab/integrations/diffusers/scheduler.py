"""A folder's scheduler config honoured: the time grid the scheduler makes (``schedule="pipeline"``), its x0
clipping / dynamic thresholding (a denoiser wrapper), the guidelab sampler equal to its update, and a clear
error for every setting that cannot take effect.

* DDIM / DDPM / PNDM: the grid timesteps of ``timestep_spacing`` with ``steps_offset`` (schedules.discrete); the
  last step goes to sigma 0, or with ``set_alpha_to_one=False`` (DDIM, PNDM) to ``sigma_0`` (alpha_bar_0), as the
  scheduler's ``final_alpha_cumprod`` (:func:`final_sigma`, applied by :func:`sample`); ``clip_sample`` clamps
  x0 to ``±clip_sample_range``; ``thresholding``
  is Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3) at ``dynamic_thresholding_ratio``.
* Euler / Euler ancestral / DPM-Solver++ / Heun / LMS: the scheduler's own ``sigmas`` (``use_karras_sigmas``,
  ``final_sigmas_type``, spacing and offset as it applies them).
* FlowMatchEuler: :func:`.flow.flow_sigmas` (shift, dynamic shift).

DDIM with "trailing" / "linspace" spacing steps to ``t - T // n``, which need not be the next timestep it
evaluates; guidelab steps to the next grid timestep (they agree for "leading" and when n divides T).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ...denoisers import Guider
from ...errors import GuidelabError, check
from . import flow

if TYPE_CHECKING:
    from ...samplers.run import Run

#: Scheduler class -> the guidelab sampler whose update it is (the CLI's default sampler for the folder).
SAMPLERS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "plms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "FlowMatchEulerDiscreteScheduler": "euler",
}
_DISCRETE = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler")
_KARRAS_SIGMAS = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
)


def class_name(config: dict[str, Any]) -> str:
    name = dict(config).get("_class_name", "DDPMScheduler")
    check(name in SAMPLERS, f"scheduler {name!r} is not supported; allowed: {', '.join(SAMPLERS)}")
    return name


def default_sampler(config: dict[str, Any]) -> str:
    """The guidelab sampler equal to the folder's scheduler (PNDM: :func:`plms`, this module's)."""
    return SAMPLERS[class_name(config)]


def plms(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    noise: Any = None,
    final: float = 0.0,
    prediction: str = "epsilon",
) -> torch.Tensor:
    """PNDM's pseudo linear multistep (Liu et al. 2022, PLMS, eq. 12) as diffusers' PNDMScheduler runs it with
    ``skip_prk_steps=True`` (Stable Diffusion 1.x's default): n steps, n + 1 network calls.

    In EDM variables PNDM's transfer is DDIM's step with the combined ``eps = (x - D) / sigma``:
    ``x' = x + (sigma' - sigma) eps``. Step 0: ``eps_0``, then ``eps'`` at the Euler point and the step again from
    ``x`` with ``(eps_0 + eps') / 2``; step i >= 1: Adams-Bashforth on the stored eps (orders 2, 3, 4:
    ``(3, -1) / 2``, ``(23, -16, 5) / 12``, ``(55, -59, 37, -9) / 24``). The last step lands on ``final`` (sigma_0
    with ``set_alpha_to_one=False``, else 0). ``prediction="v_prediction"``: PNDM combines the raw v outputs and
    converts the result to eps with the current sample, ``eps = v / sqrt(1 + s^2) + s x / (1 + s^2)``; the same here
    (v of each call: ``(eps - s D) / sqrt(1 + s^2)``).
    """
    check(prediction in ("epsilon", "v_prediction"), f"PNDM takes epsilon or v_prediction, not {prediction!r}")
    v_pred = prediction == "v_prediction"

    def out(x_: torch.Tensor, D: torch.Tensor, s: float) -> torch.Tensor:  # what the network predicted (PNDM combines these)
        e = (x_ - D) / s
        return (e - s * D) / (1 + s * s) ** 0.5 if v_pred else e

    def eps(x_: torch.Tensor, m: torch.Tensor, s: float) -> torch.Tensor:  # the combined prediction as eps at (x_, s)
        return m / (1 + s * s) ** 0.5 + s * x_ / (1 + s * s) if v_pred else m

    from ...samplers.base import begin_run, check_inputs, evaluator, report

    sigmas = check_inputs(x, sigmas)
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "plms", frozenset())
    evaluate = evaluator(denoiser, x, cond, run)
    sig = sigmas.tolist()
    target = sig[1:-1] + [float(final)]
    ets: list[torch.Tensor] = []
    for i in run.steps(progress, "plms"):
        s, s_next = sig[i], target[i]
        D = evaluate(x, s)
        report(callback, x, i, sigmas, s, D)
        m = out(x, D, s)
        ets = [*ets[-3:], m]
        if len(ets) == 1:
            if len(sig) > 2:  # PNDM's second call at the first step's end, then the step again with the mean
                x1 = x + (s_next - s) * eps(x, m, s)
                m = (m + out(x1, evaluate(x1, s_next), s_next)) / 2
        elif len(ets) == 2:
            m = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            m = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            m = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        x = x + (s_next - s) * eps(x, m, s)
    return x


def check_config(config: dict[str, Any]) -> None:
    """Refuse the settings no guidelab sampler or wrapper reproduces (one clear error)."""
    c, name = dict(config), class_name(config)
    if name in _DISCRETE:
        check(
            c.get("variance_type") in (None, "fixed_small", "fixed_small_log", "learned_range"),
            f"{name} variance_type {c.get('variance_type')!r} is not supported",
        )
        check(
            not c.get("rescale_betas_zero_snr"),
            "rescale_betas_zero_snr (zero terminal SNR) is not supported: its last timestep has infinite sigma",
        )
    if name in _KARRAS_SIGMAS:
        for k in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            check(not c.get(k), f"{name} {k} is not supported; use use_karras_sigmas or the default sigmas")
    if name == "DPMSolverMultistepScheduler":
        check(
            c.get("algorithm_type", "dpmsolver++") == "dpmsolver++" and c.get("solver_order", 2) == 2,
            "DPMSolverMultistepScheduler: only algorithm_type dpmsolver++ with solver_order 2 (= dpmpp_2m)",
        )


def pipeline_sigmas(den: Any, steps: int, *, mu: float | None = None) -> torch.Tensor:
    """The EDM sigmas (then the last one) of the folder's scheduler for ``steps`` steps (see the module docstring);
    ``den``: a DiffusersDenoiser (its ``config`` and ``grid``) or a flow model's scheduler config with ``mu``."""
    config = den if isinstance(den, dict) else den.config
    name = class_name(config)
    check_config(config)
    if name == "FlowMatchEulerDiscreteScheduler":
        return flow.flow_sigmas(config, steps, mu=mu)
    c = dict(config)
    if name in _DISCRETE:
        return den.sigmas(steps, c.get("timestep_spacing", "leading"), offset=int(c.get("steps_offset", 0)))
    import diffusers

    try:
        sched = getattr(diffusers, name).from_config({k: v for k, v in c.items() if not k.startswith("_")})
        sched.set_timesteps(steps)
    except (NotImplementedError, ValueError) as e:
        raise GuidelabError(f"unsupported {name} config: {e}") from None
    sig = sched.sigmas.double()
    if name == "HeunDiscreteScheduler":  # it repeats each inner sigma for its two stages
        sig = torch.cat([sig[:1], sig[1:-1:2], sig[-1:]])
    return sig


def start(den: Any, sigmas: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The EDM-space start from the pipeline's unit-Gaussian ``latents`` as its scheduler scales them
    (``init_noise_sigma``): DDIM / DDPM / PNDM / DPM-Solver ``x_VP = latents``; Euler-type schedulers ``sigma_max``
    for "linspace" / "trailing" spacing, ``sqrt(1 + sigma_max^2)`` otherwise (diffusers' rule); flow
    ``x_t = latents``."""
    c, s0 = dict(den if isinstance(den, dict) else den.config), sigmas[0].to(torch.float64)
    name = class_name(c)
    if name == "FlowMatchEulerDiscreteScheduler":
        scale = 1 + s0
    elif name in (*_DISCRETE, "DPMSolverMultistepScheduler") or c.get("timestep_spacing", "linspace") not in (
        "linspace",
        "trailing",
    ):  # DPM-Solver works on VP samples: init_noise_sigma 1
        scale = (1 + s0**2).sqrt()
    else:
        scale = s0
    return latents * scale.to(latents)


def final_sigma(den: Any) -> float:
    """Where the scheduler's last step lands: ``sigma_0`` for DDIM / PNDM with ``set_alpha_to_one=False``, else 0."""
    c = dict(den.config)
    if class_name(c) in ("DDIMScheduler", "PNDMScheduler") and not c.get("set_alpha_to_one", True):
        return float(den.grid[0])
    return 0.0


def sample(
    sampler: str, den: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor, *, final: float = 0.0, **kw: Any
) -> torch.Tensor:
    """``samplers.get(sampler)(den, x, sigmas, **kw)`` (``"plms"``: :func:`plms`); with ``final > 0`` the last step
    is DDIM's step to ``final`` instead of 0: ``x_f = D + (final / sigma_last)(x_last - D)`` from the last step's x
    and D (no extra network call)."""
    from ... import samplers

    if sampler == "plms":
        return plms(den, x, sigmas, final=final, **kw)
    run = samplers.get(sampler)
    if final == 0:
        return run(den, x, sigmas, **kw)
    check(
        sampler == "ddim" and not kw.get("eta"),
        f"a last step to sigma {final:g} (set_alpha_to_one=False) is "
        f"DDIM's deterministic step: use sampler 'ddim' (eta 0), not {sampler!r}",
    )
    last: dict = {}
    user = kw.pop("callback", None)

    def callback(info: dict[str, Any]) -> None:
        last.update(info)
        if user is not None:
            user(info)

    run(den, x, sigmas, callback=callback, **kw)
    D, s = last["denoised"], float(last["sigma"])
    return D + (final / s) * (last["x"] - D)


class SchedulerX0(Guider):
    """The (guided) denoiser ``den`` with the scheduler's x0 treatment, applied to the guided x0 as the pipelines do:
    clamp to ``±clip`` (``clip_sample``) or dynamic thresholding (per sample ``s = quantile(|x0|, ratio)`` clamped
    to [1, max], ``x0 = clamp(x0, -s, s) / s``).

    ``ddim=True``: diffusers' DDIM steps with the clipped x0 but the *unclipped* eps, ``x' = D_c + r (x - D)``,
    ``r = sigma' / sigma``; returned as ``D_eff = (D_c - r D) / (1 - r)``, which the DDIM / Euler step turns into
    exactly that (``sigma'`` read from the run's grid; ``final``: the last step's target, see :func:`sample`).
    """

    name = "scheduler_x0"

    def __init__(
        self,
        den: Any,
        *,
        clip: float | None = None,
        ratio: float | None = None,
        max_value: float = 1.0,
        ddim: bool = False,
        final: float = 0.0,
    ) -> None:
        self.den, self.clip, self.ratio, self.max_value = den, clip, ratio, max_value
        self.ddim, self.final = ddim, final
        self.grid_next: dict[float, float] | None = None
        self.requires = getattr(den, "requires", frozenset())

    def __getattr__(self, name: str) -> Any:  # condition, model, ... of the denoiser
        if name == "den":
            raise AttributeError(name)
        return getattr(self.den, name)

    def start(self, run: Run) -> SchedulerX0:
        new = copy.copy(self)
        new.den = self.den.start(run) if isinstance(self.den, Guider) else self.den
        sig = [float(s) for s in run.sigmas]
        new.grid_next = {s: (self.final if k == len(sig) - 2 else sig[k + 1]) for k, s in enumerate(sig[:-1])}
        return new

    def treat(self, x0: torch.Tensor) -> torch.Tensor:
        if self.ratio is not None:
            a = x0.abs().reshape(x0.shape[0], -1).float()
            s = torch.quantile(a, self.ratio, dim=1).clamp(1, self.max_value).to(x0)
            s = s.reshape(-1, *[1] * (x0.ndim - 1))
            return torch.maximum(torch.minimum(x0, s), -s) / s
        return x0.clamp(-self.clip, self.clip)  # type: ignore[operator]  # clip is given whenever ratio is None

    def _out(self, D: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        D_c = self.treat(D)
        if not self.ddim:
            return D_c
        s = float(sigma.reshape(-1)[0])
        near = [g for g in (self.grid_next or {}) if abs(g - s) <= 1e-5 * g]
        check(bool(near), "the DDIM x0 treatment needs the run's grid: sample with a guidelab sampler on pipeline sigmas")
        assert self.grid_next is not None  # near is non-empty, so the grid is set
        r = self.grid_next[near[0]] / s
        return (D_c - r * D) / (1 - r)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self._out(self.den(x, sigma, **cond), sigma)

    def unguided(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        inner = self.den.unguided if isinstance(self.den, Guider) else self.den
        return self._out(inner(x, sigma, **cond), sigma)

    def pair(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        D, D_r = self.den.pair(x, sigma, **cond) if isinstance(self.den, Guider) else (self.den(x, sigma, **cond),) * 2
        return self._out(D, sigma), self._out(D_r, sigma)


def x0_wrapper(den: Any, base: Any = None) -> Any:
    """``den`` (a guided or plain denoiser of the DiffusersDenoiser ``base``, default ``den``) wrapped in
    :class:`SchedulerX0` when the folder's DDIM / DDPM scheduler clips or thresholds x0, else ``den`` itself."""
    base = den if base is None else base
    c = dict(base.config)
    name = class_name(c)
    if name not in ("DDIMScheduler", "DDPMScheduler"):
        return den
    ddim, final = name == "DDIMScheduler", final_sigma(base)
    if c.get("thresholding"):
        ratio, top = float(c.get("dynamic_thresholding_ratio", 0.995)), float(c.get("sample_max_value", 1.0))
        return SchedulerX0(den, ratio=ratio, max_value=top, ddim=ddim, final=final)
    if c.get("clip_sample", True):
        return SchedulerX0(den, clip=float(c.get("clip_sample_range", 1.0)), ddim=ddim, final=final)
    return den
