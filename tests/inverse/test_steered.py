"""Steered Diffusion: scale 0 is DDIM(eta = 1) bit for bit, both modes move samples toward the exact
posterior, the loop costs n_iter NFE per step, misuse refused."""

import pytest
import torch
from inverse_worlds import SIGMAS

from guidelab import inverse, samplers
from guidelab.errors import GuidelabError
from guidelab.inverse import steered


def test_zero_scale_is_ddim_eta_one_bit_for_bit(mask_task):
    x, noise = mask_task.start(32)
    out = steered(mask_task.prior, x, SIGMAS, mask_task.op, mask_task.y, scale=0.0, noise=noise)
    x, noise = mask_task.start(32)
    assert torch.equal(out, samplers.ddim(mask_task.prior, x, SIGMAS, eta=1.0, noise=noise))


@pytest.mark.parametrize("mode,scale", [("projection", 1.0), ("gradient", 3.0)])
def test_moves_samples_toward_the_exact_posterior(mode, scale, mask_task, unguided):
    base_lp, base_err = mask_task.score(unguided)
    x, noise = mask_task.start()
    lp, err = mask_task.score(steered(mask_task.prior, x, SIGMAS, mask_task.op, mask_task.y, mode=mode, scale=scale, noise=noise))
    assert lp > base_lp + 5 and err < 0.5 * base_err
    if mode == "projection":
        assert err < 1e-6  # the final estimate is projected onto {A x = y}


def test_loop_costs_n_iter_evaluations_per_step(mask_task):
    x, noise = mask_task.start(8)
    D = inverse.Counting(mask_task.prior)
    steered(D, x, SIGMAS, mask_task.op, mask_task.y, mode="projection", n_iter=3, noise=noise)
    assert D.nfe == 3 * (len(SIGMAS) - 1)


def test_custom_loss_without_operator(mask_task, unguided):
    x, noise = mask_task.start()
    out = steered(mask_task.prior, x, SIGMAS, loss=lambda x0: (x0[:, 0] - 0.3).square(), scale=3.0, noise=noise)
    assert float((out[:, 0] - 0.3).abs().mean()) < 0.5 * float((unguided[:, 0] - 0.3).abs().mean())


def test_misuse_is_one_clear_error(mask_task):
    x, _ = mask_task.start(4)
    D, op, y = mask_task.prior, mask_task.op, mask_task.y
    cases = [
        (lambda: steered(D, x, SIGMAS, op, y, mode="bogus"), "unknown steered mode"),
        (lambda: steered(D, x, SIGMAS, inverse.Blur((1, 1, 2)), y, mode="projection"), "needs a projection operator"),
        (lambda: steered(D, x, SIGMAS, op, y, n_iter=0), "n_iter"),
        (lambda: steered(D, x, SIGMAS), "needs an operator and y, or a loss"),
        (lambda: steered(D, x, SIGMAS, op, torch.tensor([float("nan")])), "NaN"),
    ]
    for make, message in cases:
        with pytest.raises(GuidelabError, match=message):
            make()
