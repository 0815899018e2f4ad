"""DPM-Solver-v3: with l = 1, s = 0, b = 0 it is DPM-Solver++ multistep of the same order; on a Gaussian
world (D linear in x: f = (1 - l) x - D does not depend on x, so g is constant) its statistics are the
analytic ones and its first steps are near-exact where DPM-Solver++ is far off; its measured order on
the tree world reaches the claimed 3; the statistics round-trip through their file; bad input is refused."""

import math

import pytest
import torch

from guidelab import samplers, schedules
from guidelab.errors import GuidelabError
from guidelab.samplers import EMS, compute_ems, dpm_solver_v3, world_ems

MU = torch.tensor([0.3, -0.7], dtype=torch.float64)
SD = torch.tensor([0.5, 0.1], dtype=torch.float64)
SMIN, SMAX = 0.002, 80.0


def gaussian(x, sigma):
    s2 = sigma[:, None] ** 2
    return (x * SD**2 + MU * s2) / (SD**2 + s2)


def pf_ode(x, s0, s1):
    """Exact PF-ODE flow of the Gaussian world: (x - mu) / sqrt(sd^2 + sigma^2) is constant."""
    return MU + (x - MU) * ((SD**2 + s1**2) / (SD**2 + s0**2)).sqrt()


@pytest.fixture(scope="module")
def gauss_ems():
    data = MU + SD * torch.randn(512, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return compute_ems(gaussian, data, SMIN, SMAX, steps=64)


X0 = MU + torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (SD**2 + SMAX**2) ** 0.5


def last_nonzero(sampler, den, x, sigmas, **kw):
    out = {}
    sampler(den, x.clone(), sigmas, callback=lambda d: out.__setitem__(d["i"], d["x"]), **kw)
    return out[len(sigmas) - 2]


def dpmpp_3m_reference(den, x, sigmas):
    """DPM-Solver++(3M) in the form of LuChengTHU/dpm-solver's multistep_dpm_solver_third_update (data
    prediction, EDM coordinates), written out here independently, lower orders while the history fills up --
    with the second-derivative term at its Taylor weight ``-2 phi_3 D2``: the official ``-phi_3 D2`` is half
    of it (D2 estimates h^2 D''/2), which is why k-diffusion's copy (dpmpp_3m_sde) measures order 2."""
    sig = sigmas.tolist()
    lam = [-math.log(s) for s in sig[:-1]]
    hist = []
    for i in range(len(sig) - 1):
        D = den(x, torch.full((x.shape[0],), sig[i], dtype=x.dtype))
        hist.append(D)
        if sig[i + 1] == 0:
            return D
        h = math.log(sig[i]) - math.log(sig[i + 1])
        phi_1 = math.expm1(-h)
        x_new = (sig[i + 1] / sig[i]) * x - phi_1 * D
        if i >= 1:
            h_0 = lam[i] - lam[i - 1]
            r0 = h_0 / h
            D1_0 = (D - hist[-2]) / r0
            if i >= 2:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                D1_1 = (hist[-2] - hist[-3]) / r1
                D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
                D2 = (D1_0 - D1_1) / (r0 + r1)
                phi_2 = phi_1 / h + 1
                x_new = x_new + phi_2 * D1 - 2 * (phi_2 / h - 0.5) * D2
            else:
                phi_2 = phi_1 / h + 1
                x_new = x_new + phi_2 * D1_0
        x = x_new
    return x


@pytest.mark.parametrize("steps", [4, 10])
def test_degenerate_statistics_are_dpm_solver_pp(tree_a64, steps):
    x = tree_a64.sample(16, 5.0, torch.Generator().manual_seed(0))
    sig = schedules.karras(steps, 0.002, 5.0)
    kw = dict(ems=EMS.degenerate(), corrector=False, pseudo=False, lower_order_final=False)
    v3_2 = dpm_solver_v3(tree_a64, x.clone(), sig, order=2, **kw)
    pp_2 = samplers.dpmpp_2m_sde(tree_a64, x.clone(), sig, eta=0.0, solver_type="heun")
    assert (v3_2 - pp_2).abs().max() < 1e-12
    v3_3 = dpm_solver_v3(tree_a64, x.clone(), sig, order=3, **kw)
    assert (v3_3 - dpmpp_3m_reference(tree_a64, x.clone(), sig)).abs().max() < 1e-12
    # the pseudo-order predictor is the same at order 2 (one divided difference is the derivative estimate)
    assert (dpm_solver_v3(tree_a64, x.clone(), sig, order=2, **{**kw, "pseudo": True}) - pp_2).abs().max() < 1e-12
    # ... and the comparison can fail: third order differs from second
    assert (v3_3 - v3_2).abs().max() > 1e-4
    assert torch.equal(v3_3, dpm_solver_v3(tree_a64, x.clone(), sig, order=3, **{**kw, "ems": "degenerate"}))  # by name


def test_gaussian_statistics_are_analytic(gauss_ems):
    s2 = torch.exp(-2 * gauss_ems.lambdas)[:, None]
    assert (gauss_ems.l - s2 / (SD**2 + s2)).abs().max() < 1e-8  # l = 1 - dD/dx
    assert gauss_ems.s.abs().max() == 0  # f has no spread: no slope to fit
    # Rademacher probes (the estimator for large samples) are exact for a diagonal Jacobian
    data = MU + SD * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probed = compute_ems(gaussian, data, SMIN, SMAX, steps=8, probes=2)
    s2_8 = torch.exp(-2 * probed.lambdas)[:, None]
    assert probed.meta["diag"] == "rademacher x2" and (probed.l - s2_8 / (SD**2 + s2_8)).abs().max() < 1e-8
    f_prime = 2 * MU * s2 * SD**2 / (SD**2 + s2) ** 2  # d/dlambda of f = -mu sigma^2 / (sd^2 + sigma^2)
    assert (gauss_ems.b - f_prime).abs().max() < 1e-2 * f_prime.abs().max()  # l' from the grid: ~1% at the peak


@pytest.mark.parametrize("steps", [2, 3, 5])
def test_statistics_make_a_gaussian_world_near_exact(gauss_ems, steps):
    sig = schedules.karras(steps, SMIN, SMAX)
    target = pf_ode(X0, SMAX, float(sig[-2]))
    err_v3 = (last_nonzero(dpm_solver_v3, gaussian, X0, sig, ems=gauss_ems) - target).abs().max()
    err_pp = (last_nonzero(samplers.dpmpp_2m, gaussian, X0, sig) - target).abs().max()
    err_deg = (last_nonzero(dpm_solver_v3, gaussian, X0, sig, ems=EMS.degenerate()) - target).abs().max()
    assert err_v3 < 0.1 * min(err_pp, err_deg), (err_v3, err_pp, err_deg)


def test_one_nfe_per_step_and_defaults(gauss_ems):
    calls = []

    def counted(x, s):
        calls.append(float(s[0]))
        return gaussian(x, s)

    sig = schedules.karras(7, SMIN, SMAX)
    dpm_solver_v3(counted, X0.clone(), sig, ems=gauss_ems)
    assert len(calls) == 7
    # defaults as the official scripts: corrector for <= 6 steps to sigma > 0, pseudo-order for <= 5
    for steps in (5, 6, 7, 8):
        sig = schedules.karras(steps, SMIN, SMAX)
        base = dpm_solver_v3(gaussian, X0.clone(), sig, ems=gauss_ems)
        explicit = dpm_solver_v3(gaussian, X0.clone(), sig, ems=gauss_ems, corrector=steps - 1 <= 6, pseudo=steps - 1 <= 5)
        assert torch.equal(base, explicit)


@pytest.mark.slow
def test_convergence_order_on_the_tree(tree_a64):
    """Error at sigma_min against a fine UniPC-3 reference, N = 16..128 steps (as test_convergence.py):
    the last halving reaches the claimed order 3 (measured 3.45 predictor only, 4.25 with the corrector)."""
    smin, smax, ns = 0.02, 5.0, (32, 64, 128)
    x = tree_a64.sample(16, smax, torch.Generator().manual_seed(0))
    ems = world_ems(tree_a64, smin, smax, n=64, steps=16)
    ref = last_nonzero(samplers.unipc, tree_a64, x, schedules.karras(1024, smin, smax), order=3)
    for corrector in (False, True):
        errs = [
            (
                last_nonzero(
                    dpm_solver_v3,
                    tree_a64,
                    x,
                    schedules.karras(n, smin, smax),
                    ems=ems,
                    corrector=corrector,
                    pseudo=False,
                    lower_order_final=False,
                )
                - ref
            )
            .norm(dim=1)
            .mean()
            .item()
            for n in ns
        ]
        order = math.log2(errs[-2] / errs[-1])
        assert order > 2.7, (corrector, errs)
        assert errs[-1] < errs[0]


def test_file_round_trip(gauss_ems, tmp_path):
    path = gauss_ems.save(tmp_path / "m.ems.safetensors")
    back = EMS.load(path)
    for k in ("lambdas", "l", "s", "b"):
        assert torch.equal(getattr(back, k), getattr(gauss_ems, k))
    assert back.meta == gauss_ems.meta and back.meta["steps"] == 64
    sig = schedules.karras(6, SMIN, SMAX)
    a = dpm_solver_v3(gaussian, X0.clone(), sig, ems=gauss_ems)
    assert torch.equal(a, dpm_solver_v3(gaussian, X0.clone(), sig, ems=str(path)))  # a path works too (CLI options)


def test_bad_input_is_refused(gauss_ems, tmp_path):
    sig = schedules.karras(6, SMIN, SMAX)
    with pytest.raises(GuidelabError, match="needs the model's empirical model statistics"):
        dpm_solver_v3(gaussian, X0.clone(), sig)
    with pytest.raises(GuidelabError, match=r"samples of shape \[2\], x has samples of shape \[3\]"):
        dpm_solver_v3(lambda x, s: x, torch.zeros(4, 3, dtype=torch.float64), sig, ems=gauss_ems)
    with pytest.raises(GuidelabError, match="EMS cover"):
        dpm_solver_v3(gaussian, X0.clone(), schedules.karras(6, SMIN, 200.0), ems=gauss_ems)
    bad_l = gauss_ems.l.clone()
    bad_l[3, 1] = float("nan")
    with pytest.raises(GuidelabError, match="EMS l contains NaN"):
        EMS(gauss_ems.lambdas, bad_l, gauss_ems.s, gauss_ems.b)
    with pytest.raises(GuidelabError, match="one shape"):
        EMS(gauss_ems.lambdas, gauss_ems.l, gauss_ems.s[:, :1], gauss_ems.b)
    with pytest.raises(GuidelabError, match=r"\[K\+1=65"):
        EMS(gauss_ems.lambdas, gauss_ems.l[1:], gauss_ems.s[1:], gauss_ems.b[1:])
    with pytest.raises(GuidelabError, match="strictly increasing"):
        EMS(gauss_ems.lambdas.flip(0), gauss_ems.l, gauss_ems.s, gauss_ems.b)
    with pytest.raises(GuidelabError, match="order must be"):
        dpm_solver_v3(gaussian, X0.clone(), sig, ems=gauss_ems, order=4)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(GuidelabError, match="not an EMS safetensors file"):
        EMS.load(tmp_path / "junk.safetensors")
    with pytest.raises(GuidelabError, match="does not exist"):
        EMS.load(tmp_path / "missing.safetensors")
    with pytest.raises(GuidelabError, match="data contains NaN"):
        compute_ems(gaussian, torch.full((4, 2), float("nan"), dtype=torch.float64), SMIN, SMAX)


def test_one_step_is_exact_when_g_is_quadratic():
    """The step's integrals with non-trivial l, s, b: for f built from a quadratic g (their eq. 9 inverted:
    f = e^{S - S_s}(g + B_s)), the order-3 update from three points equals a fine RK4 solution of
    dx/dlambda = -l x - f (1e-15 against 1,000 RK4 steps, RK4 error bound here); order 2 misses g's curvature."""
    from guidelab.samplers.dpm_solver_v3 import _b_integral, _update

    lam = torch.linspace(-1.0, 3.0, 17, dtype=torch.float64)
    l = (0.5 + 0.3 * torch.sin(lam))[:, None] * torch.tensor([1.0, 0.7], dtype=torch.float64)  # noqa: E741
    s = (0.4 * torch.cos(1.3 * lam))[:, None] * torch.tensor([1.0, -1.5], dtype=torch.float64)
    b = (0.2 + 0.1 * lam)[:, None] * torch.tensor([1.0, 2.0], dtype=torch.float64)
    ems = EMS(lam, l, s, b)
    lam_s, lam_t = 0.3, 0.9
    coef = torch.tensor([[0.5, -0.2], [0.3, 0.1], [-0.4, 0.25]], dtype=torch.float64)
    S_s = ems.integrals(torch.tensor([lam_s], dtype=torch.float64))[1][0]

    def f_of(q):
        S = ems.integrals(torch.tensor([q], dtype=torch.float64))[1][0]
        t = q - lam_s
        return torch.exp(S - S_s) * (coef[0] + coef[1] * t + coef[2] * t * t + _b_integral(ems, lam_s, S_s, q))

    def rhs(q, x):
        return -ems.stats(torch.tensor([q], dtype=torch.float64))[0][0] * x - f_of(q)

    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    x, q, m = x0.clone(), lam_s, 200
    h = (lam_t - lam_s) / m
    for _ in range(m):
        k1 = rhs(q, x)
        k2 = rhs(q + h / 2, x + h / 2 * k1)
        k3 = rhs(q + h / 2, x + h / 2 * k2)
        k4 = rhs(q + h, x + h * k3)
        x, q = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), q + h
    pts = [(v, f_of(v)[None]) for v in (lam_s, lam_s - 0.2, lam_s - 0.5)]
    assert (_update(ems, x0.clone(), pts, lam_t, 3, False, {}) - x).abs().max() < 1e-10  # RK4 error ~1e-12
    assert (_update(ems, x0.clone(), pts, lam_t, 3, True, {}) - x).abs().max() > 1e-4  # pseudo-order: not exact
    assert (_update(ems, x0.clone(), pts, lam_t, 2, False, {}) - x).abs().max() > 1e-2


def test_statistics_that_overflow_the_step_coefficients_are_one_clear_error():
    # s up to 1.4e5 (what a fit on a flat, untrained network can give) on a 4-step grid: e^S overflows; the
    # solver names the step and the statistics instead of returning NaN samples
    lam = torch.linspace(-math.log(80.0), -math.log(0.002), 33, dtype=torch.float64)
    ems = EMS(lam, torch.ones(33, 2), torch.full((33, 2), 1.4e5), torch.zeros(33, 2))
    calls = []
    with pytest.raises(GuidelabError, match=r"step coefficients from sigma 80 .* overflow"):
        dpm_solver_v3(lambda x, s: calls.append(1) or x * 0, torch.randn(4, 2) * 80, schedules.karras(4, 0.002, 80.0), ems=ems)
    assert len(calls) == 1  # refused at the first step's coefficients, nothing sampled past it
