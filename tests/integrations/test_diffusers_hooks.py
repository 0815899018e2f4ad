"""The scoped row-marking hooks (PAG, SEG, SLG, TSG): bit for bit the outputs of the process-wide patch they
replace (written below as the reference), nothing left on the model afterwards, and a second thread or model
running at the same time is unaffected."""

import contextlib
import inspect
import math
import threading

import pytest
import torch

pytest.importorskip("diffusers")
import test_diffusers as base  # tests/integrations is on sys.path (rootdir imports)
import test_diffusers_pixart as pixart

from guidelab import guidance, samplers
from guidelab.errors import GuidelabError
from guidelab.integrations import diffusers as gd
from guidelab.integrations.diffusers import adapter, hooks

B, C, H, NULL = base.B, base.C, base.H, base.NULL


@contextlib.contextmanager
def _process_wide_patch(model, perturbation, mask, offset=None):
    """The replaced mechanism: hooks on the selected modules and, for PAG/SEG, F.scaled_dot_product_attention
    swapped process-wide while the context lasts, perturbing while a selected module runs."""
    F = torch.nn.functional
    original, active, handles = F.scaled_dot_product_attention, [], []
    mods = perturbation.modules(model)
    marks = mask.bool().tolist()
    if perturbation.mode in ("slg", "tsg"):

        def hook(m, args, kwargs, out):
            keep = mask.bool()
            if perturbation.mode == "tsg":
                return torch.where(keep[:, None], out + offset.to(out), out)
            o = out[0] if isinstance(out, tuple) else out
            o = torch.where(keep.view(-1, *[1] * (o.ndim - 1)), args[0] if args else kwargs["hidden_states"], o)
            return (o, *out[1:]) if isinstance(out, tuple) else o

        handles = [m.register_forward_hook(hook, with_kwargs=True) for _, m in mods]

    def sdpa(q, k, v, *a, **kw):
        if not active:
            return original(q, k, v, *a, **kw)
        out, i = [], 0
        while i < len(marks):
            j = i
            while j < len(marks) and marks[j] == marks[i]:
                j += 1
            cut = [x[i:j] if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == len(marks) else x for x in a]
            kwc = {n: x[i:j] if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == len(marks) else x for n, x in kw.items()}
            if not marks[i]:
                out.append(original(q[i:j], k[i:j], v[i:j], *cut, **kwc))
            elif perturbation.mode == "pag":
                out.append(v[i:j])
            else:
                out.append(original(hooks._blur_queries(q[i:j], perturbation.blur_sigma), k[i:j], v[i:j], *cut, **kwc))
            i = j
        return out[0] if len(out) == 1 else torch.cat(out)

    def enter(m, args):
        active.append(m)

    def leave(m, args, out):
        active.pop()

    if perturbation.mode in ("pag", "seg"):
        for _, m in mods:
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        for h in handles:
            h.remove()


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def _load(tmp_path, kind):
    if kind == "pixart":
        emb, mask, null, null_mask = pixart._prompts()
        den = gd.load(pixart._save(tmp_path), dtype=torch.float64, null_text=null, null_mask=null_mask)
        return den, {"encoder_hidden_states": emb, gd.MASK: mask}
    den = gd.load(
        base._save(tmp_path, kind),
        dtype=torch.float64,
        null_label=NULL if kind == "unet" else None,
        null_text=torch.zeros(1, 4, 16, dtype=torch.float64) if kind == "text_unet" else None,
    )
    return den, base._cond(kind, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["unet", "text_unet", "pixart"])
