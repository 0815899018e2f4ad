"""ICG, TSG, APG and intervals on diffusers models (tiny random UNet / DiT / PixArt saved to a temporary folder):
w = 1 is the unguided model bit for bit, one call of 2B rows per evaluation, the rows the network receives
(ICG's random class / embedding, TSG's time-embedding offset on the marked rows only), per-sample seeds
through ``generate`` and the ``guidelab diffusers`` command line."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import test_diffusers as base  # tests/integrations is on sys.path (rootdir imports)
import test_diffusers_pixart as pixart

from guidelab import guidance, samplers
from guidelab.app.diffusers_generate import generate, make_guider
from guidelab.errors import GuidelabError
from guidelab.guidance._base import draw_labels, draw_normal
from guidelab.guidance.icg import _SALT as ICG_SALT
from guidelab.guidance.tsg import _SALT as TSG_SALT
from guidelab.integrations import diffusers as gd

B, C, H, NULL = base.B, base.C, base.H, base.NULL
SEEDS = [11, 12]


def _folder(tmp_path, kind):
    return pixart._save(tmp_path) if kind == "pixart" else base._save(tmp_path, kind)


def _cond(kind):
    """float64 conditioning of B rows: labels (class models), embeddings (text UNet), embeddings + mask (PixArt)."""
    if kind == "pixart":
        emb, mask, _, _ = pixart._prompts()
        return {"encoder_hidden_states": emb, gd.MASK: mask}
    return base._cond(kind, torch.Generator().manual_seed(3))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, H, generator=g, dtype=torch.float64) * 5, torch.tensor([5.0, 5.0], dtype=torch.float64)


def _calls(model):
    """Every forward call of ``model``: (x_VP, timestep, kwargs)."""
    calls = []
    model.register_forward_pre_hook(lambda m, args, kw: calls.append((args[0], kw["timestep"], dict(kw))), with_kwargs=True)
    return calls


def _load(folder, **kw):
    return gd.load(folder, dtype=torch.float64, **kw)


@pytest.mark.parametrize("kind", ["unet", "dit", "text_unet", "pixart"])
@pytest.mark.parametrize("guider", ["icg", "tsg", "apg"])
def test_weight_one_is_the_unguided_model_bit_for_bit(tmp_path, kind, guider):
    den = _load(
        _folder(tmp_path, kind),
        null_label=NULL if kind == "unet" else None,
        null_text=torch.zeros(1, *_cond(kind)["encoder_hidden_states"].shape[1:], dtype=torch.float64)
        if kind in ("text_unet", "pixart")
        else None,
    )
    x, sigma = _inputs()
    cond = _cond(kind)
    calls = _calls(den.model)
    with torch.no_grad():
        plain = den(x, sigma, **cond)
        D = make_guider(den, guider, 1.0, seeds=SEEDS)(x, sigma, **cond)
        D2 = make_guider(den, guider, 2.0, seeds=SEEDS)(x, sigma, **cond)
    assert torch.equal(D, plain)
    assert [c[0].shape[0] for c in calls] == [B, B, 2 * B]  # w = 1: one call of B rows; w = 2: one of 2B
    assert (D2 - plain).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_icg_reference_rows_get_uniform_random_classes(tmp_path, kind):
    """Rows B..2B of the one call carry labels drawn per sample (seed, sigma) in [0, num_classes): the null
    class never, and not the given labels at every sigma."""
    den = _load(_folder(tmp_path, kind), null_label=NULL if kind == "unet" else None)
    assert den.num_classes == den.condition.num_classes == NULL
    calls = _calls(den.model)
    D = guidance.icg(den, 3.0, seeds=SEEDS)
    y = torch.tensor([1, 7])
    x, _ = _inputs()
    drawn = []
    with torch.no_grad():
        for s in [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0]:
            sigma = torch.full((B,), s, dtype=torch.float64)
            D(x, sigma, class_labels=y)
            labels = calls[-1][2]["class_labels"]
            assert labels.shape == (2 * B,) and torch.equal(labels[:B], y)
            assert torch.equal(labels[B:], draw_labels(SEEDS, sigma, NULL, ICG_SALT, y))
            drawn.append(labels[B:])
    drawn = torch.stack(drawn)
    assert len(calls) == 8 and bool((drawn >= 0).all() and (drawn < NULL).all())
    assert not bool((drawn == y).all()) and len(set(drawn.flatten().tolist())) >= 4
    with pytest.raises(GuidelabError, match="num_classes >= 2"):
        guidance.icg(den, 2.0, num_classes=1)


@pytest.mark.parametrize("kind", ["text_unet", "pixart"])
def test_icg_reference_rows_get_a_gaussian_embedding_with_the_prompts_mean_and_std(tmp_path, kind):
    den = _load(_folder(tmp_path, kind))
    calls = _calls(den.model)
    cond = _cond(kind)
    x, sigma = _inputs()
    with torch.no_grad():
        guidance.icg(den, 3.0, seeds=SEEDS)(x, sigma, **cond)
    ((x_vp, t, kw),) = calls
    e = cond["encoder_hidden_states"]
    flat = e.flatten(1)
    n = draw_normal(SEEDS, sigma, e.shape[1:], ICG_SALT, e)
    expect = flat.mean(1)[:, None, None] + flat.std(1)[:, None, None] * n
    got = kw["encoder_hidden_states"]
    assert torch.equal(got[:B], e) and torch.allclose(got[B:], expect, atol=1e-12)
    assert (got[B:] - e).abs().min() > 0  # every coordinate is a new draw
    assert torch.equal(x_vp[:B], x_vp[B:]) and torch.equal(t[:B], t[B:])
    if kind == "pixart":  # the prompt's mask on both halves
        assert torch.equal(kw["encoder_attention_mask"], torch.cat([cond[gd.MASK]] * 2))


def _embedding_probe(model, kind):
    """The module whose output is (time embedding + class / size embedding) of each row."""
    if kind == "unet":
        out = []
        model.down_blocks[0].register_forward_pre_hook(lambda m, a, kw: out.append(kw["temb"]), with_kwargs=True)
        return out
    mod = model.transformer_blocks[0].norm1.emb if kind == "dit" else model.adaln_single.emb
    out = []
    mod.register_forward_hook(lambda m, a, o: out.append(o))
    return out


@pytest.mark.parametrize("kind", ["unet", "dit", "pixart"])
def test_tsg_perturbs_only_the_marked_rows_time_embedding(tmp_path, kind):
    """One call of 2B rows: x_VP and timestep of every row as unguided; the unmarked half's embedding and output
    equal an unguided call of the same 2B rows bit for bit; the marked half's embedding is shifted by exactly
    s t^alpha n (t = sigma^2 / (1 + sigma^2), n the per-sample draw of guidance.tsg) and its output differs."""
    den = _load(_folder(tmp_path, kind))
    calls, emb = _calls(den.model), _embedding_probe(den.model, kind)
    cond = _cond(kind)
    x, _ = _inputs()
    sigma = torch.tensor([0.7, 3.0], dtype=torch.float64)
    s, alpha = 0.8, 0.5
    g = guidance.tsg(den, 2.0, s=s, alpha=alpha, seeds=SEEDS)
    with torch.no_grad():
        D, D_ref = g.branches(x, sigma, cond)
        cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
        plain = den(torch.cat([x, x]), torch.cat([sigma, sigma]), **cond2)
    n_emb = len(emb) // 2  # DiT calls its first embedder twice
    assert n_emb >= 1 and len(emb) == 2 * n_emb
    (xg, tg, _), (xp, tp, _) = calls
    assert torch.equal(xg, xp) and torch.equal(tg, tp)  # preconditioning and timesteps unchanged
    assert torch.equal(D, plain[:B]) and (D_ref - plain[B:]).abs().max() > 1e-6
    dim = den.noise_embed_dim
    t = sigma**2 / (1 + sigma**2)
    offset = s * t[:, None] ** alpha * draw_normal(SEEDS, sigma, (dim,), TSG_SALT, x)
    for e_g, e_p in zip(emb[:n_emb], emb[n_emb:]):
        assert torch.equal(e_g[:B], e_p[:B])
        assert torch.allclose(e_g[B:] - e_p[B:], offset, atol=1e-12)
    with torch.no_grad():  # the hooks are gone after the call
        assert torch.equal(den(torch.cat([x, x]), torch.cat([sigma, sigma]), **cond2), plain)


def test_tsg_errors_and_layers(tmp_path):
    """The time embedders an offset reaches (``with_perturbation(Perturbation("tsg", layers))``, or generate's
    layers=); a zero offset row is that row unperturbed; a wrong-sized offset or a selection of none is an error."""
    den = _load(_folder(tmp_path, "dit"))
    one = den.with_perturbation(gd.Perturbation("tsg", ["transformer_blocks.1."]))
    assert [n for n, _ in one.embedders.modules(den.model)] == ["transformer_blocks.1.norm1.emb.timestep_embedder"]
    g = make_guider(den, "tsg", 2.0, layers=["transformer_blocks.1."])
    assert g.ref.denoiser.embedders.layers == ["transformer_blocks.1."]
    with pytest.raises(GuidelabError, match="tsg: no layer"):
        guidance.tsg(den.with_perturbation(gd.Perturbation("tsg", ["nothing"])), 2.0)
    x, sigma = _inputs()
    y = torch.tensor([1, 2])
    with torch.no_grad():
        plain = den(x, sigma, class_labels=y)
        offset = torch.zeros(B, den.noise_embed_dim, dtype=torch.float64)
        assert torch.equal(den(x, sigma, class_labels=y, noise_embed_offset=offset), plain)
        offset[1] = 1.0
        shifted = den(x, sigma, class_labels=y, noise_embed_offset=offset)
    assert torch.equal(shifted[0], plain[0]) and (shifted[1] - plain[1]).abs().max() > 1e-6
    with pytest.raises(GuidelabError, match=r"noise_embed_offset must be \[batch, noise_embed_dim\]"):
        den(x, sigma, class_labels=y, noise_embed_offset=torch.ones(B, dtype=torch.float64))


def _in_a_run(guider, x, sigmas, **cond):
    """The guider's outputs at the first len(sigmas) - 1 steps of one run (momentum carried from step to step)."""
    run = guidance.Run(x, sigmas)
    bound = guider.start(run)
    return [bound(x, sigmas[i].expand(x.shape[0]), **cond) for i in run.steps()]


