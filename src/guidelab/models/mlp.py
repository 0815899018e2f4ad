"""Small MLP denoisers for low-dimensional data (the exact worlds of :mod:`guidelab.toy`).

Two outputs share one magnitude-preserving trunk (EDM2, Karras et al. 2024a):

* ``output="energy"`` -- the autoguidance paper's toy model (Karras et al. 2024b, methods.md §2.3):
  the net is an unnormalised log-density ``log p(x; sigma) = gain * mean(y^2) / sigma - |x~|^2 / 2``,
  ``x~ = x / sqrt(sd^2 + sigma^2)``, ``y`` the trunk's output; the score is its autograd gradient
  and ``D = x + sigma^2 grad_x log p`` (Tweedie). ``gain = 0`` at init: a Gaussian of std
  ``sqrt(sd^2 + sigma^2)``.
* ``output="denoiser"`` -- a plain MLP ``F`` under EDM preconditioning (EDM Table 1):
  ``D = c_skip x + c_out F(c_in x; c_noise)``, ``F = gain * Linear(SiLU(y))`` with ``gain = 0`` at
  init (so ``D = c_skip x``, the best linear denoiser for data of std ``sd``).

Trunk input features: ``[c_in x, c_noise = log(sigma) / 4, 1, one_hot(label)]``; ``c_noise`` is
left out when ``noise_cond=False`` (a noise-unconditional network: the preconditioning still uses
sigma, the network does not see it). Labels are integers in ``[0, num_classes]``; ``num_classes``
is the null label (``label=None`` means null), declared to guiders as ``condition``.
``noise_embed_offset`` (optional) is the hook of time-step guidance (``guidance.tsg``) and never
touches the preconditioning: a [batch] offset is added to the scalar ``c_noise``; a [batch, hidden]
offset is added to the noise *embedding vector*, the first layer's image of ``c_noise``
(``W_0[:, c] c_noise``, added to that layer's output), the analogue of the
time-embedding vector the TSG paper perturbs (``noise_embed_dim = hidden``).
``extra_scalar`` (e.g. ``"w"``, as in :class:`guidelab.models.image.PixelMLP`) names one more per-sample
scalar input, passed as a keyword (``net(x, sigma, w=w)``, a number or a [batch] tensor) and appended
to the trunk features as is: the guidance weight of a distilled student (``training.distill``).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..denoisers import Condition, EDMPrecond, bcast
from ..errors import as_sigma, check
from ._common import check_extra_scalar, one_hot_label
from .registry import register

#: A label argument: [batch] integers, one integer for all, or None (the null label).
Label = torch.Tensor | int | None


def mp_normalize(w: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Scale each row of ``w`` [out, in] to unit RMS: ``w_i / (eps + |w_i| / sqrt(in))`` (EDM2)."""
    norm = torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=torch.promote_types(w.dtype, torch.float32))
    return w / (eps + norm / math.sqrt(w.shape[1])).to(w.dtype)