def test_scoped_hooks_equal_the_process_wide_patch_bit_for_bit(tmp_path, kind, monkeypatch):
    """PAG, SEG (finite and infinite blur), SLG, TSG and PAG + CFG through a sampler: the same samples, bit for bit,
    as the former mechanism; afterwards the model has its own processors and no hooks."""
    den, cond = _load(tmp_path, kind)
    processors = _processors(den.model)
    sigmas = den.sigmas(3, "trailing")
    x = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sigmas[0]
    every = {"layers": "all"}  # the tiny models have no block 7, 8, 9
    guiders = {
        "pag": lambda: gd.pag(den, 2.5, **every),
        "seg": lambda: gd.seg(den, 2.5, blur_sigma=1.0, **every),
        "seg_inf": lambda: gd.seg(den, 2.5, **every),
        "slg": lambda: gd.slg(den, 2.5, **every),
        "tsg": lambda: guidance.tsg(den, 2.0, s=0.5, alpha=1.0, seeds=[1, 2]),
        "pag_mid": lambda: gd.pag(den, 2.5),
        "pag_cfg": lambda: gd.pag(den, 2.5, cfg_weight=3.0, **every),
    }
    with torch.no_grad():
        ours = {k: samplers.euler(g(), x, sigmas, cond=cond) for k, g in guiders.items()}
        monkeypatch.setattr(adapter, "perturbed_attention", _process_wide_patch)
        ref = {k: samplers.euler(g(), x, sigmas, cond=cond) for k, g in guiders.items()}
    for k in guiders:
        assert torch.equal(ours[k], ref[k]), k
    assert _processors(den.model) == processors and hooks._INSTALLED == {}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in den.model.modules())


def _perturbed_call(den, pert, x, sigma, cond):
    return den.with_perturbation(pert)(x, sigma, **cond, perturb=torch.tensor([True, False]))


