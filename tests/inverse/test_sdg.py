"""The SDG energy guider: classifier guidance is one instance of it (bit for bit), with the exact
classifier at w = 2 it is the exact class-conditional denoiser, Guided-TTS's norm scaling, user and
reference energies pull samples, misuse refused."""

import pytest
import torch
from inverse_worlds import SIGMAS

from guidelab import guidance, samplers, toy
from guidelab.errors import GuidelabError
from guidelab.guidance.classifier import class_log_prob_grad
from guidelab.inverse import class_energy, energy, guided_tts, reference_energy
from guidelab.models.classifier import tree_classifier
from guidelab.rng import SampleNoise


def _points(n=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=dtype) * 0.5 + 0.3, torch.rand(n, generator=g, dtype=dtype) * 2 + 0.05


def test_classifier_guidance_is_the_class_energy_bit_for_bit():
    world, clf = toy.tree("AB"), tree_classifier()
    x, sigma = _points()
    label = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
    for w in (1.0, 2.5, torch.linspace(0.5, 3.0, 64)):
        ours = energy(world, class_energy(clf), w, keys=("label",))(x, sigma, label=label)
        theirs = guidance.classifier(world, clf, w)(x, sigma, label=label)
        assert torch.equal(ours, theirs)


def test_exact_energy_at_w2_is_the_exact_conditional_denoiser():
    # Bayes: grad log p(x | A; sigma) = grad log p(x; sigma) + grad log p(A | x; sigma)
    x, sigma = _points(dtype=torch.float64)
    guided = energy(toy.tree("AB", dtype=torch.float64), class_energy(tree_classifier(dtype=torch.float64)), 2.0, keys=("label",))
    torch.testing.assert_close(
        guided(x, sigma, label=0), toy.tree("A", dtype=torch.float64).denoise(x, sigma), rtol=1e-6, atol=1e-8
    )


def test_guided_tts_scales_the_gradient_to_the_score_norm():
    world, clf = toy.tree("AB"), tree_classifier()
    x, sigma = _points()
    D = world(x, sigma)
    out = guided_tts(world, clf, 1.3)(x, sigma, label=0)
    # |D~ - D| = s sigma^2 |score| = s |D - x|, whatever the classifier gradient's own size (a saturated
    # classifier with an exactly zero gradient adds nothing)
    g = class_log_prob_grad(clf, x, sigma, 0)
    expected = torch.where(g.norm(dim=1) > 0, 0.3 * (D - x).norm(dim=1), 0.0)
    assert bool((g.norm(dim=1) > 0).float().mean() > 0.9)
    torch.testing.assert_close((out - D).norm(dim=1), expected, rtol=1e-4, atol=1e-6)


def test_user_and_reference_energies_pull_samples():
    world, n = toy.tree("AB"), 128
    c = torch.tensor([0.6, 0.9])
    noise = SampleNoise(range(n))
    x0 = noise.randn([2]) * SIGMAS[0]
    base = samplers.euler_ancestral(world, x0, SIGMAS, noise=SampleNoise(range(n)))
    user = energy(world, lambda x, sigma: -(x - c).square().sum(1) / (2 * (0.3**2 + sigma**2)), 2.0)
    out = samplers.euler_ancestral(user, x0, SIGMAS, noise=SampleNoise(range(n)))
    assert float((out - c).norm(dim=1).median()) < 0.6 * float((base - c).norm(dim=1).median())
    # SDG image-content energy with an identity "encoder": cosine similarity to the reference direction
    ref = torch.tensor([-0.8, -0.6])
    sim = energy(world, reference_energy(lambda x, sigma: x, ref), 3.0)
    out = samplers.euler_ancestral(sim, x0, SIGMAS, noise=SampleNoise(range(n)))
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(out, ref.expand_as(out)).mean()) > float(cos(base, ref.expand_as(base)).mean()) + 0.2


def test_misuse_is_one_clear_error():
    world, x, sigma = toy.tree("AB"), *_points(4)
    cases = [
        (lambda: energy(world, "F", 2.0), "must be a callable"),
        (lambda: energy(world, lambda x, s: x.sum(1), float("nan")), "finite"),
        (lambda: energy(world, lambda x, s: x.sum(1), 2.0, norm="l2"), "unknown norm"),
        (lambda: energy(world, class_energy(tree_classifier()), 2.0, keys=("label",))(x, sigma), "needs cond\\['label'\\]"),
        (lambda: energy(world, lambda x, s: x, 2.0)(x, sigma), "one value per sample"),
        (lambda: energy(world, class_energy(tree_classifier()), 2.0, keys=("label",))(x, sigma, label=5), "class label"),
    ]
    for make, message in cases:
        with pytest.raises(GuidelabError, match=message):
            make()
