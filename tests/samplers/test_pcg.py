"""PCG (Bradley & Nakkiran 2024): without corrector it is DDIM on the predictor's denoiser, bit for bit;
the corrector targets the gamma-powered distribution p(x|c)^gamma p(x)^(1-gamma): on the exact conditional
tree it lands closer to exact samples of that distribution (importance-resampled from exact conditional
samples) than CFG-DDIM at w = gamma or the unguided predictor do; misuse is refused."""

import pytest
import torch

from guidelab import guidance as G
from guidelab import samplers, schedules, toy
from guidelab.errors import GuidelabError
from guidelab.metrics import sliced_wasserstein
from guidelab.rng import SampleNoise

W = toy.conditional_tree(leak=0.2, dtype=torch.float64)
SIG = schedules.karras(16, 0.002, 5.0)
N, GAMMA = 512, 3.0
X = W.world(0).sample(N, 5.0, torch.Generator().manual_seed(4))
COND = {"label": torch.zeros(N, dtype=torch.long)}


def cond_only(x, sigma, **cond):
    return W(x, sigma, **cond)


def test_no_corrector_is_ddim_bit_for_bit():
    x, c = X[:32], {"label": torch.arange(32) % 2}
    pcg0 = samplers.pcg(G.cfg(W, 2.5), x.clone(), SIG, cond=c, corrector_steps=0)
    assert torch.equal(pcg0, samplers.ddim(cond_only, x.clone(), SIG, cond=c))  # predictor: the conditional
    guided0 = samplers.pcg(G.cfg(W, 2.5), x.clone(), SIG, cond=c, corrector_steps=0, predictor_weight=2.5)
    assert torch.equal(guided0, samplers.ddim(G.cfg(W, 2.5), x.clone(), SIG, cond=c))
    assert (pcg0 - guided0).abs().max() > 1e-3


def test_gamma_is_the_corrector_weight():
    x, c, noise = X[:32], {"label": torch.arange(32) % 2}, lambda: SampleNoise(range(32))
    a = samplers.pcg(G.cfg(W, 2.0), x.clone(), SIG, cond=c, gamma=GAMMA, noise=noise())
    assert torch.equal(a, samplers.pcg(G.cfg(W, GAMMA), x.clone(), SIG, cond=c, noise=noise()))
    # gamma = 1: Langevin on p(x|c) alone, the same as PCG on the conditional denoiser
    one = samplers.pcg(G.cfg(W, 2.0), x.clone(), SIG, cond=c, gamma=1.0, noise=noise())
    assert torch.allclose(one, samplers.pcg(cond_only, x.clone(), SIG, cond=c, noise=noise()), rtol=0, atol=1e-12)
    assert (one - a).abs().max() > 1e-3


def test_batch_invariant():
    g = G.cfg(W, GAMMA)
    big = samplers.pcg(g, X[:16].clone(), SIG, cond={"label": torch.zeros(16, dtype=torch.long)}, noise=SampleNoise(range(16)))
    small = samplers.pcg(g, X[5:9].clone(), SIG, cond={"label": torch.zeros(4, dtype=torch.long)}, noise=SampleNoise(range(5, 9)))
    assert torch.allclose(big[5:9], small, rtol=0, atol=1e-12)


def _target(seed):
    """Exact samples of p_gamma(x) ∝ p(x|c)^gamma p(x)^(1-gamma): sampling-importance-resampling from exact
    conditional samples, weights (p(x|c) / p(x))^(gamma - 1) (bounded: label 0 is 0.8 A + 0.2 B)."""
    g = torch.Generator().manual_seed(seed)
    c = W.world(0).sample(4000, 0.0, g)
    logw = (GAMMA - 1) * (W.world(0).logp(c) - W.world(2).logp(c))
    return c[torch.multinomial(torch.softmax(logw, 0), N, replacement=True, generator=g)]


def test_corrector_approaches_the_gamma_powered_distribution():
    """Measured (sliced W2, 512 samples, 16 steps, gamma = 3): exact-vs-exact 0.049, PCG K=1 0.096, K=2 0.092,
    K=6 0.088; CFG-DDIM at w = gamma 0.145, CFG-DDPM 0.125, the conditional alone 0.167."""
    targets = [_target(s) for s in (1, 2, 3)]

    def dist(y):
        return sum(sliced_wasserstein(y, t) for t in targets) / 3

    pcg = dist(samplers.pcg(G.cfg(W, GAMMA), X.clone(), SIG, cond=COND, corrector_steps=2, noise=SampleNoise(range(N))))
    cfg_ddim = dist(samplers.ddim(G.cfg(W, GAMMA), X.clone(), SIG, cond=COND))
    predictor = dist(samplers.ddim(cond_only, X.clone(), SIG, cond=COND))
    assert pcg < 0.75 * cfg_ddim and pcg < 0.6 * predictor, (pcg, cfg_ddim, predictor)


