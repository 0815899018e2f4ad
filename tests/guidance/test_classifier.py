import pytest
import torch

from guidelab import samplers, schedules, toy
from guidelab.errors import GuidelabError
from guidelab.guidance.classifier import classifier
from guidelab.models import registry
from guidelab.models.classifier import ToyClassifier, train_tree_classifier, tree_classifier


@pytest.fixture(scope="module")
def trained():
    return train_tree_classifier(steps=600, n_data=16384, seed=0)


def _fraction_a(x):
    """Fraction of samples whose exact posterior (at sigma ~ 0) says class A."""
    return float((tree_classifier().posterior(x, 0.002)[:, 0] > 0.5).float().mean())


def _sample(denoiser, label, n=256, seed=0):
    sigmas = schedules.karras(32, 0.002, 5, dtype=torch.float32)
    x = toy.tree("AB").sample(n, 5.0, generator=torch.Generator().manual_seed(seed))
    return samplers.euler(denoiser, x, sigmas, cond={"label": label})


def test_exact_classifier_at_w2_is_exact_conditional(tree_ab64):
    # Bayes: grad log p(x | A) = grad log p(x) + grad log p(A | x), so D_AB + sigma^2 grad log p(A | x) = D_A.
    clf = tree_classifier(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for s in (0.01, 0.3, 2.0):
        x = tree_ab64.sample(128, s, generator=g)
        sigma = torch.full((128,), s, dtype=torch.float64)
        for label, cls in ((0, "A"), (1, "B")):
            D = classifier(tree_ab64, clf, 2.0)(x, sigma, label=label)
            torch.testing.assert_close(D, toy.tree(cls, dtype=torch.float64)(x, sigma), rtol=0, atol=1e-9)


def test_w1_is_the_denoiser_bit_for_bit_and_label_is_dropped(tree_ab64):
    calls = []

    def clf(x, sigma):
        calls.append(1)
        return torch.zeros(x.shape[0], 2, dtype=x.dtype)

    def D(x, sigma, **cond):
        assert "label" not in cond
        return tree_ab64(x, sigma)

    x = tree_ab64.sample(16, 0.5, generator=torch.Generator().manual_seed(2))
    sigma = torch.full((16,), 0.5, dtype=torch.float64)
    assert torch.equal(classifier(D, clf, 1)(x, sigma, label=0), tree_ab64(x, sigma))
    assert not calls


def test_cost_one_nfe_and_one_classifier_pass_per_evaluation(tree_ab64):
    n_D, n_clf = [], []

    def D(x, sigma, **cond):
        n_D.append(x.shape[0])
        return tree_ab64(x, sigma)

    clf = tree_classifier(dtype=torch.float64)

    def counted(x, sigma):
        n_clf.append(x.shape[0])
        return clf(x, sigma)

    x = tree_ab64.sample(8, 1.0, generator=torch.Generator().manual_seed(3))
    classifier(D, counted, 3.0)(x, torch.ones(8, dtype=torch.float64), label=1)
    assert n_D == [8] and n_clf == [8]


def test_per_sample_weight_matches_scalar_weights(tree_ab64):
    clf = tree_classifier(dtype=torch.float64)
    x = tree_ab64.sample(6, 0.4, generator=torch.Generator().manual_seed(4))
    sigma = torch.full((6,), 0.4, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.5, 1.0, 2.0, 3.5], dtype=torch.float64)
    out = classifier(tree_ab64, clf, w)(x, sigma, label=0)
    for i, wi in enumerate(w.tolist()):
        ref = classifier(tree_ab64, clf, wi)(x[i : i + 1], sigma[i : i + 1], label=0)
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-12, atol=1e-12)


def test_trained_classifier_matches_the_exact_posterior(trained):
    exact = tree_classifier()
    g = torch.Generator().manual_seed(5)
    for s in (0.002, 0.05, 0.5, 3.0):
        x = toy.tree("AB").sample(2000, s, generator=g)
        p_exact = exact.posterior(x, s)[:, 0]
        p_net = trained(x, torch.tensor(s)).softmax(1)[:, 0]
        assert float((p_exact - p_net).abs().mean()) < 0.03, s


def test_guidance_raises_the_target_class_fraction(trained):
    clf_exact = tree_classifier()
    base = _fraction_a(_sample(classifier(toy.tree("AB"), clf_exact, 1.0), 0))
    assert 0.35 < base < 0.65  # unguided: the class prior (~0.5)
    assert _fraction_a(_sample(classifier(toy.tree("AB"), trained, 3.0), 0)) > 0.97
    assert _fraction_a(_sample(classifier(toy.tree("AB"), trained, 3.0), 1)) < 0.03


def test_toy_classifier_config_round_trip():
    m = ToyClassifier(hidden=16, depth=2)
    m2 = registry.build(registry.config(m))
    assert isinstance(m2, ToyClassifier) and m2.config() == m.config()
    assert m2(torch.zeros(3, 2), 0.5).shape == (3, 2)


def test_user_errors(tree_ab64):
    g = classifier(tree_ab64, tree_classifier(dtype=torch.float64), 2.0)
    x, sigma = torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    with pytest.raises(GuidelabError, match="label"):
        g(x, sigma)
    with pytest.raises(GuidelabError, match="lie in"):
        g(x, sigma, label=5)
    with pytest.raises(GuidelabError, match="weight"):
        classifier(tree_ab64, tree_classifier(), float("nan"))


def test_works_under_inference_mode(tree_ab64):
    clf = tree_classifier(dtype=torch.float64)
    x = tree_ab64.sample(4, 1.0, generator=torch.Generator().manual_seed(6))
    sigma = torch.ones(4, dtype=torch.float64)
    ref = classifier(tree_ab64, clf, 2.0)(x, sigma, label=torch.tensor([0, 1, 0, 1]))
    with torch.inference_mode():
        out = classifier(tree_ab64, clf, 2.0)(x.clone(), sigma.clone(), label=torch.tensor([0, 1, 0, 1]))
    assert torch.equal(out, ref)


def test_composes_with_interval(tree_ab64):
    from guidelab.guidance import interval

    g = interval(classifier(tree_ab64, tree_classifier(dtype=torch.float64), 2.0), 0.1, 1.0)
    x = tree_ab64.sample(4, 0.5, generator=torch.Generator().manual_seed(7))
    inside, outside = torch.full((4,), 0.5, dtype=torch.float64), torch.full((4,), 2.0, dtype=torch.float64)
    torch.testing.assert_close(g(x, inside, label=0), toy.tree("A", dtype=torch.float64)(x, inside), rtol=0, atol=1e-9)
    assert torch.equal(g(x, outside, label=0), tree_ab64(x, outside))


def test_trained_classifier_checkpoint_round_trip(trained, tmp_path):
    from guidelab.training.checkpoint import load_model, save_model

    loaded = load_model(save_model(tmp_path / "clf.safetensors", trained))
    x = toy.tree("AB").sample(16, 0.3, generator=torch.Generator().manual_seed(8))
    assert isinstance(loaded, ToyClassifier)
    assert torch.equal(loaded(x, 0.3), trained(x, 0.3))