class MPLinear(nn.Module):
    """Magnitude-preserving bias-free linear layer: unit-norm weight rows, so unit-variance in, unit out.

    While training the stored weight is itself renormalised before use ("forced weight
    normalisation", EDM2), which keeps the effective learning rate constant.
    """

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in))

    def effective_weight(self) -> torch.Tensor:
        """The weight actually applied, ``normalize(W) / sqrt(fan_in)`` (unit-norm rows)."""
        if self.training:
            with torch.no_grad():
                self.weight.copy_(mp_normalize(self.weight))
        return mp_normalize(self.weight) / math.sqrt(self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.effective_weight().t()


def _offset(
    c_noise: torch.Tensor, noise_embed_offset: torch.Tensor | None, hidden: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply the TSG perturbation: ``(c_noise', embedding offset)``.

    ``None``: unchanged; [batch] (or [batch, 1]): ``c_noise + offset``; [batch, hidden]: ``c_noise``
    unchanged and the offset returned, to be added to the first layer's output (the noise embedding).
    """
    if noise_embed_offset is None:
        return c_noise, None
    off = noise_embed_offset
    if off.ndim == 2 and off.shape[1] == hidden and hidden > 1:
        check(off.shape[0] == c_noise.shape[0], f"noise_embed_offset must have batch {c_noise.shape[0]}, got {list(off.shape)}")
        return c_noise, off
    check(
        off.numel() == c_noise.numel(),
        f"noise_embed_offset must be [batch]={list(c_noise.shape)} or [batch, hidden]=[{c_noise.shape[0]}, {hidden}], "
        f"got {list(off.shape)}",
    )
    return c_noise + off.reshape(c_noise.shape), None


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by 0.596, its RMS for unit-normal input, so magnitudes are kept (EDM2)."""
    return nn.functional.silu(x) / 0.596


def _dsilu(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``silu'(h) = s + h s (1 - s) = s + silu(h) (1 - s)`` from ``a = silu(h)``, ``s = sigmoid(h)`` (one new
    tensor; the training path and the explicit pass share it, so the two agree bit for bit)."""
    return torch.addcmul(a, a, s, value=-1).add_(s)


def _silu_parts(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, silu(h), silu'(h))`` with ``s = sigmoid(h)``, ``p = s (1 - s)``, ``silu'(h) = s + h p``;
    3 new tensors and 2 in-place passes (``silu' = s + silu(h) (1 - s)``, then ``p`` in ``s``'s place)."""
    s = torch.sigmoid(h)
    a = h * s
    d = _dsilu(a, s)
    return s.addcmul_(s, s, value=-1), a, d


class _EnergyScore(torch.autograd.Function):
    """The energy model's score (ToyMLP.score's explicit pass) with a hand-written backward to ``gain`` and
    the effective weights ``w`` (MP-SiLU's 1/0.596 folded into ``w[1:]``). Used while training: features,
    sigma and x do not require grad; gradients to them are not computed (``once_differentiable``).

    Forward (rows are samples): ``h_0 = f W_0^T``, ``h_l = silu(h_{l-1}) W_l^T``, ``g_L = h_L``,
    ``g_{l-1} = (g_l W_l) * silu'(h_{l-1})``, ``score = (c g_0 W_0[:, :dim] - x_in) / r``,
    ``c = 2 gain / (hidden sigma)``. The backward is that chain's adjoint, with ``silu''(h) = s (1 - s) (2 +
    h (1 - 2 s)) = p (2 + h - 2 silu(h))`` for the dependence of ``silu'(h_{l-1})`` on ``h_{l-1}``. Saved
    tensors are never written (a second backward with ``retain_graph`` stays right); temporaries go to three
    reused scratch buffers (fresh [batch, hidden] outputs cost ~2x a pass over memory already in cache).
    """

    @staticmethod
    def forward(ctx: Any, f: Tensor, x_in: Tensor, r: Tensor, sigma: Tensor, gain: Tensor, dim: int, *w: Tensor) -> Tensor:
        hidden, L = w[0].shape[0], len(w) - 1
        # x @ W^T with a transposed view is ~1.5x slower than with a contiguous W^T (64 x 64 on one core)
        wt = [wl.t().contiguous() for wl in w]
        h = f @ wt[0]
        pre, sp, act, dsilu = [], [], [], []
        for k in range(1, L + 1):
            p, a, d = _silu_parts(h)
            pre.append(h)
            sp.append(p)
            act.append(a)
            dsilu.append(d)
            h = a @ wt[k]
        g = h
        gs, us = [g], []  # g_L, ..., g_0 and u_k = g_k W_k, in the order computed
        for k in range(L, 0, -1):
            u = g @ w[k]
            g = u * dsilu[k - 1]
            us.append(u)
            gs.append(g)
        # [batch, hidden] x [hidden, dim] taken as ([dim, hidden] x [hidden, batch])^T: ~5x faster (dim = 2)
        w0x = w[0][:, :dim].t().contiguous()  # [dim, hidden]
        gx = torch.mm(w0x, g.t()).t()
        out = ((2 * gain / hidden) / sigma[:, None] * gx - x_in) / r
        ctx.dim, ctx.depth = dim, L
        ctx.save_for_backward(f, r, sigma, gain, gx, w0x, *w, *wt, *pre, *sp, *act, *dsilu, *gs, *us)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        L, dim = ctx.depth, ctx.dim
        f, r, sigma, gain, gx, w0x, *rest = ctx.saved_tensors
        w, wt, rest = rest[: L + 1], rest[L + 1 : 2 * L + 2], rest[2 * L + 2 :]
        pre, sp, act, dsilu = (rest[k * L : (k + 1) * L] for k in range(4))
        gs, us = rest[4 * L : 5 * L + 1], rest[5 * L + 1 :]
        hidden = w[0].shape[0]
        gr = grad * ((2 / hidden) / sigma[:, None]) / r  # d score / d (gain gx)
        d_gain = (gr * gx).sum().reshape(gain.shape)
        q = gr * gain  # d score / d gx
        dW: list[Tensor] = [q] * (L + 1)  # (placeholders)
        gg = q @ w0x  # adjoint of g_0
        s0, s1, s2 = (torch.empty_like(gg) for _ in range(3))  # scratch: silu'' and the g_k adjoints
        gh_d: list[Tensor] = []  # adjoints of h_{k-1} through silu'(h_{k-1})
        for j in range(L):  # g_0 -> g_L: layer k = j + 1 (g_{k-1} = u_k * d_k, u_k = g_k W_k)
            k = j + 1
            # silu''(h) = p (2 + h - 2 silu(h))
            d2 = torch.add(pre[j], act[j], alpha=-2, out=s0).add_(2).mul_(sp[j])
            gh_d.append(torch.mul(gg, us[L - 1 - j]).mul_(d2))
            gu = gg.mul_(dsilu[j])
            dW[k] = gs[L - k].t() @ gu  # gs[L - k] is g_k
            gg = torch.mm(gu, wt[k], out=s2 if gg is not s2 else s1)
        gh = gg  # g_L = h_L
        for k in range(L, 0, -1):  # h_k = silu(h_{k-1}) W_k^T
            dW[k] = torch.addmm(dW[k], gh.t(), act[k - 1])
            gh = gh_d[k - 1].addcmul_(torch.mm(gh, w[k], out=s0), dsilu[k - 1])
        # [hidden, batch] x [batch, n] with n = 2..5 taken as ([n, batch] x [batch, hidden])^T: ~6x faster
        dW0 = f.t() @ gh
        dW0[:dim] += q.t() @ gs[L]
        dW[0] = dW0.t()
        return (None, None, None, None, d_gain, None, *dW)


@register("ToyMLP")
class ToyMLP(nn.Module):
    """MLP denoiser for points of dimension ``dim``; ``forward(x, sigma, label=None)`` is ``D(x; sigma)``.

    ``depth`` hidden blocks (SiLU -> Linear(hidden, hidden)) follow the input layer, as in the paper's
    ``num_layers``. ``x`` is [batch, dim], ``sigma`` [batch] (or a scalar), ``label`` [batch] ints.
    """

    OUTPUTS = ("energy", "denoiser")

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 64,
        depth: int = 4,
        sigma_data: float = 0.5,
        num_classes: int = 0,
        output: str = "energy",
        noise_cond: bool = True,
        extra_scalar: str | None = None,
    ):
        super().__init__()
        check(output in self.OUTPUTS, f"unknown output {output!r}; allowed: {list(self.OUTPUTS)}")
        for name, v, lo in (("dim", dim, 1), ("hidden", hidden, 1), ("depth", depth, 0), ("num_classes", num_classes, 0)):
            check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")
        check(isinstance(sigma_data, (int, float)) and sigma_data > 0, f"sigma_data must be > 0, got {sigma_data!r}")
        self.dim, self.hidden, self.depth, self.sigma_data = dim, hidden, depth, float(sigma_data)
        self.num_classes, self.output, self.noise_cond = num_classes, output, bool(noise_cond)
        check_extra_scalar(extra_scalar)
        self.extra_scalar = extra_scalar
        self.null_label = num_classes if num_classes else None  # label dropout's label; guiders read `condition`
        self.precond = EDMPrecond(self.sigma_data)
        n_in = dim + self.noise_cond + 1 + (num_classes + 1 if num_classes else 0) + (extra_scalar is not None)
        self.layers = nn.ModuleList([MPLinear(n_in, hidden)] + [MPLinear(hidden, hidden) for _ in range(depth)])
        if output == "denoiser":
            self.out = MPLinear(hidden, dim)
        self.gain = nn.Parameter(torch.zeros([]))

    @property
    def condition(self) -> Condition | None:
        """``label`` in ``[0, num_classes)``, null ``num_classes`` (read by guidance.cfg / icg); None if unconditional."""
        return Condition("label", {"label": self.num_classes}, self.num_classes) if self.num_classes else None

    @property
    def noise_embed_dim(self) -> int | None:
        """Size of the noise embedding a [batch, hidden] ``noise_embed_offset`` shifts (TSG's vector form)."""
        return self.hidden if self.noise_cond and self.hidden > 1 else None

    def config(self) -> dict[str, Any]:
        d = dict(
            dim=self.dim,
            hidden=self.hidden,
            depth=self.depth,
            sigma_data=self.sigma_data,
            num_classes=self.num_classes,
            output=self.output,
            noise_cond=self.noise_cond,
        )
        if self.extra_scalar is not None:  # left out otherwise: older configs stay unchanged
            d["extra_scalar"] = self.extra_scalar
        return d

    # ------------------------------------------------------------------------------------------

    def _label(self, label: Label, x: torch.Tensor) -> list[torch.Tensor]:
        """One-hot label features ([] for an unconditional model)."""
        onehot = one_hot_label(label, self.num_classes, x)
        return [] if onehot is None else [onehot]

    def _extra(self, extra: dict[str, Any] | None, x: torch.Tensor) -> list[torch.Tensor]:
        """The extra scalar as a [batch, 1] feature ([] for a model without one)."""
        extra = extra or {}
        name = self.extra_scalar
        unknown = sorted(set(extra) - ({name} if name else set()))
        check(
            not unknown,
            f"unknown conditioning {unknown}; this model takes label, noise_embed_offset" + (f", {name}" if name else ""),
        )
        if name is None:
            return []
        check(name in extra, f"this model needs the scalar {name}=... (a number or a [batch] tensor)")
        s = torch.as_tensor(extra[name], dtype=x.dtype, device=x.device)
        check(s.ndim == 0 or s.shape == x.shape[:1], f"{name} must be a number or a [batch] tensor, got shape {list(s.shape)}")
        return [s.expand(x.shape[0])[:, None]]

    def _features(
        self, x_in: torch.Tensor, c_noise: torch.Tensor, label: Label = None, extra: dict[str, Any] | None = None
    ) -> torch.Tensor:
        feats = [x_in] + ([c_noise[:, None]] if self.noise_cond else []) + [torch.ones_like(x_in[:, :1])]
        return torch.cat(feats + self._label(label, x_in) + self._extra(extra, x_in), dim=1)

    def trunk(
        self,
        x_in: torch.Tensor,
        c_noise: torch.Tensor,
        label: Label = None,
        extra: dict[str, Any] | None = None,
        embed_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Trunk features ``y`` [batch, hidden] from ``x_in = c_in x`` [batch, dim] and ``c_noise`` [batch].

        ``embed_offset`` [batch, hidden]: added to the first layer's output (TSG's vector perturbation).
        """
        y = self.layers[0](self._features(x_in, c_noise, label, extra))
        if embed_offset is not None:
            y = y + embed_offset
        for layer in self.layers[1:]:
            y = layer(mp_silu(y))
        return y

    def _F(
        self,
        x_in: torch.Tensor,
        c_noise: torch.Tensor,
        label: Label = None,
        noise_embed_offset: torch.Tensor | None = None,
        extra: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        c_noise, emb = _offset(c_noise, noise_embed_offset, self.hidden)
        return self.gain * self.out(mp_silu(self.trunk(x_in, c_noise, label, extra, emb)))

    # ------------------------------------------------------------------------------------------

    def logp(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        label: Label = None,
        noise_embed_offset: torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        """Unnormalised ``log p(x; sigma)`` [batch] (``output="energy"`` only)."""
        check(self.output == "energy", "logp needs output='energy'")
        sigma = as_sigma(sigma, x)
        x_in = x / (self.sigma_data**2 + sigma**2).sqrt()[:, None]
        c_noise, emb = _offset(sigma.log() / 4, noise_embed_offset, self.hidden)
        y = self.trunk(x_in, c_noise, label, extra, emb)
        return self.gain * y.square().mean(1) / sigma - 0.5 * x_in.square().sum(1)

    def score(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        label: Label = None,
        noise_embed_offset: torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        """``grad_x log p(x; sigma)`` [batch, dim].

        Energy model: the gradient of :meth:`logp` written out as an explicit backward pass through
        the trunk, so it needs no autograd (works under ``no_grad`` and ``inference_mode``), and
        training differentiates it with a plain first-order backward instead of a double backward.
        """
        sigma = as_sigma(sigma, x)
        if self.output == "denoiser":
            return (self(x, sigma, label, noise_embed_offset, **extra) - x) / bcast(sigma, x) ** 2
        r = (self.sigma_data**2 + sigma**2).sqrt()[:, None]
        x_in = x / r
        w = [cast(MPLinear, layer).effective_weight() for layer in self.layers]
        w[1:] = [wl / 0.596 for wl in w[1:]]  # MP-SiLU's 1/0.596 folded into weights
        c_noise, emb = _offset(sigma.log() / 4, noise_embed_offset, self.hidden)
        f = self._features(x_in, c_noise, label, extra)
        if emb is None and torch.is_grad_enabled() and not f.requires_grad and not sigma.requires_grad:
            # training: the hand-written backward to gain and weights (same values as autograd's)
            return cast(torch.Tensor, _EnergyScore.apply(f, x_in, r, sigma, self.gain, self.dim, *w))
        # the same products and element-wise formulas as _EnergyScore.forward: the same values, bit for bit
        h = f @ w[0].t().contiguous()
        if emb is not None:
            h = h + emb  # TSG: perturbed noise embedding
        dsilu = []
        for wl in w[1:]:
            s = torch.sigmoid(h)
            a = h * s  # silu(h)
            dsilu.append(_dsilu(a, s))
            h = a @ wl.t().contiguous()
        # y = h; d logp / dy = 2 gain y / (hidden sigma): propagate y back, scale at the end.
        g = h
        for wl, d in zip(reversed(w[1:]), reversed(dsilu)):
            g = (g @ wl) * d
        g = torch.mm(w[0][:, : self.dim].t().contiguous(), g.t()).t()  # d/dx_in of mean(y^2) * hidden / 2
        return ((2 * self.gain / self.hidden) / sigma[:, None] * g - x_in) / r

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        label: Label = None,
        noise_embed_offset: torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        """``D(x; sigma, label, <extra_scalar>)`` [batch, dim], the x0 estimate."""
        check(
            isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == self.dim,
            f"x must be a tensor of shape [batch, {self.dim}], got {list(getattr(x, 'shape', []))}",
        )
        sigma = as_sigma(sigma, x)
        if self.output == "energy":
            return x + bcast(sigma, x) ** 2 * self.score(
                x, sigma, label, noise_embed_offset, **extra
            )  # Tweedie: D = x + sigma^2 s
        return self.precond.denoise(self._F, x, sigma, label=label, noise_embed_offset=noise_embed_offset, extra=extra)
