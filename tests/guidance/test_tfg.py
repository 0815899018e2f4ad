import pytest
import torch

from guidelab import samplers, schedules, toy
from guidelab.errors import GuidelabError
from guidelab.guidance.tfg import PRESETS, measurement_objective, tfg_sample
from guidelab.models.classifier import tree_classifier
from guidelab.rng import SampleNoise

SIGMAS = schedules.karras(32, 0.002, 5, dtype=torch.float32)


def log_p_a(x0):
    """Objective: log p(A | x0) of the exact classifier, read at sigma = 0.1 (a smooth 'clean' classifier)."""
    return tree_classifier()(x0, torch.full((x0.shape[0],), 0.1)).log_softmax(1)[:, 0]


def _fraction_a(x):
    return float((tree_classifier().posterior(x, 0.002)[:, 0] > 0.5).float().mean())


def _start(n, seed=0):
    return toy.tree("AB").sample(n, 5.0, generator=torch.Generator().manual_seed(seed))


def test_zero_strength_is_the_ancestral_sampler_bit_for_bit():
    world, x = toy.tree("AB"), _start(32)
    ref = samplers.euler_ancestral(world, x, SIGMAS, noise=SampleNoise(range(32)))
    for preset in PRESETS:
        out = tfg_sample(
            world, x, SIGMAS, log_p_a, preset=preset, rho=0.0, mu=0.0, gamma=0.0, n_recur=1, noise=SampleNoise(range(32))
        )
        assert torch.equal(out, ref), preset


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_raises_the_target_class_fraction(preset):
    world, n = toy.tree("AB"), 128
    x = _start(n)
    base = samplers.euler_ancestral(world, x, SIGMAS, noise=SampleNoise(range(n)))
    kw = {k: 0.02 for k in ("rho", "mu") if PRESETS[preset][k]}
    out = tfg_sample(world, x, SIGMAS, log_p_a, preset=preset, noise=SampleNoise(range(n)), **kw)
    assert _fraction_a(base) < 0.65
    assert _fraction_a(out) > 0.9
    # ... and the samples stay on the data: mean exact log-density within 0.5 nat of unguided sampling.
    assert float(world.logp(out).mean()) > float(world.logp(base).mean()) - 0.5


def test_user_energy_objective_pulls_samples_toward_the_target():
    # SDG-style energy guidance: log f(x0) = -|x0 - c|^2 / (2 tau^2).
    world, n, c = toy.tree("AB"), 128, torch.tensor([0.6, 0.9])
    x = _start(n, seed=1)
    base = samplers.euler_ancestral(world, x, SIGMAS, noise=SampleNoise(range(n)))
    out = tfg_sample(
        world, x, SIGMAS, lambda y: -((y - c) ** 2).sum(1) / (2 * 0.3**2), preset="dps", rho=0.05, noise=SampleNoise(range(n))
    )
    assert float((out - c).norm(dim=1).median()) < 0.5 * float((base - c).norm(dim=1).median())


def test_per_sample_seeds_make_tfg_batch_size_invariant():
    world, x = toy.tree("AB"), _start(12, seed=2)
    full = tfg_sample(world, x, SIGMAS, log_p_a, preset="tfg", rho=0.02, mu=0.02, noise=SampleNoise(range(12)))
    part = tfg_sample(world, x[4:9], SIGMAS, log_p_a, preset="tfg", rho=0.02, mu=0.02, noise=SampleNoise(range(4, 9)))
    assert torch.equal(full[4:9], part)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cost_per_step(preset):
    world, n = toy.tree("AB"), 4
    calls = {"D": 0, "f": 0}

    def D(x, sigma, **cond):
        calls["D"] += 1
        return world(x, sigma)

    def f(y):
        calls["f"] += 1
        return log_p_a(y)

    sigmas = schedules.karras(5, 0.01, 5, dtype=torch.float32)
    tfg_sample(D, _start(n), sigmas, f, preset=preset, noise=SampleNoise(range(n)))
    p = PRESETS[preset]
    steps = len(sigmas) - 1
    assert calls["D"] == steps * p["n_recur"]  # n_recur NFE per step
    eps = p["eps_bsz"] if p["gamma"] > 0 else 1
    per_recur = eps * ((p["rho"] != 0) + (p["mu"] != 0) * p["n_iter"])
    assert calls["f"] == steps * p["n_recur"] * per_recur


