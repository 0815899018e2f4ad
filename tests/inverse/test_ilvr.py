"""ILVR: the low-pass of the result is exactly the reference's, range_t = all steps is unconditional
DDPM sampling bit for bit, samples move toward the exact posterior, misuse refused."""

import pytest
import torch
from inverse_worlds import SIGMAS

from guidelab import samplers, toy
from guidelab.errors import GuidelabError
from guidelab.inverse import Downsample, ilvr
from guidelab.rng import SampleNoise


def _image_world():
    """A 16-dimensional mixture viewed as 1 x 4 x 4 images (cheap and exact)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 16, generator=g, dtype=torch.float64) * 0.5
    B = torch.randn(4, 16, 3, generator=g, dtype=torch.float64) * 0.3
    Sigma = B @ B.transpose(1, 2) + 0.01 * torch.eye(16, dtype=torch.float64)
    return toy.GaussianMixture(torch.ones(4), mu, Sigma)


def test_applies_exactly_the_low_pass_of_the_reference():
    world = _image_world()
    ref = world.sample(1, generator=torch.Generator().manual_seed(1))[0]
    op = Downsample((1, 4, 4), 2)
    noise = SampleNoise(range(8))
    seen = []
    out = ilvr(
        world, noise.randn([16]) * SIGMAS[0], SIGMAS, ref, operator=op, noise=noise, callback=lambda d: seen.append(d["x"])
    )
    # after every conditioned step phi_N(x) is the reference's forward-noised low pass; at sigma 0, phi_N(ref)
    torch.testing.assert_close(op.project(out), op.project(ref.expand(8, 16)), rtol=0, atol=1e-6)
    # ... while the high frequencies are the model's own (they differ between samples)
    assert float((out - op.project(out)).std(0).mean()) > 0.01


def test_range_t_covering_every_step_is_unconditional_ddpm_bit_for_bit(mask_task):
    x, noise = mask_task.start(32)
    out = ilvr(mask_task.prior, x, SIGMAS, torch.tensor([0.3, 0.0]), operator=mask_task.op, range_t=len(SIGMAS) - 1, noise=noise)
    x, noise = mask_task.start(32)
    assert torch.equal(out, samplers.euler_ancestral(mask_task.prior, x, SIGMAS, noise=noise))


def test_moves_samples_toward_the_exact_posterior(mask_task, unguided):
    base_lp, base_err = mask_task.score(unguided)
    x, noise = mask_task.start()
    out = ilvr(mask_task.prior, x, SIGMAS, torch.tensor([0.3, 0.0]), operator=mask_task.op, noise=noise)
    lp, err = mask_task.score(out)
    assert err < 1e-6 < base_err and lp > base_lp + 5
    # leaving the last steps free gives the model the final word: consistency is no longer exact
    x, noise = mask_task.start()
    _, err_free = mask_task.score(
        ilvr(mask_task.prior, x, SIGMAS, torch.tensor([0.3, 0.0]), operator=mask_task.op, range_t=4, noise=noise)
    )
    assert 1e-6 < err_free < base_err


def test_misuse_is_one_clear_error(mask_task):
    x, _ = mask_task.start(4)
    D, ref = mask_task.prior, torch.tensor([0.3, 0.0])
    cases = [
        (lambda: ilvr(D, x, SIGMAS, ref), "exactly one of factor"),
        (lambda: ilvr(D, x, SIGMAS, ref, factor=2, operator=mask_task.op), "exactly one of factor"),
        (lambda: ilvr(D, x, SIGMAS, ref, factor=2), "Downsample needs samples of shape"),
        (lambda: ilvr(D, x, SIGMAS, torch.zeros(3), operator=mask_task.op), "ref must be shaped like one sample"),
        (lambda: ilvr(D, x, SIGMAS, torch.tensor([float("nan"), 0.0]), operator=mask_task.op), "NaN"),
        (lambda: ilvr(D, x, SIGMAS, ref, operator=mask_task.op, range_t=-1), "range_t must be an integer >= 0"),
        (lambda: ilvr(D, x, SIGMAS, ref, operator=mask_task.op, range_t=99), "at most the number of steps"),
    ]
    for make, message in cases:
        with pytest.raises(GuidelabError, match=message):
            make()
