import pytest
import torch

from guidelab import samplers, schedules, toy
from guidelab.errors import GuidelabError
from guidelab.guidance.tfg import PRESETS, tfg_sample
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
        out = tfg_sample(world, x, SIGMAS, log_p_a, preset=preset, rho=0.0, mu=0.0, gamma=0.0, n_recur=1,
                         noise=SampleNoise(range(32)))
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
    out = tfg_sample(world, x, SIGMAS, lambda y: -((y - c) ** 2).sum(1) / (2 * 0.3 ** 2), preset="dps", rho=0.05,
                     noise=SampleNoise(range(n)))
    assert float((out - c).norm(dim=1).median()) < 0.5 * float((base - c).norm(dim=1).median())


def test_per_sample_seeds_make_tfg_batch_size_invariant():
    world, x = toy.tree("AB"), _start(12, seed=2)
    full = tfg_sample(world, x, SIGMAS, log_p_a, preset="tfg", rho=0.02, mu=0.02,
                      noise=SampleNoise(range(12)))
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
    assert calls["D"] == steps * p["n_recur"]                            # n_recur NFE per step
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
        torch.testing.assert_close(got, s * len(s) / s.sum())           # rho_t = rho s_t N / sum(s): mean rho
    assert PRESETS["dps"]["rho_schedule"] == "constant" and "rho_schedule" not in PRESETS["tfg"]
