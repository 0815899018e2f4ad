"""RePaint: the resampling schedule of the official code, the known region equal to the observation,
samples moved toward the exact posterior, misuse refused."""

import itertools

import pytest
import torch
from inverse_worlds import SIGMAS

from guidelab import inverse
from guidelab.errors import GuidelabError
from guidelab.inverse import jump_schedule, repaint


def test_jump_schedule_length_and_walk_at_the_paper_defaults():
    s = jump_schedule(250, 10, 10)
    # 24 jump points (t = 0, 10, ..., 230), 9 jumps of 10 steps up and back down each
    assert len(s) == 1 + 250 + 2 * 24 * 9 * 10 == 4571
    assert s[0] == 0 and s[-1] == 250
    assert all(abs(b - a) == 1 for a, b in itertools.pairwise(s))
    assert sum(b > a for a, b in itertools.pairwise(s)) == 250 + 24 * 9 * 10 == 2410  # reverse steps = NFE
    assert jump_schedule(7, 1, 1) == list(range(8))


def test_jump_schedule_matches_the_official_walk_on_a_small_case():
    # get_schedule_jump(t_T=6, n_sample=1, jump_length=2, jump_n_sample=2), written out by hand:
    # times 5 4 3 2 1 0 1 2 1 0 -1  ... with jumps at t = 0 and t = 2 (range(0, 4, 2)), one each
    times = [5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    assert jump_schedule(6, 2, 2) == [6 - 1 - t for t in times]


def test_known_region_is_the_observation_and_nfe_is_counted(mask_task):
    x, noise = mask_task.start(64)
    D = inverse.Counting(mask_task.prior)
    out = repaint(D, x, SIGMAS, mask_task.op, mask_task.y, jump_length=4, jump_n_sample=3, noise=noise)
    assert torch.equal(out[:, 0], torch.full((64,), 0.3))
    n = len(SIGMAS) - 1
    s = jump_schedule(n, 4, 3)
    assert D.nfe == sum(b > a for a, b in itertools.pairwise(s)) == n + len(range(0, n - 4, 4)) * 2 * 4


def test_moves_samples_toward_the_exact_posterior(mask_task, unguided):
    base_lp, base_err = mask_task.score(unguided)
    x, noise = mask_task.start()
    lp1, err1 = mask_task.score(
        repaint(mask_task.prior, x, SIGMAS, mask_task.op, mask_task.y, jump_length=1, jump_n_sample=1, noise=noise)
    )
    x, noise = mask_task.start()
    lp4, err4 = mask_task.score(
        repaint(mask_task.prior, x, SIGMAS, mask_task.op, mask_task.y, jump_length=4, jump_n_sample=4, noise=noise)
    )
    assert err1 == err4 == 0.0 < base_err
    assert lp1 > base_lp + 5
    assert lp4 > lp1  # resampling harmonises further (RePaint Sec. 4.2)


def test_per_sample_seeds_make_it_batch_size_invariant(mask_task):
    x, noise = mask_task.start(12)
    full = repaint(mask_task.prior, x, SIGMAS, mask_task.op, mask_task.y, jump_length=3, jump_n_sample=2, noise=noise)
    xp, noise_p = mask_task.start(5, seed=4)
    part = repaint(mask_task.prior, xp, SIGMAS, mask_task.op, mask_task.y, jump_length=3, jump_n_sample=2, noise=noise_p)
    assert torch.equal(full[4:9], part)


def test_misuse_is_one_clear_error(mask_task):
    x, _ = mask_task.start(4)
    D, op, y = mask_task.prior, mask_task.op, mask_task.y
    cases = [
        (lambda: repaint(D, x, SIGMAS, inverse.Mask(torch.tensor([True, False, True])), torch.zeros(2)), "built for samples"),
        (lambda: repaint(D, x, SIGMAS, op, torch.tensor([float("nan")])), "NaN"),
        (lambda: repaint(D, x, SIGMAS, op, torch.zeros(3)), "observation y must have shape"),
        (lambda: repaint(D, x, SIGMAS, op, y, jump_length=0), "jump_length must be an integer >= 1"),
        (lambda: repaint(D, x, SIGMAS, op, y, jump_n_sample=0), "jump_n_sample must be an integer >= 1"),
        (lambda: repaint(D, x, SIGMAS, op, y, jump_length=24, jump_n_sample=2), "smaller than the number of steps"),
        (lambda: repaint(D, x, SIGMAS, inverse.Blur((1, 1, 2)), y), "needs a projection operator"),
        (lambda: repaint(D, x, SIGMAS, torch.eye(2), y), "must be a guidelab.inverse operator"),
    ]
    for make, message in cases:
        with pytest.raises(GuidelabError, match=message):
            make()