@pytest.mark.parametrize("mode", ["pag", "seg", "slg"])
def test_another_thread_and_another_model_at_the_same_time_are_unaffected(tmp_path, mode):
    """Thread A stops inside a perturbed layer of model M; meanwhile thread B runs M and a second model M2
    unperturbed: B gets the plain outputs bit for bit and A its perturbed one."""
    den, cond = _load(tmp_path, "unet")
    other = gd.load(base._save(tmp_path, "unet", seed=1, name="other"), dtype=torch.float64)
    x = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 3
    sigma = torch.full((B,), 3.0, dtype=torch.float64)
    pert = gd.Perturbation(mode, blur_sigma=1.0)
    with torch.no_grad():
        plain, plain_other = den(x, sigma, **cond), other(x, sigma, **cond)
        perturbed = _perturbed_call(den, pert, x, sigma, cond)
    assert (perturbed - plain).abs().max() > 1e-6
    _, layer = pert.modules(den.model)[0]
    inside = layer.to_out[0] if mode != "slg" else layer  # a point inside the perturbation's scope
    a_inside, b_done, out = threading.Event(), threading.Event(), {}

    def stop_in_a(module, args):
        if threading.current_thread().name == "A" and not a_inside.is_set():
            a_inside.set()
            assert b_done.wait(30), "thread B did not finish"

    handle = inside.register_forward_pre_hook(stop_in_a)

    def run_a():
        with torch.no_grad():
            out["a"] = _perturbed_call(den, pert, x, sigma, cond)

    def run_b():
        assert a_inside.wait(30)
        with torch.no_grad():
            out["b"], out["b_other"] = den(x, sigma, **cond), other(x, sigma, **cond)
        b_done.set()

    threads = [threading.Thread(target=run_a, name="A"), threading.Thread(target=run_b, name="B")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        handle.remove()
    assert b_done.is_set() and set(out) == {"a", "b", "b_other"}
    assert torch.equal(out["b"], plain) and torch.equal(out["b_other"], plain_other)
    assert torch.equal(out["a"], perturbed)


def test_overlapping_scopes_install_once_and_clean_up(tmp_path):
    """Nested contexts on one model share one wrapper per layer and remove it after the last; an attention
    processor that never calls scaled_dot_product_attention is refused, not silently left unperturbed."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    den, cond = _load(tmp_path, "unet")
    ((_, layer),) = gd.Perturbation("pag", layers=["mid_block"]).modules(den.model)
    inner = layer.processor
    pert = gd.Perturbation("pag", layers=["mid_block"])
    mask = torch.tensor([True, False])
    with hooks.perturbed_attention(den.model, pert, mask):
        wrapper = layer.processor
        assert isinstance(wrapper, hooks._Processor) and wrapper.inner is inner
        assert inspect.signature(wrapper.__call__) == inspect.signature(inner.__call__)  # same keywords passed on
        with hooks.perturbed_attention(den.model, pert, mask):
            assert layer.processor is wrapper
        assert layer.processor is wrapper
    assert layer.processor is inner and hooks._INSTALLED == {}
    layer.set_processor(AttnProcessor())
    x, sigma = torch.randn(B, C, H, H, dtype=torch.float64), torch.full((B,), 2.0, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(GuidelabError, match="AttnProcessor does not call F.scaled_dot_product"):
        _perturbed_call(den, pert, x, sigma, cond)
    assert isinstance(layer.processor, AttnProcessor) and hooks._INSTALLED == {}
    layer.set_processor(AttnProcessor2_0())
    with torch.no_grad():  # guiders still work after an error
        assert torch.isfinite(samplers.euler(guidance.interval(gd.pag(den, 2.0), 0.0, 1e9), x, den.sigmas(2), cond=cond)).all()


# ---------------------------------------------------------------------------------------------
# Default layers and SLG's step window (diffusers' recommendations).


def _names(mode, model, layers=None):
    return [n for n, _ in gd.Perturbation(mode, layers).modules(model)]


def _diffusers_pag_selection(model, layers):
    """The self-attentions diffusers' PAG pipelines perturb for ``pag_applied_layers=layers``."""
    from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    class Pipe(PAGMixin):
        pass

    pipe = Pipe()
    pipe.transformer = model
    if type(model).__name__.startswith("UNet"):
        pipe.unet = model
    pipe.set_pag_applied_layers(layers)
    saved = _processors(model)
    pipe._set_pag_attn_processor(pipe.pag_applied_layers, do_classifier_free_guidance=False)
    chosen = [n for n, p in _processors(model).items() if isinstance(p, PAGIdentitySelfAttnProcessor2_0)]
    for n, m in model.named_modules():
        if n in saved:
            m.processor = saved[n]
    return chosen


def test_default_layers_are_diffusers_recommendations():
    """UNets: PAG / SEG / SLG on the middle block ("mid", diffusers' SD / SDXL PAG pipelines; the same layers as
    diffusers selects); transformers: PAG on block 1 ("blocks.1", its PixArt / SD3 PAG pipelines; not blocks.10),
    SEG and SLG on blocks 7, 8, 9 (its SkipLayerGuidance / SmoothedEnergyGuidance); TSG every time embedder;
    layers=... overrides; a model without the default layers is one clear error."""
    from diffusers import DiTTransformer2DModel

    unet, text_unet = base._unet(0), base._text_unet(0)
    for mode in ("pag", "seg", "slg"):
        assert _names(mode, unet) == ["mid_block.attentions.0"]
    assert _names("pag", unet) == _diffusers_pag_selection(unet, "mid")
    attn = ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert _names("pag", text_unet) == _names("seg", text_unet) == attn == _diffusers_pag_selection(text_unet, "mid")
    assert _names("slg", text_unet) == ["mid_block.attentions.0.transformer_blocks.0"]
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=C,
        out_channels=2 * C,
        num_layers=12,
        sample_size=H,
        patch_size=2,
        num_embeds_ada_norm=NULL,
    )
    assert _names("pag", dit) == ["transformer_blocks.1.attn1"]
    assert _names("seg", dit) == [f"transformer_blocks.{i}.attn1" for i in (7, 8, 9)]
    assert _names("slg", dit) == [f"transformer_blocks.{i}" for i in (7, 8, 9)]
    assert len(_names("tsg", dit)) == 12 and _names("tsg", unet) == ["time_embedding"]
    px = pixart._model("pixart")
    assert _names("pag", px) == ["transformer_blocks.1.attn1"] == _diffusers_pag_selection(px, "blocks.1")
    assert _names("slg", dit, ["blocks.1"]) == ["transformer_blocks.1"]  # not blocks.10, blocks.11
    assert _names("slg", dit, "all") == [f"transformer_blocks.{i}" for i in range(12)]
    assert _names("pag", unet, ["down_blocks"]) == ["down_blocks.1.attentions.0"]
    with pytest.raises(GuidelabError, match=r"slg: no layer of DiTTransformer2DModel matches .*\(the default"):
        gd.Perturbation("slg").modules(base._dit(0))  # 2 blocks: no block 7
    with pytest.raises(GuidelabError, match="layers must be"):
        gd.Perturbation("pag", [])


