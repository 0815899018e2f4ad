"""NAG (normalized attention guidance) on diffusers cross-attention: equal to a hand-written copy of the official
processor's step (its SDXL ``NAGAttnProcessor2_0``: the negative context as extra rows of every ``attn2``), w = 1
bit-identical to the plain model, misuse refused, and reachable from the registry / ``generate``."""

import pytest
import torch

pytest.importorskip("diffusers")
import test_diffusers as base  # tests/integrations is on sys.path (rootdir imports)
import torch.nn.functional as F

from guidelab.app.diffusers_generate import generate
from guidelab.errors import GuidelabError
from guidelab.guidance import registry
from guidelab.integrations import diffusers as gd
from guidelab.integrations.diffusers.guiders import nag

B, C, H = base.B, base.C, base.H


class OfficialNAG:
    """The official NAG cross-attention step, written out: hidden states of B rows, context [positive; negative]
    (2B rows; with CFG: hidden [uncond; cond], context [negative; positive; negative]); the query tiled, one
    attention over all context rows, then extrapolate / L1-clip / blend."""

    def __init__(self, scale, tau, alpha):
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b = hidden_states.shape[0]
        if encoder_hidden_states is None:  # attn1: plain self-attention
            encoder_hidden_states = hidden_states
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        n = encoder_hidden_states.shape[0]
        o = n - b  # the original batch
        if n == 2 * b:
            q = q.tile(2, 1, 1)
        elif n > b:
            q = torch.cat([q, q[o : 2 * o]])
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(n, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        z = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, attn.heads * d)
        if n > b:
            zp, zn = (z[:o], z[-o:]) if n == 2 * b else (z[o : 2 * o], z[-o:])
            g = zp * self.scale - zn * (self.scale - 1)
            np_ = torch.norm(zp, p=1, dim=-1, keepdim=True).expand(*zp.shape)
            ng = torch.norm(g, p=1, dim=-1, keepdim=True).expand(*g.shape)
            r = ng / np_
            g = g * torch.minimum(r, r.new_ones(1) * self.tau) / r
            g = g * self.alpha + zp * (1 - self.alpha)
            z = g if n == 2 * b else torch.cat([z[:o], g])
        return attn.to_out[1](attn.to_out[0](z))


def _text_model(tmp_path):
    g = torch.Generator().manual_seed(3)
    null = torch.randn(1, 4, 16, generator=g, dtype=torch.float64)
    folder = base._save(tmp_path, "text_unet")
    den = gd.load(folder, dtype=torch.float64, null_text=null)
    emb = torch.randn(B, 4, 16, generator=g, dtype=torch.float64)
    return folder, den, emb, null


@pytest.mark.parametrize("scale,tau,alpha", [(3.0, 2.5, 0.5), (5.0, 1.2, 0.25), (2.0, 100.0, 1.0)])
def test_nag_equals_the_official_processor_step(tmp_path, scale, tau, alpha):
    """At a grid timestep, D of gd.nag equals x - sigma eps of the UNet run with the official step on every attn2
    (the clipping active at tau 1.2 and 2.5, inactive at 100); the guided result differs from the plain model."""
    _, den, emb, null = _text_model(tmp_path)
    unet = den.model
    sigma = den.grid[[400, 700]]
    x = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    with torch.no_grad():
        ours = nag(den, scale, tau=tau, alpha=alpha)(x, sigma, encoder_hidden_states=emb)
        plain = den(x, sigma, encoder_hidden_states=emb)
        saved = dict(unet.attn_processors)
        unet.set_attn_processor({n: OfficialNAG(scale, tau, alpha) if "attn2" in n else p for n, p in saved.items()})
        s = sigma.view(-1, 1, 1, 1)
        eps = unet(
            x / (1 + s**2).sqrt(), torch.tensor([400, 700]), encoder_hidden_states=torch.cat([emb, null.expand(B, -1, -1)])
        )
        unet.set_attn_processor(dict(saved))
    ref = x - s * eps.sample
    assert (ours - ref).abs().max() < 1e-10
    assert (ours - plain).abs().max() > 1e-3
    assert unet.attn_processors == saved


