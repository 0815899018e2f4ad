"""What each sampler is and supports: NFE per step, order, stochasticity, reference and the sampler
features (``guidance.protocols``: a guider's ``requires``) it implements, e.g. ``"renoise"`` for CFG++."""

from __future__ import annotations

from typing import NamedTuple


class Info(NamedTuple):
    """``nfe``: network evaluations per step (the step to sigma = 0 may take fewer); ``order``: global
    order of the deterministic solver (0: not an ODE solver); ``stochastic``: draws noise by default;
    ``supports``: sampler features a guider may require (``guider.requires <= supports``)."""

    nfe: int
    order: int
    stochastic: bool
    reference: str
    supports: frozenset[str] = frozenset()


#: CFG++'s renoise step (data term from D_lam, direction / history terms from D_u).
RENOISE = frozenset({"renoise"})

INFO: dict[str, Info] = {
    "euler": Info(1, 1, False, "Karras et al. 2022, Alg. 2 (Euler)", RENOISE),
    "heun": Info(2, 2, False, "Karras et al. 2022, Alg. 2", RENOISE),
    "euler_ancestral": Info(1, 0, True, "k-diffusion sample_euler_ancestral", RENOISE),
    "dpm_2": Info(2, 2, False, "Lu et al. 2022 (DPM-Solver-2), k-diffusion sample_dpm_2"),
    "dpm_2_ancestral": Info(2, 0, True, "k-diffusion sample_dpm_2_ancestral"),
    "lms": Info(1, 4, False, "Adams-Bashforth, k-diffusion sample_lms"),
    "dpmpp_2s_ancestral": Info(2, 0, True, "Lu et al. 2022b (DPM-Solver++ 2S)", RENOISE),
    "dpmpp_2m": Info(1, 2, False, "Lu et al. 2022b (DPM-Solver++ 2M)", RENOISE),
    "dpmpp_2m_sde": Info(1, 0, True, "Lu et al. 2022b, k-diffusion sample_dpmpp_2m_sde"),
    "dpmpp_3m_sde": Info(1, 0, True, "k-diffusion sample_dpmpp_3m_sde"),
    "ddim": Info(1, 1, False, "Song et al. 2021 (DDIM), eta = 0 by default", RENOISE),
    "ddpm": Info(1, 0, True, "Ho et al. 2020 (DDPM ancestral)", RENOISE),
    "unipc": Info(1, 3, False, "Zhao et al. 2023 (UniPC-2 bh2 by default: order 3)"),
    "score_sde_pc": Info(2, 0, True, "Song et al. 2021 (PC sampler, 1 corrector step)"),
    "dpm_solver_v3": Info(1, 3, False, "Zheng et al. 2023 (DPM-Solver-v3; needs ems=, the model's statistics)"),
    "pcg": Info(2, 0, True, "Bradley & Nakkiran 2024 (PCG: DDIM predictor, 1 Langevin step on p_gamma)"),
    "meng_stochastic": Info(1, 0, True, "Meng et al. 2023 (distillation stage 2: 2-step DDIM, 1 step back)"),
}


def supporting(features: frozenset[str]) -> list[str]:
    """Names of the samplers that support all of ``features``, sorted."""
    return sorted(name for name, info in INFO.items() if features <= info.supports)
