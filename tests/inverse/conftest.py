"""The exact worlds the inverse-problem methods are scored on: the tree with one coordinate observed
(noise-free mask) and with a noisy projection; the exact posterior of each (toy.linear_posterior)."""

from dataclasses import dataclass

import pytest
import torch
from inverse_worlds import SIGMAS, N

from guidelab import inverse, samplers, toy
from guidelab.rng import SampleNoise


@dataclass
class Task:
    prior: object
    op: object
    y: torch.Tensor
    post: object

    def start(self, n=N, seed=0):
        noise = SampleNoise(range(seed, seed + n))
        return noise.randn([self.prior.dim]) * SIGMAS[0], noise

    def score(self, x):
        """(median exact posterior log-density of the samples' projections on the support, mean |A x - y|).

        The median: on the thin tree a few samples between branches sit hundreds of nats down and would
        decide a mean alone."""
        return float(self.post.logp(self.post.project(x)).median()), float(self.post.consistency(x).mean())


def _task(op, y, noise_std):
    prior = toy.tree("A")
    return Task(prior, op, y, toy.linear_posterior(prior, op.matrix().float(), y.flatten(), noise_std))


@pytest.fixture(scope="session")
def mask_task():
    """Observe x_1 = 0.3 exactly (inpainting / imputation of x_2)."""
    return _task(inverse.Mask(torch.tensor([True, False])), torch.tensor([0.3]), 0.0)


@pytest.fixture(scope="session")
def noisy_task():
    """Observe 0.6 x_1 + 0.8 x_2 = 0.5 with noise 0.05 (a noisy linear inverse problem)."""
    return _task(inverse.Matrix(torch.tensor([[0.6, 0.8]])), torch.tensor([0.5]), 0.05)


@pytest.fixture(scope="session")
def unguided(mask_task):
    """Unconditional DDPM sampling (euler_ancestral, eta = 1) from the same starts: the baseline."""
    x, noise = mask_task.start()
    return samplers.euler_ancestral(mask_task.prior, x, SIGMAS, noise=noise)
