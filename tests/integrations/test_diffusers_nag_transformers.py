"""NAG on diffusers transformers: PixArt (its blocks' text cross-attention ``attn2``, the negative caption projected
as the prompt is) and FLUX (joint attention in double- and single-stream blocks, the official FLUX pipeline's rule),
each equal to a hand-written step of the official rule in float64; w = 1 bit-identical to the plain model; the main
and the negative rows in one call (counted); CFG in the same call (PixArt, FLUX, SD3)."""

import pytest
import torch

pytest.importorskip("diffusers")
import test_diffusers_hooks as th  # tests/integrations is on sys.path (rootdir imports)
import test_diffusers_pixart as pixart
import torch.nn.functional as F
from test_diffusers_nag import trim_adanorm_rows

from guidelab import guidance
from guidelab.errors import GuidelabError
from guidelab.guidance import registry
from guidelab.integrations import diffusers as gd
from guidelab.integrations.diffusers.guiders import nag

B, C, H = pixart.B, pixart.C, pixart.H


def _official_rule(zp, zn, scale, tau, alpha, order):
    """The official processors' NAG on [B, L, features]: extrapolate, clip the per-token norm ratio, blend."""
    g = zp * scale - zn * (scale - 1)
    norm_p = torch.norm(zp, p=order, dim=-1, keepdim=True).expand(*zp.shape)
    norm_g = torch.norm(g, p=order, dim=-1, keepdim=True).expand(*g.shape)
    r = norm_g / norm_p
    g = g * torch.minimum(r, r.new_ones(1) * tau) / r
    return g * alpha + zp * (1 - alpha)


# ---------------------------------------------------------------------------------------------
# PixArt.


class OfficialPixArtNAG:
    """The official cross-attention NAG step (``NAGAttnProcessor2_0``) on a PixArt ``attn2``, written out: the
    context rows [prompt; negative] (the negative caption-projected by the model, as the prompt is) with their
    masks as additive biases, the query tiled, one attention over 2B rows, then extrapolate / L1-clip / blend."""

    def __init__(self, neg_ctx, neg_bias, scale, tau, alpha):
        self.neg_ctx, self.neg_bias, self.scale, self.tau, self.alpha = neg_ctx, neg_bias, scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b = hidden_states.shape[0]
        ctx = torch.cat([encoder_hidden_states, self.neg_ctx])
        bias = attention_mask if self.neg_bias is None else self.neg_bias
        bias = torch.cat([attention_mask, bias])  # [2B, 1, L]
        d = attn.to_k.out_features // attn.heads
        q = attn.to_q(hidden_states).tile(2, 1, 1)
        q, k, v = (t.view(2 * b, -1, attn.heads, d).transpose(1, 2) for t in (q, attn.to_k(ctx), attn.to_v(ctx)))
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None]).transpose(1, 2).reshape(2 * b, -1, attn.heads * d)
        g = _official_rule(z[:b], z[b:], self.scale, self.tau, self.alpha, order=1)
        return attn.to_out[1](attn.to_out[0](g))


def _pixart(tmp_path, with_null_mask=True, kind="pixart"):
    emb, mask, null, null_mask = pixart._prompts()
    den = gd.load(
        pixart._save(tmp_path, kind), dtype=torch.float64, null_text=null, null_mask=null_mask if with_null_mask else None
    )
    cond = {"encoder_hidden_states": emb, gd.MASK: mask}
    x = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    return den, cond, x, null, null_mask if with_null_mask else None


def _official_pixart(den, x, sigma, cond, null, null_mask, scale, tau, alpha):
    """D of the PixArt model with the official step on every attn2 (the plain adapter call around it)."""
    net = den.model
    with torch.no_grad():
        neg_ctx = net.caption_projection(null.expand(B, -1, -1))
        neg_bias = None if null_mask is None else ((1 - null_mask.expand(B, -1).double()) * -10000.0).unsqueeze(1)
        saved = dict(net.attn_processors)
        ref = OfficialPixArtNAG(neg_ctx, neg_bias, scale, tau, alpha)
        net.set_attn_processor({n: ref if "attn2" in n else p for n, p in saved.items()})
        try:
            return den(x, sigma, **cond)
        finally:
            net.set_attn_processor(dict(saved))