def test_apg_through_make_guider(tmp_path):
    """APG with eta = 1, no threshold, no momentum is CFG; with momentum it differs; its state lives in the run,
    fresh in every run."""
    den = _load(_folder(tmp_path, "unet"), null_label=NULL)
    x, sigma = _inputs()
    y = torch.tensor([1, 7])
    sigmas = torch.tensor([5.0, 2.5, 0.0], dtype=torch.float64)
    opts = {"eta": 0.0, "r": 2.0, "beta": -0.5}
    with torch.no_grad():
        cfg = make_guider(den, "cfg", 3.0)(x, sigma, class_labels=y)
        same = make_guider(den, "apg", 3.0, options={"eta": 1.0})(x, sigma, class_labels=y)
        apg = make_guider(den, "apg", 3.0, options=opts)
        first, second = _in_a_run(apg, x, sigmas, class_labels=y)  # momentum carried within a run
        (fresh,) = _in_a_run(apg, x, sigmas[1:], class_labels=y)
        again, _ = _in_a_run(apg, x, sigmas, class_labels=y)
    assert torch.allclose(same, cfg, atol=1e-10) and (first - cfg).abs().max() > 1e-6
    assert (second - fresh).abs().max() > 1e-8 and torch.equal(again, first)
    with pytest.raises(GuidelabError, match="apg takes no option s; allowed: base, eta, r, beta"):
        make_guider(den, "apg", 3.0, options={"s": 1})
    with pytest.raises(GuidelabError, match="layers is for pag, seg, slg or tsg"):
        make_guider(den, "icg", 3.0, layers=["mid"])
    with pytest.raises(GuidelabError, match="cfg_weight combines"):
        make_guider(den, "tsg", 3.0, cfg_weight=2.0)