def test_slg_step_window_is_diffusers_sd3_gate(tmp_path):
    """SLG_WINDOW on n steps: steps i with 0.01 n < i < 0.2 n (32 steps: 1..6), as sigma (sigmas[7], sigmas[1]];
    through guidance.interval the guided steps are exactly those; too few steps is an error."""
    den, cond = _load(tmp_path, "unet")
    sig = gd.make_sigmas(den, 32)
    assert gd.step_window(sig, *gd.SLG_WINDOW) == (float(sig[7]), float(sig[1]))
    sig = gd.make_sigmas(den, 10)
    lo, hi = gd.step_window(sig, *gd.SLG_WINDOW)  # 0.1 < i < 2: step 1 only
    calls = base._count_calls(den.model)
    x = torch.randn(B, C, H, H, dtype=torch.float64) * sig[0]
    with torch.no_grad():
        samplers.euler(guidance.interval(gd.slg(den, 2.0), lo, hi), x, sig, cond=cond)
    assert calls == [B, 2 * B] + [B] * 8
    with pytest.raises(GuidelabError, match="holds no step"):
        gd.step_window(gd.make_sigmas(den, 4), *gd.SLG_WINDOW)


# ---------------------------------------------------------------------------------------------
# SD3's joint attention (JointTransformerBlock / JointAttnProcessor2_0): equal to diffusers' own PAG processors,
# its transformer's skip_layers and its SEG hook.


def _sd3(num_layers=3):
    import diffusers

    from guidelab.guidance.protocols import Condition
    from guidelab.integrations.diffusers import flow

    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=8,
    )
    net = net.double().eval()
    g = torch.Generator().manual_seed(1)
    emb, pooled = torch.randn(B, 5, 32, generator=g, dtype=torch.float64), torch.randn(B, 32, generator=g, dtype=torch.float64)
    nemb, npooled = torch.randn(1, 5, 32, generator=g, dtype=torch.float64), torch.randn(1, 32, generator=g, dtype=torch.float64)
    over = {
        "encoder_hidden_states": lambda old: nemb.expand(old.shape[0], -1, -1),
        "pooled_projections": lambda old: npooled.expand(old.shape[0], -1),
    }
    cond = {"encoder_hidden_states": emb, "pooled_projections": pooled}
    den = flow.FlowDenoiser(
        flow.velocity_call(net), dtype=torch.float64, condition=Condition("encoder_hidden_states", over), model=net
    )
    sigma = torch.full((B,), 1.5, dtype=torch.float64)
    x = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64) * 2.5
    return net, den, cond, (nemb.expand(B, -1, -1), npooled.expand(B, -1)), x, sigma


def _velocity(net, x, sigma, emb, pooled, **kw):
    """diffusers' call of the SD3 transformer at EDM (x, sigma): x_t = x / (1 + sigma), timestep 1000 t."""
    t = sigma / (1 + sigma)
    x_t = x / (1 + sigma.view(-1, 1, 1, 1))
    k = emb.shape[0] // x.shape[0]
    v = net(
        hidden_states=torch.cat([x_t] * k),
        timestep=(t * 1000).float().repeat(k),
        encoder_hidden_states=emb,
        pooled_projections=pooled,
        return_dict=False,
        **kw,
    )[0]
    return x_t, t.view(-1, 1, 1, 1), v


