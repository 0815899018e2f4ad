"""The declared guider contract: Guider subclasses, Condition / noise_embed_dim read from the denoiser, defaults."""

import pytest
import torch

from guidelab import guidance as G
from guidelab import samplers, schedules, toy
from guidelab.errors import GuidelabError
from guidelab.models import ToyMLP

W = toy.conditional_tree(dtype=torch.float64)


def _x(B=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 2, generator=g, dtype=torch.float64), torch.rand(B, generator=g, dtype=torch.float64) + 0.2


def test_every_guider_is_a_guider_with_an_unguided_branch():
    x, sigma = _x()
    label = torch.arange(6) % 2
    clf = lambda x, sigma: torch.stack([x[:, 0], -x[:, 0]], 1)  # noqa: E731
    guiders = [
        G.cfg(W, 2.0),
        G.autoguidance(W, toy.tree("AB", dtype=torch.float64), 2.0),
        G.icg(W, 2.0),
        G.cfgpp(W, 0.5),
        G.rescale(G.cfg(W, 2.0)),
        G.apg(G.cfg(W, 2.0)),
        G.cfg_zero_star(G.cfg(W, 2.0)),
        G.interval(G.cfg(W, 2.0), 0.1, 1.0),
        G.epsilon_scaling(G.cfg(W, 2.0), 1.01),
        G.compose(G.cfg(W, 2.0)),
        G.classifier(W, clf, 2.0, pass_label=True),
        G.OnePass(lambda x, sigma, **c: 2 * x, lambda x, sigma, **c: x, "student"),
    ]
    for g in guiders:
        assert isinstance(g, G.Guider), g
        u = g.unguided(x, sigma, label=label)
        assert u.shape == x.shape
    assert G.cfgpp(W, 0.5).requires == {"renoise"} and G.interval(G.cfgpp(W, 0.5), 0.1, 1.0).requires == {"renoise"}
    assert all(not g.requires for g in guiders if g.name != "cfgpp")


def test_one_pass_is_two_denoisers_and_works_inside_an_interval():
    at_w, plain = (lambda x, sigma: 2 * x), (lambda x, sigma: x)
    x, _ = _x()
    g = G.interval(G.OnePass(at_w, plain, "gft"), 0.5, 2.0)
    assert torch.equal(g(x, torch.full((6,), 1.0, dtype=torch.float64)), 2 * x)
    assert torch.equal(g(x, torch.full((6,), 3.0, dtype=torch.float64)), x)
    with pytest.raises(GuidelabError, match="two denoisers"):
        G.OnePass(at_w, None, "gft")


def test_cfg_and_icg_read_the_declared_condition():
    x, sigma = _x()
    label = torch.arange(6) % 2
    D_c, D_u = W(x, sigma, label), W(x, sigma, torch.full_like(label, 2))
    torch.testing.assert_close(G.cfg(W, 3.0)(x, sigma, label=label), D_u + 3.0 * (D_c - D_u))
    net = ToyMLP(num_classes=3, hidden=8, depth=1).double()
    assert dict(G.cfg(net, 2.0).ref.overrides) == {"label": 3}
    assert G.icg(net, 2.0).ref.overrides["label"].with_run  # a per-call draw over 3 classes
    with pytest.raises(GuidelabError, match="declares no condition"):
        G.cfg(lambda x, sigma, label: x, 2.0)

    class Text:
        """A continuous embedding (no classes declared): ICG defaults to the Gaussian reference."""

        condition = G.Condition("emb", {"emb": torch.zeros(6, 4, dtype=torch.float64)})
        seen = []

        def __call__(self, x, sigma, emb):
            self.seen.append(emb)
            return x * emb.mean(1, keepdim=True)

    t, emb = Text(), torch.arange(24, dtype=torch.float64).reshape(6, 4)
    G.icg(t, 2.0, seeds=range(6))(x, sigma, emb=emb)
    ref = t.seen[0][6:]
    assert ref.shape == (6, 4) and not torch.equal(ref, emb)
    assert float((ref.mean(1) - emb.mean(1)).abs().max()) < 3 * float(emb.std(1).max())


def test_tsg_defaults_to_the_vector_form_with_alpha_zero():
    net = ToyMLP(hidden=16, depth=1).double()
    seen = []

    def spy(x, sigma, noise_embed_offset=None):
        seen.append(noise_embed_offset)
        return net(x, sigma, noise_embed_offset=noise_embed_offset)

    spy.noise_embed_dim = None
    x, sigma = _x()
    G.tsg(net, 2.0)  # dim from net.noise_embed_dim
    G.tsg(spy, 2.0, dim=16, s=0.3, seeds=range(6))(x, sigma)
    off = seen[0][6:]
    assert off.shape == (6, 16) and abs(float(off.std()) - 0.3) < 0.1  # s t^0 n: no sigma dependence
    with pytest.raises(GuidelabError, match="declares no noise_embed_dim; pass dim=... or form='scalar'"):
        G.tsg(lambda x, sigma, noise_embed_offset=None: x, 2.0)
    G.tsg(lambda x, sigma, noise_embed_offset=None: x, 2.0, form="scalar")
    with pytest.raises(GuidelabError, match="form"):
        G.tsg(net, 2.0, form="matrix")


def test_a_guider_runs_bound_to_a_fresh_run_and_the_original_is_untouched():
    g = G.icg(W, 2.0)
    x, _ = _x()
    samplers.euler(g, x, schedules.karras(4, 0.1, 2.0, dtype=torch.float64), cond={"label": torch.arange(6) % 2})
    assert g.run is None
    run = G.Run(x, [1.0, 0.0])
    assert g.start(run).run is run and g.start(run) is not g


@pytest.mark.parametrize(
    "module, name",
    [
        (m, m)
        for m in (
            "autoguidance",
            "cfg",
            "cfg_zero_star",
            "cfgpp",
            "classifier",
            "compose",
            "epsilon_scaling",
            "icg",
            "interval",
            "rescale",
            "superdiff",
            "tsg",
            "apg",
        )
    ]
    + [("fkc", "fkc_sample"), ("tfg", "tfg_sample")],
)
def test_help_on_a_guider_shows_its_method(module, name):
    """``guidance.cfg`` is the function (it shadows the module of the same name): the method's documentation
    (paper, formulas, convention) is the function's docstring; the module's one line points to it."""
    import sys

    doc = getattr(G, name).__doc__
    assert len(doc) > 400 and ("arXiv" in doc or "Ho & Salimans" in doc or "Ahn et al." in doc), name
    assert f":func:`{name}`" in sys.modules[f"guidelab.guidance.{module}"].__doc__