def test_nag_neutral_one_call_and_errors(tmp_path):
    """w = 1 is the plain model bit for bit (one call, no extra attention); w != 1 is one call of B rows; no null
    text, a class model, an unknown layer, cfg_weight and a tensor w are one-line errors (PixArt and FLUX:
    test_diffusers_nag_transformers.py)."""
    folder, den, emb, null = _text_model(tmp_path)
    x = torch.randn(B, C, H, H, dtype=torch.float64)
    sigma = torch.full((B,), 2.0, dtype=torch.float64)
    calls = base._count_calls(den.model)
    with torch.no_grad():
        plain = den(x, sigma, encoder_hidden_states=emb)
        calls.clear()
        assert torch.equal(nag(den, 1.0)(x, sigma, encoder_hidden_states=emb), plain)
        assert calls == [B]
        calls.clear()
        nag(den, 4.0)(x, sigma, encoder_hidden_states=emb)
        assert calls == [B]
        g = registry.build("nag", registry.Context(den, w=4.0, options=["tau=2.0", "alpha=0.3"]))
        assert torch.equal(
            g(x, sigma, encoder_hidden_states=emb), nag(den, 4.0, tau=2.0, alpha=0.3)(x, sigma, encoder_hidden_states=emb)
        )
    with pytest.raises(GuidelabError, match="negative prompt embedding"):
        nag(gd.load(folder, dtype=torch.float64), 3.0)
    with pytest.raises(GuidelabError, match="text-conditioned"):
        nag(gd.load(base._save(tmp_path, "unet"), dtype=torch.float64), 3.0)
    with pytest.raises(GuidelabError, match="no layer"):
        nag(den, 3.0, layers=["nope"])
    with pytest.raises(GuidelabError, match="cfg_weight must be a finite number"):
        nag(den, 3.0, cfg_weight=float("nan"))
    with pytest.raises(GuidelabError, match="finite number"):
        nag(den, torch.tensor([2.0, 3.0]))


def test_generate_with_nag(tmp_path):
    """``guidelab diffusers``' generate builds nag from the registry; the negative prompt is null_text."""
    folder, den, emb, null = _text_model(tmp_path)
    kw = dict(prompt_embeds=emb[:1], null_text=null, steps=3, seeds=[0, 1], dtype="float64", block=2)
    x = generate(folder, guider="nag", w=4.0, guider_options=["tau=2.5"], **kw)
    plain = generate(folder, guider="none", **kw)
    assert x.shape == (2, C, H, H) and torch.isfinite(x).all() and (x - plain).abs().max() > 1e-4
    assert torch.equal(generate(folder, guider="nag", w=1.0, **kw), plain)
    mid = generate(folder, guider="nag", w=4.0, layers=["mid_block"], **kw)  # one cross-attention only
    assert (mid - x).abs().max() > 1e-6 and (mid - plain).abs().max() > 1e-6
    with_cfg = generate(folder, guider="nag", w=4.0, cfg_weight=2.0, **kw)
    assert (with_cfg - x).abs().max() > 1e-6
    with pytest.raises(GuidelabError, match="cfg_weight combines CFG"):
        generate(folder, guider="icg", w=4.0, cfg_weight=2.0, **kw)