@pytest.mark.parametrize("guider", ["icg", "tsg", "apg"])
def test_generate_per_sample_seeds_and_calls(tmp_path, guider):
    """batch 1 == batch 3 bit for bit (fixed blocks of 4 rows: seeds 4..7, seed s in row s % 4); every evaluation is
    one call of 2 x 4 rows (4 outside an interval); block=0: batches of 3, 2 x 3 rows; w = 1 equals the unguided
    run; a fresh APG momentum per call (two runs agree)."""
    folder = _folder(tmp_path, "dit")
    kw = {
        "sampler": "euler",
        "steps": 3,
        "seeds": [5, 6, 7],
        "label": [1, 2, 3],
        "dtype": torch.float64,
        "block": 4,
        "guider_options": {"beta": -0.5, "r": 5.0} if guider == "apg" else {},
    }
    one = generate(folder, guider=guider, w=2.5, batch=1, **kw)
    three = generate(folder, guider=guider, w=2.5, batch=3, **kw)
    assert torch.equal(one, three) and torch.equal(three, generate(folder, guider=guider, w=2.5, **kw))
    unblocked = generate(folder, guider=guider, w=2.5, batch=1, **{**kw, "block": 0})
    assert torch.allclose(unblocked, three, atol=1e-10)
    unguided = generate(folder, **{**kw, "guider_options": {}})
    assert torch.equal(generate(folder, guider=guider, w=1.0, **kw), unguided)
    assert (three - unguided).abs().max() > 1e-4
    import diffusers

    calls = []
    orig = diffusers.DiTTransformer2DModel.forward

    def counted(self, hidden_states, *a, **k):
        calls.append(hidden_states.shape[0])
        return orig(self, hidden_states, *a, **k)

    diffusers.DiTTransformer2DModel.forward = counted
    try:
        generate(folder, guider=guider, w=2.5, batch=3, **kw)
        n = len(calls)
        sig = gd.make_sigmas(_load(folder), 3)
        generate(folder, guider=guider, w=2.5, batch=3, interval=(0.0, float(sig[1]) + 1e-3), **kw)
        m = len(calls)
        generate(folder, guider=guider, w=2.5, batch=3, **{**kw, "block": 0})
    finally:
        diffusers.DiTTransformer2DModel.forward = orig
    assert calls[:n] == [8] * 3 and calls[n:m] == [4, 8, 8]  # euler: 3 evaluations; first outside (lo, hi]
    assert calls[m:] == [6] * 3