def test_user_errors():
    world, x = toy.tree("AB"), _start(2)
    with pytest.raises(GuidelabError, match="preset"):
        tfg_sample(world, x, SIGMAS, log_p_a, preset="nope")
    with pytest.raises(GuidelabError, match="n_recur"):
        tfg_sample(world, x, SIGMAS, log_p_a, n_recur=0)
    with pytest.raises(GuidelabError, match="shape"):
        tfg_sample(world, x, SIGMAS, lambda y: y, preset="dps")


def test_works_under_inference_mode_and_no_grad():
    world, x = toy.tree("AB"), _start(4, seed=3)
    sigmas = schedules.karras(4, 0.01, 5, dtype=torch.float32)
    ref = tfg_sample(world, x, sigmas, log_p_a, rho=0.02, mu=0.02, noise=SampleNoise(range(4)))
    with torch.inference_mode():
        out = tfg_sample(world, x.clone(), sigmas, log_p_a, rho=0.02, mu=0.02, noise=SampleNoise(range(4)))
    with torch.no_grad():
        out2 = tfg_sample(world, x, sigmas, log_p_a, rho=0.02, mu=0.02, noise=SampleNoise(range(4)))
    assert torch.equal(out, ref) and torch.equal(out2, ref)


def test_step_size_schedules_follow_the_official_code():
    from guidelab.guidance.tfg import _step_weights

    sig = SIGMAS.double().tolist()
    alpha = torch.tensor([(1 + b * b) / (1 + a * a) for a, b in zip(sig[:-1], sig[1:])], dtype=torch.float64)
    for kind, s in (("increase", alpha), ("decrease", 1 - alpha), ("constant", torch.ones_like(alpha))):
        got = torch.tensor(_step_weights(sig, kind), dtype=torch.float64)
        torch.testing.assert_close(got, s * len(s) / s.sum())  # rho_t = rho s_t N / sum(s): mean rho
    assert PRESETS["dps"]["rho_schedule"] == "constant" and "rho_schedule" not in PRESETS["tfg"]


# --- clip_x0 (official _predict_x0 clipping) ------------------------------------------------------------


def _bounded_world():
    """A 1-D world in [-1, 1] (the image range): two narrow modes at -0.8 and 0.8."""
    return toy.GaussianMixture([0.5, 0.5], [[-0.8], [0.8]], [[[0.01]], [[0.01]]])


def test_clip_x0_off_is_unchanged_and_a_range_containing_everything_is_bit_identical():
    world, x = toy.tree("AB"), _start(16, seed=4)
    run = lambda **kw: tfg_sample(
        world,
        x,
        SIGMAS,
        log_p_a,
        preset="tfg",
        rho=0.02,
        mu=0.02,  # noqa: E731
        noise=SampleNoise(range(16)),
        **kw,
    )
    ref = run()
    assert torch.equal(run(clip_x0=None), ref)
    assert torch.equal(run(clip_x0=1e6), ref)  # clamp in range: value and gradient exact
    assert torch.equal(run(clip_x0=(-1e6, 1e6)), ref)


def test_clip_x0_clips_the_estimate_the_step_uses():
    # rho = mu = 0: TFG is euler_ancestral, and with clipping it is euler_ancestral on the clamped denoiser.
    world, n = _bounded_world(), 64
    x = world.sample(n, 5.0, generator=torch.Generator().manual_seed(0))
    for clip, (lo, hi) in ((0.5, (-0.5, 0.5)), ((-0.2, 0.7), (-0.2, 0.7))):
        out = tfg_sample(world, x, SIGMAS, lambda y: y[:, 0], preset="dps", rho=0.0, clip_x0=clip, noise=SampleNoise(range(n)))
        ref = samplers.euler_ancestral(lambda x_, s: world(x_, s).clamp(lo, hi), x, SIGMAS, noise=SampleNoise(range(n)))
        assert torch.equal(out, ref)
        assert out.min() >= torch.tensor(lo).to(out) and out.max() <= torch.tensor(hi).to(out)


def test_clip_x0_stops_an_unbounded_objective_from_leaving_the_range():
    # log f = k x0 pushes right without limit; clipped, the gradient through the clamp vanishes once the
    # estimate saturates, so samples end within one last-step shift rho k (1 + sigma_min^2) D' of the bound.
    world, n, k, rho = _bounded_world(), 256, 3.0, 0.05
    x = world.sample(n, 5.0, generator=torch.Generator().manual_seed(0))
    f = lambda y: k * y[:, 0]
    free = tfg_sample(world, x, SIGMAS, f, preset="dps", rho=rho, noise=SampleNoise(range(n)))
    clipped = tfg_sample(world, x, SIGMAS, f, preset="dps", rho=rho, clip_x0=1.0, noise=SampleNoise(range(n)))
    assert float(free.max()) > 1 + 5 * rho * k  # unclipped: far outside the data range
    assert float(clipped.max()) <= 1 + 1.05 * rho * k  # D' <= 1 + o(1) at sigma_min for these modes
    assert float((clipped > 0).float().mean()) > 0.95  # ... and the guidance still works