@pytest.mark.parametrize(
    "scale,tau,alpha,with_null_mask,kind",
    [(3.0, 2.5, 0.5, True, "pixart"), (5.0, 1.2, 0.25, False, "pixart"), (4.0, 2.0, 1.0, True, "legacy")],
)
def test_nag_on_pixart_equals_the_official_processor_step(tmp_path, scale, tau, alpha, with_null_mask, kind):
    """PixArt: D of gd.nag equals the model with the official cross-attention step on every attn2 (negative caption
    through the caption projection, with its own mask or, without null_mask, the prompt's) to 1e-10; w = 1 is the
    plain model bit for bit; one call of B rows; the guided result differs from the plain model."""
    den, cond, x, null, null_mask = _pixart(tmp_path, with_null_mask, kind)
    sigma = den.grid[[400, 700]]
    calls = pixart._count_calls(den.model)
    with torch.no_grad():
        plain = den(x, sigma, **cond)
        calls.clear()
        assert torch.equal(nag(den, 1.0)(x, sigma, **cond), plain)
        ours = nag(den, scale, tau=tau, alpha=alpha)(x, sigma, **cond)
        assert calls == [B, B]
    saved = dict(den.model.attn_processors)
    ref = _official_pixart(den, x, sigma, cond, null, null_mask, scale, tau, alpha)
    assert (ours - ref).abs().max() < 1e-10
    assert (ours - plain).abs().max() > 1e-3
    assert den.model.attn_processors == saved


def test_nag_on_pixart_with_cfg_in_one_call(tmp_path):
    """PixArt NAG + CFG: D_u + g (D_nag - D_u) in one call of 2B rows (D_u: the plain model on the negative prompt
    and mask), equal to the official step to 1e-10; w = 1 with cfg_weight is plain CFG bit for bit; cfg_weight = 1 is
    NAG alone bit for bit; a layer selection acts on those layers only; the registry builds the same guider."""
    den, cond, x, null, null_mask = _pixart(tmp_path)
    sigma = den.grid[[500, 500]]
    calls = pixart._count_calls(den.model)
    with torch.no_grad():
        calls.clear()
        ours = nag(den, 3.0, cfg_weight=4.0)(x, sigma, **cond)
        assert calls == [2 * B]
        plain_cfg = guidance.cfg(den, 4.0)(x, sigma, **cond)
        assert torch.equal(nag(den, 1.0, cfg_weight=4.0)(x, sigma, **cond), plain_cfg)
        alone = nag(den, 3.0)(x, sigma, **cond)
        assert torch.equal(nag(den, 3.0, cfg_weight=1.0)(x, sigma, **cond), alone)
        uncond = den(x, sigma, encoder_hidden_states=null.expand(B, -1, -1), **{gd.MASK: null_mask.expand(B, -1)})
        built = registry.build("nag", registry.Context(den, w=3.0, options=["tau=2.5", "alpha=0.5", "cfg_weight=4.0"]))
        assert torch.equal(built(x, sigma, **cond), ours)
        one = nag(den, 3.0, layers=["transformer_blocks.1"])(x, sigma, **cond)
    ref_nag = _official_pixart(den, x, sigma, cond, null, null_mask, 3.0, 2.5, 0.5)
    ref = uncond + 4.0 * (ref_nag - uncond)
    assert (ours - ref).abs().max() < 1e-10 and (ours - plain_cfg).abs().max() > 1e-4
    assert (one - alone).abs().max() > 1e-6 and (one - den(x, sigma, **cond)).abs().max() > 1e-6


def test_nag_on_pixart_misuse_is_refused(tmp_path):
    """No negative prompt, an unknown layer, a tensor w: one-line errors."""
    den, cond, x, null, null_mask = _pixart(tmp_path)
    with pytest.raises(GuidelabError, match="negative prompt embedding"):
        nag(gd.load(pixart._save(tmp_path / "n"), dtype=torch.float64), 3.0)
    with pytest.raises(GuidelabError, match="no layer"):
        nag(den, 3.0, layers=["nope"])
    with pytest.raises(GuidelabError, match="finite number"):
        nag(den, torch.tensor([2.0, 3.0]))


# ---------------------------------------------------------------------------------------------
# FLUX.