def test_generate_bad_combinations_are_one_line_errors(tmp_path):
    folder, text = _folder(tmp_path, "unet"), _folder(tmp_path, "text_unet")
    for guider, kw, msg in [
        ("icg", {}, "icg on this model needs class_labels"),
        ("icg", {"label": 1, "guider_options": {"num_classes": "x"}}, "icg option num_classes must be an integer"),
        ("icg", {"label": 1, "guider_options": {"num_classes": 1}}, "num_classes >= 2"),
        ("tsg", {"guider_options": {"num_classes": 3}}, "tsg takes no option num_classes"),
        ("apg", {"label": 1}, r"apg needs a class-conditional network \(its null label\)"),
        ("cfg", {"label": 1, "guide_options": 1}, "generate takes no guide_options; allowed: guider,"),
    ]:
        with pytest.raises(GuidelabError, match=msg) as e:
            generate(folder, guider=guider, w=2.0, steps=2, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(GuidelabError, match="num_classes is for class-conditional models"):
        generate(text, guider="icg", w=2.0, steps=2, prompt_embeds=torch.randn(1, 4, 16), guider_options={"num_classes": 3})


@pytest.mark.parametrize(
    "guider, extra",
    [
        ("icg", ["--null-label", str(NULL)]),
        ("tsg", ["--option", "s=1.0", "--option", "alpha=0.5"]),
        (
            "apg",
            ["--null-label", str(NULL), "--option", "eta=0", "--option", "r=4", "--option", "beta=-0.5", "--interval", "0.2-100"],
        ),
    ],
)
def test_cli(tmp_path, guider, extra):
    """``guidelab diffusers --guider icg|tsg|apg`` equals ``generate`` with the same arguments (float32)."""
    from click.testing import CliRunner

    from guidelab.app import cli

    folder = _folder(tmp_path, "unet")
    out = tmp_path / "out"
    args = [
        "diffusers",
        str(folder),
        "--out",
        str(out),
        "--guider",
        guider,
        "--weight",
        "2",
        "--steps",
        "3",
        "--seeds",
        "2-4",
        "--batch",
        "2",
        "--label",
        "3",
        *extra,
    ]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    opts = {"icg": {}, "tsg": {"s": 1.0, "alpha": 0.5}, "apg": {"eta": 0, "r": 4, "beta": -0.5}}[guider]
    ref = generate(
        folder,
        guider=guider,
        w=2.0,
        steps=3,
        seeds=[2, 3, 4],
        batch=2,
        label=3,
        null_label=NULL if guider != "tsg" else None,
        guider_options=opts,
        interval=(0.2, 100.0) if guider == "apg" else None,
    )
    with np.load(out / "samples.npz") as f:
        assert np.allclose(f["x"], ref.numpy(), rtol=1e-6, atol=1e-5)
    bad = CliRunner().invoke(cli.main, [*args, "--option", "bogus=1"])
    assert bad.exit_code != 0 and "takes no option bogus" in str(bad.exception)


@pytest.mark.parametrize("kind", ["unet", "pixart"])
def test_generic_cfg_icg_tsg_equal_the_one_call_built_by_hand(tmp_path, kind):
    """guidance.cfg / icg / tsg read what the DiffusersDenoiser declares (condition, noise_embed_dim) and give,
    bit for bit, D_ref.lerp(D, w) of one hand-built call of 2B rows: the null class or the null embedding with
    its mask; ICG's per-sample labels / Gaussian embedding; TSG's offset s t^alpha n added by a hand-written
    hook to the reference rows' time embedding (the former diffusers-only wrappers built exactly these)."""
    _, _, null, null_mask = pixart._prompts()
    den = _load(
        _folder(tmp_path, kind),
        null_label=NULL if kind == "unet" else None,
        null_text=null if kind == "pixart" else None,
        null_mask=null_mask if kind == "pixart" else None,
    )
    cond = _cond(kind)
    key = den.condition.key
    x, _ = _inputs()
    sigma = torch.tensor([0.7, 3.0], dtype=torch.float64)
    w, s, alpha = 2.5, 0.8, 0.5
    two = {k: torch.cat([v, v]) for k, v in cond.items()}

    def by_hand(**ref):
        with torch.no_grad():
            D, D_ref = den(torch.cat([x, x]), torch.cat([sigma, sigma]), **{**two, **ref}).chunk(2)
        return D_ref.lerp(D, w)

    def ours(g):
        with torch.no_grad():
            return g(x, sigma, **cond)

    y = cond[key]
    if kind == "unet":
        null_ref = {key: torch.cat([y, torch.full_like(y, NULL)])}
        icg_ref = {key: torch.cat([y, draw_labels(SEEDS, sigma, NULL, ICG_SALT, y)])}
    else:
        null_ref = {key: torch.cat([y, null.expand(B, -1, -1)]), gd.MASK: torch.cat([cond[gd.MASK], null_mask.expand(B, -1)])}
        flat = y.flatten(1)
        y_hat = flat.mean(1)[:, None, None] + flat.std(1)[:, None, None] * draw_normal(SEEDS, sigma, y.shape[1:], ICG_SALT, y)
        icg_ref = {key: torch.cat([y, y_hat])}
    assert torch.equal(ours(guidance.cfg(den, w)), by_hand(**null_ref))
    assert torch.equal(ours(guidance.icg(den, w, seeds=SEEDS)), by_hand(**icg_ref))
    t = sigma**2 / (1 + sigma**2)
    offset = s * t[:, None] ** alpha * draw_normal(SEEDS, sigma, (den.noise_embed_dim,), TSG_SALT, x)
    rows = torch.tensor([False] * B + [True] * B)
    full = torch.cat([torch.zeros_like(offset), offset])
    handles = [
        m.register_forward_hook(lambda m, a, o: torch.where(rows[:, None], o + full.to(o), o))
        for _, m in den.embedders.modules(den.model)
    ]
    try:
        tsg_ref = by_hand()
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(ours(guidance.tsg(den, w, s=s, alpha=alpha, seeds=SEEDS)), tsg_ref)


@pytest.mark.parametrize("guider", ["icg", "tsg"])
def test_icg_tsg_draw_from_the_runs_per_sample_seeds_by_default(tmp_path, guider):
    """Without seeds=, ICG / TSG on a diffusers model draw from the sampler's per-sample seeds (SampleNoise): the
    same samples as with seeds= given, and batch invariant."""
    from guidelab.rng import SampleNoise

    den = _load(_folder(tmp_path, "dit"))
    make = getattr(guidance, guider)
    sigmas = gd.make_sigmas(den, 3)
    seeds = [4, 9, 2]
    y = torch.tensor([1, 2, 3])

    def run(g, rows):
        noise = SampleNoise([seeds[i] for i in rows])
        x = noise.randn([C, H, H], dtype=torch.float64) * sigmas[0]
        with torch.no_grad():
            return samplers.euler_ancestral(g, x, sigmas, cond={"class_labels": y[rows]}, noise=noise)

    default = run(make(den, 2.0), [0, 1, 2])
    assert torch.equal(default, run(make(den, 2.0, seeds=seeds), [0, 1, 2]))
    assert torch.allclose(default[1:], run(make(den, 2.0), [1, 2]), atol=1e-10)