def test_sd3_joint_attention_pag_slg_seg_equal_diffusers():
    """PAG + CFG in one call equals diffusers' PAGCFGJointAttnProcessor2_0 on transformer_blocks.1 (the SD3 PAG
    pipeline's default "blocks.1"; image tokens attend to themselves among image tokens and to all text tokens),
    PAG alone its PAGJointAttnProcessor2_0, SLG the transformer's skip_layers (the last block has no text output),
    SEG at infinite blur diffusers' SEG hook on to_q (which, for any finite blur_sigma below 9999.9, takes the
    mean query: its branches are swapped)."""
    from diffusers.hooks.smoothed_energy_guidance_utils import (
        SmoothedEnergyGuidanceConfig,
        _apply_smoothed_energy_guidance_hook,
    )
    from diffusers.models.attention_processor import PAGCFGJointAttnProcessor2_0, PAGJointAttnProcessor2_0

    net, den, cond, (nemb, npooled), x, sigma = _sd3()
    emb, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
    assert _names("pag", net) == ["transformer_blocks.1.attn"]
    attn = net.transformer_blocks[1].attn
    saved = attn.processor
    with torch.no_grad():
        plain = den(x, sigma, **cond)
        ours = gd.pag(den, 3.0, cfg_weight=4.0)(x, sigma, **cond)
        attn.set_processor(PAGCFGJointAttnProcessor2_0())
        x_t, t, v = _velocity(net, x, sigma, torch.cat([nemb, emb, emb]), torch.cat([npooled, pooled, pooled]))
        vu, vc, vp = v.chunk(3)
        ref = x_t - t * (vu + 4.0 * (vc - vu) + 2.0 * (vc - vp))
        assert (ours - ref).abs().max() < 1e-12 and (ref - plain).abs().max() > 1e-2
        attn.set_processor(saved)
        ours = gd.pag(den, 2.0)(x, sigma, **cond)
        attn.set_processor(PAGJointAttnProcessor2_0())
        x_t, t, v = _velocity(net, x, sigma, torch.cat([emb, emb]), torch.cat([pooled, pooled]))
        vc, vp = v.chunk(2)
        assert (ours - (x_t - t * (vc + (vc - vp)))).abs().max() < 1e-12
        attn.set_processor(saved)

        ours = gd.slg(den, 3.0, layers=["transformer_blocks.1", "transformer_blocks.2"])(x, sigma, **cond)
        _, _, vs = _velocity(net, x, sigma, emb, pooled, skip_layers=[1, 2])
        _, _, vc = _velocity(net, x, sigma, emb, pooled)
        ref = x_t - t * (vc + 2.0 * (vc - vs))
        assert (ours - ref).abs().max() < 1e-12 and (ref - plain).abs().max() > 1e-2

        ours = gd.seg(den, 3.0, layers=["transformer_blocks.1"])(x, sigma, **cond)
        _apply_smoothed_energy_guidance_hook(net, SmoothedEnergyGuidanceConfig(indices=[1]), blur_sigma=1.0)
        _, _, vp = _velocity(net, x, sigma, emb, pooled)
    ref = x_t - t * (vc + 2.0 * (vc - vp))
    assert (ours - ref).abs().max() < 1e-12 and (ref - plain).abs().max() > 1e-3


def test_sd3_joint_attention_rows_one_call_and_w1():
    """Every guider is one call of 2B (3B with CFG) rows; unmarked rows are the plain model's bit for bit; w = 1 is
    the plain model; a finite SEG blur changes only the image queries; the registry builds pag / seg / slg for a
    FlowDenoiser (SD3)."""
    from guidelab.guidance import registry

    net, den, cond, _, x, sigma = _sd3()
    calls = []
    net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    every = ["transformer_blocks.1"]
    with torch.no_grad():
        plain = den(x, sigma, **cond)
        for mode in ("pag", "seg", "slg"):
            g = gd.attention_guidance(den, 1.0, mode, layers=every)
            assert torch.equal(g(x, sigma, **cond), plain)
            calls.clear()
            gd.attention_guidance(den, 2.0, mode, layers=every, blur_sigma=1.0 if mode == "seg" else math.inf)(x, sigma, **cond)
            assert calls == [2 * B]
            calls.clear()
            gd.attention_guidance(den, 2.0, mode, layers=every, cfg_weight=3.0)(x, sigma, **cond)
            assert calls == [3 * B]
            wrapped = gd.attention_guidance(den, 2.0, mode, layers=every).ref.denoiser
            marked = wrapped(x, sigma, **cond, perturb=torch.tensor([False, True]))
            assert torch.equal(marked[0], plain[0]) and not torch.equal(marked[1], plain[1])
        g = registry.build("slg", registry.Context(den, w=2.0, options=["layers=transformer_blocks.1"]))
        assert (g(x, sigma, **cond) - plain).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# FLUX (FluxTransformer2DModel: double-stream FluxTransformerBlock, single-stream FluxSingleTransformerBlock, tokens
# [text; image] in both): PAG / SEG / SLG against hand-written perturbed forwards.

FLUX_TXT, FLUX_SEQ = 5, 16  # text tokens; image tokens (a 4 x 4 packed grid)


