"""DPS: zeta = 0 is DDPM sampling bit for bit, the measurement gradient moves samples toward the exact
posterior of a noisy inverse problem, any differentiable A works, misuse refused."""

import pytest
import torch
from inverse_worlds import SIGMAS

from guidelab import inverse, samplers
from guidelab.errors import GuidelabError
from guidelab.guidance.tfg import measurement_objective, tfg_sample
from guidelab.inverse import dps


def test_zero_step_is_ddpm_bit_for_bit(noisy_task):
    x, noise = noisy_task.start(32)
    out = dps(noisy_task.prior, x, SIGMAS, noisy_task.op, noisy_task.y, zeta=0.0, noise=noise)
    x, noise = noisy_task.start(32)
    assert torch.equal(out, samplers.euler_ancestral(noisy_task.prior, x, SIGMAS, noise=noise))


def test_moves_samples_toward_the_exact_posterior_next_to_tfg(noisy_task, unguided):
    base_lp, base_err = noisy_task.score(unguided)
    x, noise = noisy_task.start()
    D = inverse.Counting(noisy_task.prior)
    lp, err = noisy_task.score(dps(D, x, SIGMAS, noisy_task.op, noisy_task.y, zeta=0.05, noise=noise))
    assert D.nfe == len(SIGMAS) - 1
    assert lp > base_lp + 1 and err < 0.5 * base_err
    # TFG's DPS analogue (official DPS objective |y - A x0|, TFG's step) lands in the same place
    x, noise = noisy_task.start()
    obj = measurement_objective(noisy_task.op.matrix().float(), noisy_task.y)
    lp_tfg, err_tfg = noisy_task.score(tfg_sample(noisy_task.prior, x, SIGMAS, obj, preset="dps", rho=0.05, noise=noise))
    assert lp_tfg > base_lp + 1 and err_tfg < 0.5 * base_err


def test_a_callable_non_linear_operator_is_accepted(noisy_task):
    x, noise = noisy_task.start(64)
    out = dps(
        noisy_task.prior, x, SIGMAS, lambda x0: x0.square().sum(1, keepdim=True), torch.tensor([0.5]), zeta=0.05, noise=noise
    )
    x, noise = noisy_task.start(64)
    base = samplers.euler_ancestral(noisy_task.prior, x, SIGMAS, noise=noise)
    assert float((out.square().sum(1) - 0.5).abs().mean()) < 0.7 * float((base.square().sum(1) - 0.5).abs().mean())


def test_misuse_is_one_clear_error(noisy_task):
    x, _ = noisy_task.start(4)
    D, op, y = noisy_task.prior, noisy_task.op, noisy_task.y
    cases = [
        (lambda: dps(D, x, SIGMAS, op, y, zeta=-1.0), "zeta"),
        (lambda: dps(D, x, SIGMAS, op, torch.tensor([float("nan")])), "NaN"),
        (lambda: dps(D, x, SIGMAS, op, torch.zeros(2, 2)), "observation y must have shape"),
        (lambda: dps(D, x, SIGMAS, "A", y), "operator must be"),
    ]
    for make, message in cases:
        with pytest.raises(GuidelabError, match=message):
            make()