class OfficialFluxNAG:
    """The official FLUX NAG attention step (``NAGFluxAttnProcessor2_0``), written out: double-stream: image rows B,
    text rows [prompt; negative] (2B), the image q, k, v tiled, attention per half, the image outputs combined by
    NAG with the L2 norm (``guide=False``: the prompt half's image output, a plain layer of the official structure),
    both text halves kept; single-stream: rows [prompt; negative] of [text; image], NAG on the image tokens, the
    combined output written into both halves."""

    def __init__(self, scale, tau, alpha, n_txt, guide=True):
        self.scale, self.tau, self.alpha, self.n_txt, self.guide = scale, tau, alpha, n_txt, guide

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(t):
            return t.unflatten(-1, (attn.heads, attn.head_dim))

        double = encoder_hidden_states is not None
        h = hidden_states.tile(2, 1, 1) if double else hidden_states
        q, k, v = heads(attn.to_q(h)), heads(attn.to_k(h)), heads(attn.to_v(h))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if double:
            e = encoder_hidden_states
            eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            q, k, v = torch.cat([attn.norm_added_q(eq), q], 1), torch.cat([attn.norm_added_k(ek), k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        b = q.shape[0] // 2
        halves = [F.scaled_dot_product_attention(q[s], k[s], v[s]) for s in (slice(0, b), slice(b, None))]
        zp, zn = (z.transpose(1, 2).flatten(2) for z in halves)
        n = self.n_txt
        img = _official_rule(zp[:, n:], zn[:, n:], self.scale, self.tau, self.alpha, order=2) if self.guide else zp[:, n:]
        if double:
            ctx = torch.cat([zp[:, :n], zn[:, :n]])
            return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(ctx)
        return torch.cat([torch.cat([zp[:, :n], img], 1), torch.cat([zn[:, :n], img], 1)])


def _official_flux(net, velocity, x, sigma, cond, nemb, npooled, scale, tau, alpha, guided, monkeypatch):
    """D of the official FLUX NAG pipeline step: text / pooled rows [prompt; negative], timestep 2B, the image stream
    B rows in the double-stream blocks (AdaLayerNorms truncated to their input's rows, as its pipeline patches
    them), tiled before the single-stream blocks, its prompt half kept at the end; ``guided``: attention names
    with the NAG step (the others: the official structure without NAG)."""
    from diffusers.models import normalization

    zero, cont = normalization.AdaLayerNormZero.forward, normalization.AdaLayerNormContinuous.forward
    with monkeypatch.context() as mp:
        mp.setattr(
            normalization.AdaLayerNormZero,
            "forward",
            lambda self, h, timestep=None, class_labels=None, hidden_dtype=None, emb=None: zero(
                self, h, timestep, class_labels, hidden_dtype, emb=emb[: h.shape[0]]
            ),
        )
        mp.setattr(normalization.AdaLayerNormContinuous, "forward", lambda self, h, c: cont(self, h[:B], c[:B]))
        saved = dict(net.attn_processors)
        procs = {}
        for name in saved:
            single = name.startswith("single")
            on = name.rsplit(".processor", 1)[0] in guided
            procs[name] = OfficialFluxNAG(scale, tau, alpha, th.FLUX_TXT, guide=on)
            if single and not on:  # a plain single-stream layer: each half attends as usual
                procs[name] = saved[name]
        net.set_attn_processor(procs)
        first = net.single_transformer_blocks[0]
        tile = first.register_forward_pre_hook(
            lambda m, a, kw: (a, {**kw, "hidden_states": kw["hidden_states"].tile(2, 1, 1)}), with_kwargs=True
        )
        try:
            t = sigma / (1 + sigma)
            x_t = x / (1 + sigma.view(-1, 1, 1))
            both = {
                "encoder_hidden_states": torch.cat([cond["encoder_hidden_states"], nemb.expand(B, -1, -1)]),
                "pooled_projections": torch.cat([cond["pooled_projections"], npooled.expand(B, -1)]),
            }
            with torch.no_grad():
                v = velocity(x_t, (t * 1000).float().repeat(2), **both)
        finally:
            tile.remove()
            net.set_attn_processor(dict(saved))
    return x_t - t.view(-1, 1, 1) * v


def _flux():
    net, den, cond, velocity, x, sigma = th._flux()
    over = den.condition.null
    nemb = over["encoder_hidden_states"](torch.zeros(1, 1, 1))
    npooled = over["pooled_projections"](torch.zeros(1, 1))
    return net, den, cond, velocity, x, sigma, nemb, npooled


ALL_FLUX = [f"transformer_blocks.{i}.attn" for i in range(2)] + [f"single_transformer_blocks.{i}.attn" for i in range(2)]


@pytest.mark.parametrize(
    "scale,tau,alpha,layers,guided",
    [
        (4.0, 2.5, 0.25, None, ALL_FLUX),
        (5.0, 1.1, 0.5, None, ALL_FLUX),
        (3.0, 2.5, 0.25, ["single_transformer_blocks.1", "^transformer_blocks.0"], [ALL_FLUX[0], ALL_FLUX[3]]),
    ],
)
def test_nag_on_flux_equals_the_official_step(monkeypatch, scale, tau, alpha, layers, guided):
    """FLUX: NAG equals the official pipeline's step (negative text and pooled rows, L2 rule on the image tokens of
    every double- and single-stream attention; with a layer selection the official structure, its NAG step on the
    selected layers only) to 1e-10 in float64; w = 1 is the plain model bit for bit; one call of 2B rows."""
    net, den, cond, velocity, x, sigma, nemb, npooled = _flux()
    calls = []
    net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        plain = den(x, sigma, **cond)
        assert torch.equal(nag(den, 1.0)(x, sigma, **cond), plain)
        calls.clear()
        ours = nag(den, scale, tau=tau, alpha=alpha, layers=layers)(x, sigma, **cond)
        assert calls == [2 * B]
    ref = _official_flux(net, velocity, x, sigma, cond, nemb, npooled, scale, tau, alpha, guided, monkeypatch)
    assert (ours - ref).abs().max() < 1e-10, (ours - ref).abs().max()
    assert (ref - plain).abs().max() > 1e-3
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in net.attn_processors.values())


def test_nag_on_flux_reachable_and_misuse_refused():
    """The registry's nag on a FLUX FlowDenoiser is gd.nag; a NaN cfg_weight, a missing pooled negative and an
    unknown layer are one-line errors."""
    from guidelab.guidance.protocols import Condition
    from guidelab.integrations.diffusers import flow

    net, den, cond, velocity, x, sigma, nemb, npooled = _flux()
    with torch.no_grad():
        built = registry.build("nag", registry.Context(den, w=4.0, options=["tau=2.0", "alpha=0.25"]))
        assert torch.equal(built(x, sigma, **cond), nag(den, 4.0, tau=2.0, alpha=0.25)(x, sigma, **cond))
    with pytest.raises(GuidelabError, match="cfg_weight must be a finite number"):
        nag(den, 4.0, cfg_weight=float("nan"))
    only_text = Condition("encoder_hidden_states", {"encoder_hidden_states": den.condition.null["encoder_hidden_states"]})
    with pytest.raises(GuidelabError, match="pooled_projections"):
        nag(flow.FlowDenoiser(velocity, dtype=torch.float64, condition=only_text, model=net), 4.0)
    with pytest.raises(GuidelabError, match="no layer"):
        nag(den, 4.0, layers=["nope"])


def test_nag_with_cfg_on_flux_in_one_call(monkeypatch):
    """FLUX NAG + CFG: one call of 3B rows ([prompt; negative; unconditional]), D_u + g (D_nag - D_u) with D_nag the
    official FLUX NAG step and D_u the plain model on the negative prompt (the official FLUX pipeline runs no true
    CFG with NAG: its natural extension) to 1e-10; w = 1 with cfg_weight is plain CFG bit for bit, cfg_weight = 1 is
    NAG alone bit for bit."""
    net, den, cond, velocity, x, sigma, nemb, npooled = _flux()
    calls = []
    net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        ours = nag(den, 4.0, tau=2.5, alpha=0.25, cfg_weight=3.0)(x, sigma, **cond)
        assert calls == [3 * B]
        assert torch.equal(nag(den, 1.0, cfg_weight=3.0)(x, sigma, **cond), guidance.cfg(den, 3.0)(x, sigma, **cond))
        alone = nag(den, 4.0, tau=2.5, alpha=0.25)(x, sigma, **cond)
        assert torch.equal(nag(den, 4.0, tau=2.5, alpha=0.25, cfg_weight=1.0)(x, sigma, **cond), alone)
        uncond = den(x, sigma, encoder_hidden_states=nemb.expand(B, -1, -1), pooled_projections=npooled.expand(B, -1))
    ref_nag = _official_flux(net, velocity, x, sigma, cond, nemb, npooled, 4.0, 2.5, 0.25, ALL_FLUX, monkeypatch)
    ref = uncond + 3.0 * (ref_nag - uncond)
    assert (ours - ref).abs().max() < 1e-10 and (ours - alone).abs().max() > 1e-3


class OfficialJointNAGCFG:
    """The official SD3 joint-attention NAG step with CFG, written out: image rows [uncond; cond] (2B), text rows
    [negative; prompt; negative] (3B); the cond image q, k, v repeated for the third block, one joint attention over
    3B rows, NAG (with its 1e-7 guards) on the cond rows' image outputs; image output [uncond; guided]."""

    def __init__(self, scale, tau, alpha):
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b2, L = hidden_states.shape[:2]
        n, b = encoder_hidden_states.shape[0], hidden_states.shape[0] // 2
        d = attn.to_k.out_features // attn.heads

        def heads(t, rows):
            return t.view(rows, -1, attn.heads, d).transpose(1, 2)

        q, k, v = (heads(f(hidden_states), b2) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k, v = (torch.cat([t, t[b : 2 * b]]) for t in (q, k, v))
        eq, ek, ev = (heads(f(encoder_hidden_states), n) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        z = F.scaled_dot_product_attention(torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2))
        z = z.transpose(1, 2).reshape(n, -1, attn.heads * d)
        hs, ehs = z[:, :L], z[:, L:]
        if not attn.context_pre_only:
            ehs = attn.to_add_out(ehs)
        zp, zn = hs[b : 2 * b], hs[2 * b :]
        g = zp * self.scale - zn * (self.scale - 1)
        np_ = torch.norm(zp, p=1, dim=-1, keepdim=True).expand(*zp.shape)
        ng = torch.norm(g, p=1, dim=-1, keepdim=True).expand(*g.shape)
        r = ng / (np_ + 1e-7)
        g = g * torch.minimum(r, r.new_ones(1) * self.tau) / (r + 1e-7)
        hs = torch.cat([hs[:b], g * self.alpha + zp * (1 - self.alpha)])
        return attn.to_out[1](attn.to_out[0](hs)), ehs


def test_nag_with_cfg_on_sd3_equals_the_official_step(monkeypatch):
    """SD3 NAG + CFG: one call of 3B rows, equal to the official SD3 pipeline's step at guidance_scale > 1 (text
    [negative; prompt; negative], pooled [negative; prompt; prompt], image [uncond; cond], AdaLayerNorms truncated
    to each stream's rows) to 1e-10."""

    net, den, cond, (nemb, npooled), x, sigma = th._sd3()
    emb, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
    calls = []
    net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        ours = nag(den, 4.0, tau=2.5, alpha=0.25, cfg_weight=3.0)(x, sigma, **cond)
        assert calls == [3 * B]
        alone = nag(den, 4.0, tau=2.5, alpha=0.25)(x, sigma, **cond)
    trim_adanorm_rows(monkeypatch)
    saved = dict(net.attn_processors)
    net.set_attn_processor({k: OfficialJointNAGCFG(4.0, 2.5, 0.25) for k in saved})
    t = sigma / (1 + sigma)
    x_t = x / (1 + sigma.view(-1, 1, 1, 1))
    with torch.no_grad():
        v = net(
            hidden_states=torch.cat([x_t, x_t]),
            timestep=(t * 1000).float().repeat(3),
            encoder_hidden_states=torch.cat([nemb, emb, nemb]),
            pooled_projections=torch.cat([npooled, pooled, pooled]),
            return_dict=False,
        )[0]
    net.set_attn_processor(dict(saved))
    v_u, v_c = v.chunk(2)
    ref = x_t - t.view(-1, 1, 1, 1) * (v_u + 3.0 * (v_c - v_u))
    assert (ours - ref).abs().max() < 1e-10 and (ours - alone).abs().max() > 1e-3
