"""Score-SDE imputation and colourisation: known part equal to the observation, samples toward the exact
posterior, NFE (1 + corrector steps) per step, misuse refused."""

import pytest
import torch
from inverse_worlds import SIGMAS

from guidelab import inverse, toy
from guidelab.errors import GuidelabError
from guidelab.inverse import Grayscale, score_sde_colorize, score_sde_impute
from guidelab.rng import SampleNoise


def test_imputes_toward_the_exact_posterior_and_counts_nfe(mask_task, unguided):
    base_lp, base_err = mask_task.score(unguided)
    x, noise = mask_task.start()
    D = inverse.Counting(mask_task.prior)
    out = score_sde_impute(D, x, SIGMAS, mask_task.op, mask_task.y, corrector_steps=1, noise=noise)
    assert torch.equal(out[:, 0], torch.full((len(out),), 0.3))
    lp, err = mask_task.score(out)
    assert err == 0.0 < base_err and lp > base_lp + 5
    assert D.nfe == 2 * (len(SIGMAS) - 1)


def test_colorize_keeps_the_gray_value_and_follows_the_posterior(unguided):
    # the tree's two coordinates as the two "channels" of one pixel; gray = their mean
    prior, gray = toy.tree("A"), torch.tensor(0.45)
    op = Grayscale((2,), channel=0)
    post = toy.linear_posterior(prior, op.matrix().float(), gray.reshape(1), 0.0)
    noise = SampleNoise(range(len(unguided)))
    out = score_sde_colorize(prior, noise.randn([2]) * SIGMAS[0], SIGMAS, gray, noise=noise)
    torch.testing.assert_close(out.mean(1), gray.expand(len(out)), rtol=0, atol=1e-6)
    lp = float(post.logp(post.project(out)).median())
    assert lp > float(post.logp(post.project(unguided)).median()) + 5


def test_misuse_is_one_clear_error(mask_task):
    x, _ = mask_task.start(4)
    D, op, y = mask_task.prior, mask_task.op, mask_task.y
    cases = [
        (lambda: score_sde_impute(D, x, SIGMAS, op, y, corrector_steps=-1), "corrector_steps"),
        (lambda: score_sde_impute(D, x, SIGMAS, op, y, snr=-0.1), "snr"),
        (lambda: score_sde_impute(D, x, SIGMAS, op, torch.tensor([float("inf")])), "NaN or inf"),
        (lambda: score_sde_impute(D, x, SIGMAS, inverse.Blur((1, 1, 2)), y), "needs a projection operator"),
        (lambda: score_sde_colorize(D, x, SIGMAS, torch.zeros(2), channel=3), "channel must index"),
    ]
    for make, message in cases:
        with pytest.raises(GuidelabError, match=message):
            make()