def _flux():
    import diffusers

    from guidelab.guidance.protocols import Condition
    from guidelab.integrations.diffusers import flow, flux

    torch.manual_seed(0)
    net = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(4, 4, 8),
    )
    net = net.double().eval()
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(B, FLUX_TXT, 16, generator=g, dtype=torch.float64)
    pooled = torch.randn(B, 16, generator=g, dtype=torch.float64)
    nemb, npooled = (
        torch.randn(1, FLUX_TXT, 16, generator=g, dtype=torch.float64),
        torch.randn(1, 16, generator=g, dtype=torch.float64),
    )
    over = {
        "encoder_hidden_states": lambda old: nemb.expand(old.shape[0], -1, -1),
        "pooled_projections": lambda old: npooled.expand(old.shape[0], -1),
    }
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    img_ids, txt_ids = img_ids.reshape(-1, 3).double(), torch.zeros(FLUX_TXT, 3, dtype=torch.float64)
    velocity = flux.velocity_call(net, img_ids, txt_ids)
    den = flow.FlowDenoiser(velocity, dtype=torch.float64, condition=Condition("encoder_hidden_states", over), model=net)
    cond = {"encoder_hidden_states": emb, "pooled_projections": pooled}
    x = torch.randn(B, FLUX_SEQ, 16, generator=g, dtype=torch.float64) * 2.5
    return net, den, cond, velocity, x, torch.full((B,), 1.5, dtype=torch.float64)


class _RefFluxAttention:
    """FLUX's attention written out by hand (projections, RMS norms, [text; image], rotary, softmax(QK^T / sqrt d) V),
    with PAG (the image tokens' output replaced by their V) or SEG at infinite blur (every image query replaced by
    the mean image query); the text tokens attend as usual."""

    def __init__(self, mode, n_txt):
        self.mode, self.n_txt = mode, n_txt

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(t):
            return t.unflatten(-1, (attn.heads, attn.head_dim))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            q, k, v = torch.cat([attn.norm_added_q(eq), q], 1), torch.cat([attn.norm_added_k(ek), k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, d]
        n = self.n_txt
        if self.mode == "seg":
            q = torch.cat([q[:, :, :n], q[:, :, n:].mean(2, keepdim=True).expand_as(q[:, :, n:])], 2)
        out = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).softmax(-1) @ v
        if self.mode == "pag":
            out = torch.cat([out[:, :, :n], v[:, :, n:]], 2)
        out = out.transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        ctx, img = out[:, :n], out[:, n:]
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(ctx)


def _flux_perturbed_velocity(net, velocity, x, sigma, cond, mode, attns=(), blocks=()):
    """The velocity of the perturbed model, every row perturbed: hand-written attentions on ``attns``, the blocks
    ``blocks`` skipped (output = input, both streams)."""
    saved = [(a, a.processor) for a in attns]
    t = sigma / (1 + sigma)
    x_t = x / (1 + sigma.view(-1, 1, 1))
    try:
        for a in attns:
            a.set_processor(_RefFluxAttention(mode, FLUX_TXT))
        for b in blocks:
            b.forward = lambda hidden_states, encoder_hidden_states, **kw: (encoder_hidden_states, hidden_states)
        return velocity(x_t, (t * 1000).float(), **cond)
    finally:
        for a, p in saved:
            a.set_processor(p)
        for b in blocks:
            del b.forward