class OfficialJointNAG:
    """The official SD3 NAG joint-attention step, written out: image rows B, text rows [prompt; negative] (2B); the
    image q, k, v tiled, one joint attention over 2B rows, NAG (with its 1e-7 guards) on the image outputs."""

    def __init__(self, scale, tau, alpha):
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b, L = hidden_states.shape[:2]
        n = encoder_hidden_states.shape[0]
        d = attn.to_k.out_features // attn.heads

        def heads(t, rows):
            return t.view(rows, -1, attn.heads, d).transpose(1, 2)

        q, k, v = (heads(f(hidden_states), b).tile(n // b, 1, 1, 1) for f in (attn.to_q, attn.to_k, attn.to_v))
        eq, ek, ev = (heads(f(encoder_hidden_states), n) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        z = F.scaled_dot_product_attention(torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2))
        z = z.transpose(1, 2).reshape(n, -1, attn.heads * d)
        hs, ehs = z[:, :L], z[:, L:]
        if not attn.context_pre_only:
            ehs = attn.to_add_out(ehs)
        if n == 2 * b:
            zp, zn = hs[:b], hs[b:]
            g = zp * self.scale - zn * (self.scale - 1)
            np_ = torch.norm(zp, p=1, dim=-1, keepdim=True).expand(*zp.shape)
            ng = torch.norm(g, p=1, dim=-1, keepdim=True).expand(*g.shape)
            r = ng / (np_ + 1e-7)
            g = g * torch.minimum(r, r.new_ones(1) * self.tau) / (r + 1e-7)
            hs = g * self.alpha + zp * (1 - self.alpha)
        return attn.to_out[1](attn.to_out[0](hs)), ehs


def test_nag_on_sd3_joint_attention_equals_the_official_step(monkeypatch):
    """SD3: NAG equals the official pipeline's step (text stream [prompt; negative] with the prompt's pooled
    projection, its AdaLayerNorms truncated to each stream's rows, the written-out joint processor on every
    block) to 1e-10 in float64; w = 1 is the plain model bit for bit; one call of 2B rows."""
    import test_diffusers_hooks as th

    net, den, cond, (nemb, _), x, sigma = th._sd3()
    emb, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
    calls = []
    net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        plain = den(x, sigma, **cond)
        assert torch.equal(nag(den, 1.0)(x, sigma, **cond), plain)
        calls.clear()
        ours = nag(den, 4.0, tau=2.5, alpha=0.25)(x, sigma, **cond)
        assert calls == [2 * B]
        trim_adanorm_rows(monkeypatch)
        saved = dict(net.attn_processors)
        net.set_attn_processor({k: OfficialJointNAG(4.0, 2.5, 0.25) for k in saved})
        t = sigma / (1 + sigma)
        x_t = x / (1 + sigma.view(-1, 1, 1, 1))
        v = net(
            hidden_states=x_t,
            timestep=(t * 1000).float().repeat(2),
            encoder_hidden_states=torch.cat([emb, nemb]),
            pooled_projections=torch.cat([pooled, pooled]),
            return_dict=False,
        )[0]
        net.set_attn_processor(dict(saved))
    ref = x_t - t.view(-1, 1, 1, 1) * v
    assert (ours - ref).abs().max() < 1e-10 and (ref - plain).abs().max() > 1e-3


def test_nag_with_cfg_equals_the_official_step_in_one_call(tmp_path):
    """NAG + CFG (the official pipelines at guidance_scale > 1): D_u + g (D_nag - D_u) in one call of 2B rows, equal
    to the official step ([uncond; cond] hidden rows, [negative; prompt; negative] context) to 1e-10; nag at
    w = 1 with cfg_weight is plain CFG bit for bit; cfg_weight = 1 is NAG alone bit for bit."""
    from guidelab import guidance

    _, den, emb, null = _text_model(tmp_path)
    unet = den.model
    sigma = den.grid[[500, 500]]
    s = sigma.view(-1, 1, 1, 1)
    x = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    calls = base._count_calls(unet)
    with torch.no_grad():
        calls.clear()
        ours = nag(den, 3.0, cfg_weight=4.0)(x, sigma, encoder_hidden_states=emb)
        assert calls == [2 * B]
        plain_cfg = guidance.cfg(den, 4.0)(x, sigma, encoder_hidden_states=emb)
        assert torch.equal(nag(den, 1.0, cfg_weight=4.0)(x, sigma, encoder_hidden_states=emb), plain_cfg)
        alone = nag(den, 3.0)(x, sigma, encoder_hidden_states=emb)
        assert torch.equal(nag(den, 3.0, cfg_weight=1.0)(x, sigma, encoder_hidden_states=emb), alone)
        saved = dict(unet.attn_processors)
        unet.set_attn_processor({n: OfficialNAG(3.0, 2.5, 0.5) if "attn2" in n else p for n, p in saved.items()})
        neg = null.expand(B, -1, -1)
        eps = unet(
            torch.cat([x, x]) / (1 + s.repeat(2, 1, 1, 1) ** 2).sqrt(),
            torch.tensor(500),
            encoder_hidden_states=torch.cat([neg, emb, neg]),
        ).sample
        unet.set_attn_processor(dict(saved))
    eps_u, eps_c = eps.chunk(2)
    ref = x - s * (eps_u + 4.0 * (eps_c - eps_u))
    assert (ours - ref).abs().max() < 1e-10 and (ours - plain_cfg).abs().max() > 1e-4


def trim_adanorm_rows(monkeypatch):
    """The official joint NAG step runs B image rows against 2B text rows ([prompt; negative]) with a 2B
    timestep: each adaptive norm takes the leading rows of its conditioning, as many as its input has."""
    from diffusers.models import normalization

    zero, cont = normalization.AdaLayerNormZero.forward, normalization.AdaLayerNormContinuous.forward
    monkeypatch.setattr(
        normalization.AdaLayerNormZero,
        "forward",
        lambda self, h, timestep=None, class_labels=None, hidden_dtype=None, emb=None: zero(
            self, h, timestep, class_labels, hidden_dtype, emb=emb[: h.shape[0]]
        ),
    )
    monkeypatch.setattr(normalization.AdaLayerNormContinuous, "forward", lambda self, h, c: cont(self, h, c[: h.shape[0]]))