def test_misuse_is_refused():
    x = X[:4]
    with pytest.raises(GuidelabError, match="pcg with gamma=2.0 recombines the two branches of a linear guider"):
        samplers.pcg(cond_only, x.clone(), SIG, gamma=2.0)
    with pytest.raises(GuidelabError, match="predictor_weight"):
        samplers.pcg(G.rescale(G.cfg(W, 2.0)), x.clone(), SIG, cond={"label": 0}, predictor_weight=2.0)
    with pytest.raises(GuidelabError, match="corrector_steps must be an integer >= 0"):
        samplers.pcg(G.cfg(W, 2.0), x.clone(), SIG, corrector_steps=-1)
    with pytest.raises(GuidelabError, match="step_scale"):
        samplers.pcg(G.cfg(W, 2.0), x.clone(), SIG, step_scale=0.0)
    with pytest.raises(GuidelabError, match="cfgpp needs a sampler with the renoise step"):
        samplers.pcg(G.cfgpp(W, 0.6), x.clone(), SIG, cond={"label": 0})


def test_cli_sampler_pcg(tmp_path):
    """``guidelab sample --sampler pcg --guider cfg``: selected by name from the catalog, with the guider's
    weight as gamma; it differs from --sampler ddim on the same seeds."""
    from click.testing import CliRunner

    from guidelab.app import cli, jobs

    def sample(name):
        args = ["sample", "--samples", 8, "--shard-size", 8, "--steps", 6, "--sampler", name]
        args += ["--guider", "cfg", "--weight", 2, "--out", tmp_path / name, "--quiet"]
        r = CliRunner().invoke(cli.main, [str(a) for a in args])
        assert r.exit_code == 0, (r.output, r.exception)
        return jobs.load_shards(tmp_path / name)["samples"]

    a, b = sample("pcg"), sample("ddim")
    assert a.shape == b.shape and bool(torch.isfinite(torch.as_tensor(a)).all())
    assert float(torch.as_tensor(a - b).abs().max()) > 1e-3


@pytest.mark.slow
def test_pcg_at_2w_minus_1_is_cfg_ddpm_at_w():
    """Their theorem (SDE limit): CFG-DDPM at w = DDIM on the conditional + one Langevin step of size
    sigma^2 - sigma_next^2 on p_gamma with gamma = 2w - 1 -- our defaults. 64 steps, w = 2, 1,024 samples:
    PCG(2w - 1) is as far from CFG-DDPM as a second CFG-DDPM run with other seeds (sliced W2 0.031 vs 0.028),
    PCG(w) is not (0.080). ~80 s."""
    n, w = 1024, 2.0
    x = W.world(0).sample(n, 5.0, torch.Generator().manual_seed(4))
    x2 = W.world(0).sample(n, 5.0, torch.Generator().manual_seed(5))
    c = {"label": torch.zeros(n, dtype=torch.long)}
    sig = schedules.karras(64, 0.002, 5.0)
    ddpm = samplers.ddpm(G.cfg(W, w), x.clone(), sig, cond=c, noise=SampleNoise(range(n)))
    other = samplers.ddpm(G.cfg(W, w), x2.clone(), sig, cond=c, noise=SampleNoise(range(n, 2 * n)))
    floor = sliced_wasserstein(ddpm, other)
    pcg = samplers.pcg(G.cfg(W, 2 * w - 1), x.clone(), sig, cond=c, noise=SampleNoise(range(2 * n, 3 * n)))
    wrong = samplers.pcg(G.cfg(W, w), x.clone(), sig, cond=c, noise=SampleNoise(range(2 * n, 3 * n)))
    assert sliced_wasserstein(ddpm, pcg) < 1.3 * floor, (sliced_wasserstein(ddpm, pcg), floor)
    assert sliced_wasserstein(ddpm, wrong) > 2 * floor, (sliced_wasserstein(ddpm, wrong), floor)