def test_flux_pag_seg_slg_equal_hand_written_forwards():
    """PAG on FLUX (double- and single-stream attention): the image tokens' attention output is their V; SEG at
    infinite blur: the image queries are their mean; SLG: the selected blocks skipped on both streams; each equals
    a hand-written perturbed forward; the default layers are the double-stream ones (block 1; blocks 7-9 absent in
    this 2-block model: one error naming them)."""
    net, den, cond, velocity, x, sigma = _flux()
    assert _names("pag", net) == ["transformer_blocks.1.attn"]
    assert _names("pag", net, "transformer_blocks.1") == ["transformer_blocks.1.attn", "single_transformer_blocks.1.attn"]
    assert _names("slg", net, ["^transformer_blocks.0", "single_transformer_blocks.1"]) == [
        "transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    with pytest.raises(GuidelabError, match=r"no layer of FluxTransformer2DModel matches .*\^transformer_blocks.7"):
        gd.slg(den, 2.0)(x, sigma, **cond)
    t = (sigma / (1 + sigma)).view(-1, 1, 1)
    x_t = x / (1 + sigma.view(-1, 1, 1))
    dbl, sgl = net.transformer_blocks, net.single_transformer_blocks
    with torch.no_grad():
        vc = velocity(x_t, (sigma / (1 + sigma) * 1000).float(), **cond)
        plain = den(x, sigma, **cond)
        assert (plain - (x_t - t * vc)).abs().max() < 1e-12
        cases = [
            ("pag", ["transformer_blocks.1"], {"attns": [dbl[1].attn, sgl[1].attn]}),
            ("pag", ["^transformer_blocks.0"], {"attns": [dbl[0].attn]}),
            ("pag", ["single_transformer_blocks.0"], {"attns": [sgl[0].attn]}),
            ("seg", ["^transformer_blocks.0", "single_transformer_blocks.1"], {"attns": [dbl[0].attn, sgl[1].attn]}),
            ("slg", ["^transformer_blocks.1", "single_transformer_blocks.0"], {"blocks": [dbl[1], sgl[0]]}),
        ]
        for mode, layers, where in cases:
            ours = gd.attention_guidance(den, 3.0, mode, layers=layers)(x, sigma, **cond)
            vp = _flux_perturbed_velocity(net, velocity, x, sigma, cond, mode, **where)
            ref = x_t - t * (vc + 2.0 * (vc - vp))
            assert (ours - ref).abs().max() < 1e-12, (mode, layers)
            assert (ref - plain).abs().max() > 1e-3, (mode, layers)


def test_flux_rows_one_call_and_w1():
    """On FLUX every attention guider is one call of 2B (3B with CFG) rows; unmarked rows are the plain model's
    bit for bit; w = 1 is the plain model bit for bit."""
    net, den, cond, _, x, sigma = _flux()
    calls = []
    net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    every = ["transformer_blocks.1"]  # double- and single-stream block 1
    with torch.no_grad():
        plain = den(x, sigma, **cond)
        for mode in ("pag", "seg", "slg"):
            assert torch.equal(gd.attention_guidance(den, 1.0, mode, layers=every)(x, sigma, **cond), plain)
            calls.clear()
            gd.attention_guidance(den, 2.0, mode, layers=every, blur_sigma=1.0 if mode == "seg" else math.inf)(x, sigma, **cond)
            assert calls == [2 * B]
            calls.clear()
            gd.attention_guidance(den, 2.0, mode, layers=every, cfg_weight=3.0)(x, sigma, **cond)
            assert calls == [3 * B]
            wrapped = gd.attention_guidance(den, 2.0, mode, layers=every).ref.denoiser
            marked = wrapped(x, sigma, **cond, perturb=torch.tensor([False, True]))
            assert torch.equal(marked[0], plain[0]) and not torch.equal(marked[1], plain[1])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_tsg_offset_reaches_only_the_time_embedding(family):
    """SD3 / FLUX FlowDenoiser: noise_embed_dim is the timestep embedder's output size; noise_embed_offset [B, dim]
    equals a hand-written hook adding it to time_text_embed.timestep_embedder's output (before the pooled text is
    added), on its non-zero rows only (zero rows: the plain model bit for bit); guidance.tsg at w = 1 is the plain
    model; a wrong shape is one error."""
    net, den, cond, *_, x, sigma = _sd3() if family == "sd3" else _flux()
    emb = net.time_text_embed.timestep_embedder
    assert den.noise_embed_dim == emb.linear_2.out_features == net.config.num_attention_heads * net.config.attention_head_dim
    g = torch.Generator().manual_seed(5)
    offset = torch.randn(B, den.noise_embed_dim, generator=g, dtype=torch.float64)
    offset[0] = 0
    with torch.no_grad():
        plain = den(x, sigma, **cond)
        ours = den(x, sigma, **cond, noise_embed_offset=offset)
        hook = emb.register_forward_hook(lambda m, a, out: out + offset)
        try:
            ref = den(x, sigma, **cond)
        finally:
            hook.remove()
        assert torch.equal(ours[0], plain[0]) and (ours[1:] - ref[1:]).abs().max() < 1e-12
        assert (ours[1:] - plain[1:]).abs().max() > 1e-3
        assert torch.equal(guidance.tsg(den, 1.0)(x, sigma, **cond), plain)
        assert (guidance.tsg(den, 2.0)(x, sigma, **cond) - plain).abs().max() > 1e-4
    with pytest.raises(GuidelabError, match="noise_embed_offset must be"):
        den(x, sigma, **cond, noise_embed_offset=offset[:, :3])