def test_clip_x0_user_errors():
    world, x = toy.tree("AB"), _start(2)
    for bad in (0, -1.0, (1.0, -1.0), (0.0, float("nan")), "1", (1.0,), True):
        with pytest.raises(GuidelabError, match="clip_x0"):
            tfg_sample(world, x, SIGMAS, log_p_a, clip_x0=bad)


# --- DPS normalisation: measurement_objective ------------------------------------------------------------


def test_dps_step_is_the_gradient_of_the_residual_norm():
    """One DPS step on a linear denoiser D = k x and a linear A, against the gradient written out by hand.

    DPS (Chung et al. 2023, Alg. 1; official code): x' = DDIM(x) - zeta grad_x |y - A D(x)|; in TFG's EDM
    form the shift is rho (1 + sigma^2) grad_x log f with log f = -|r|, r = y - A k x, so
    grad_x log f = k A^T r / |r| (per sample).
    """
    g = torch.Generator().manual_seed(0)
    B, d, m, sigma, rho, sd = 6, 3, 2, 0.7, 0.3, 0.5
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, m, generator=g, dtype=torch.float64)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    k = sd**2 / (sd**2 + sigma**2)
    D = lambda x_, s: x_ * (sd**2 / (sd**2 + s[:, None] ** 2))  # exact denoiser of N(0, sd^2 I)
    sig = torch.tensor([sigma, 0.0], dtype=torch.float64)  # one step to sigma = 0: DDIM gives D
    r = y - (k * x) @ A.t()
    for kind, grad in (("dps", k * (r / r.norm(dim=1, keepdim=True)) @ A), ("gaussian", k * r @ A / 0.5**2)):
        obj = measurement_objective(A, y, kind=kind, sigma_y=0.5)
        out = tfg_sample(D, x, sig, obj, preset="dps", rho=rho, noise=SampleNoise(range(B)))
        torch.testing.assert_close(out, k * x + rho * (1 + sigma**2) * grad, rtol=1e-12, atol=1e-12)
    # a callable A and one measurement for the whole batch give the same objective
    obj_m = measurement_objective(A, y[0], kind="dps")
    obj_c = measurement_objective(lambda x0: x0 @ A.t(), y[0], kind="dps")
    torch.testing.assert_close(obj_m(x), -(y[0] - x @ A.t()).norm(dim=1))
    torch.testing.assert_close(obj_c(x), obj_m(x))


def test_dps_step_size_does_not_depend_on_the_residual_size():
    """The point of DPS's normalisation: the step is zeta times a unit-size direction, however far the
    measurement is; the squared-norm objective's step grows with the residual."""
    A = torch.eye(2, dtype=torch.float64)
    x = torch.zeros(1, 2, dtype=torch.float64)
    D = lambda x_, s: x_
    sig = torch.tensor([0.5, 0.0], dtype=torch.float64)
    steps = {}
    for kind in ("dps", "gaussian"):
        steps[kind] = [
            float(
                tfg_sample(
                    D,
                    x,
                    sig,
                    measurement_objective(A, torch.tensor([[c, 0.0]], dtype=torch.float64), kind=kind),
                    preset="dps",
                    rho=0.1,
                ).norm()
            )
            for c in (1.0, 10.0)
        ]
    assert steps["dps"][0] == pytest.approx(steps["dps"][1]) == pytest.approx(0.1 * 1.25)
    assert steps["gaussian"][1] == pytest.approx(10 * steps["gaussian"][0])


def test_measurement_objective_user_errors():
    with pytest.raises(GuidelabError, match="kind"):
        measurement_objective(torch.eye(2), torch.zeros(2), kind="l1")
    with pytest.raises(GuidelabError, match="sigma_y"):
        measurement_objective(torch.eye(2), torch.zeros(2), kind="gaussian", sigma_y=0)
    with pytest.raises(GuidelabError, match="matrix"):
        measurement_objective(torch.zeros(2, 2, 2), torch.zeros(2))
    with pytest.raises(GuidelabError, match="A\\(x0\\)"):
        measurement_objective(lambda x0: x0[0], torch.zeros(2))(torch.zeros(3, 2))
