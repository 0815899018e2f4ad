"""DPM-Solver-v3 (Zheng, Lu, Bao, Zhu 2023, arXiv 2310.13268): an exponential integrator whose linear
part and whose expansion variable are fitted to the model, through its *empirical model statistics*
(EMS) ``l, s, b`` -- per lambda on a grid, per data dimension -- computed once per model on data.

EDM coordinates, ``lambda = -log sigma``. The PF-ODE ``dx/dlambda = D - x`` is rewritten (their eq. 7,
divided by alpha) as ``dx/dlambda = -l x - f`` with ``f = (1 - l) x - D`` (their ``N_theta / alpha``), and
``f`` is expanded through ``g = e^{S_s - S} f - int_s^lambda e^{S_s - S(u)} b(u) du`` (``S = int s``,
their eq. 9), which is constant in lambda when ``f' = s f + b`` holds exactly. The exact solution from
``lambda_s`` to ``lambda_t`` (their eq. 10, ``L = int l``, ``A = L + S``) is

    x_t = e^{L_s - L_t} [x_s - int_s^t e^{A - A_s} (g + B_s(lambda)) dlambda],  B_s(lambda) = int_s^lambda e^{S_s - S} b,

and the multistep predictor replaces ``g`` by its Taylor polynomial at ``lambda_s`` (derivatives from the
previous evaluations: a Vandermonde solve, or divided differences for the *pseudo-order* solver); the
pseudo-corrector redoes the last step with the fresh evaluation included (no extra NFE).

The statistics (their eq. 8): ``l = argmin E||d f / d x||_F^2`` over diagonal ``l``, i.e.
``l = 1 - E[diag dD/dx]``; ``(s, b) = argmin E||f' - s f - b||^2`` per dimension, ``f'`` the total
derivative of ``f`` along the ODE. With ``l = 1, s = 0, b = 0`` (:meth:`EMS.degenerate`, the official
code's ``degenerated=True``) ``f = -D`` and the solver is DPM-Solver++ multistep of the same order.

Differences from the official code (thu-ml/DPM-Solver-v3): the statistics are linearly interpolated
between grid points and the step integrals use Gauss-Legendre quadrature on each grid cell (the official
code snaps the sampling times to the grid and uses the trapezoid rule on it), so any sigma schedule
inside the EMS range works unchanged; the step to sigma = 0 returns D, as every solver of this library.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from ..errors import GuidelabError, check
from .base import Callback, begin_run, check_inputs, evaluator, report

_GL_NODES, _GL_WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(8))
_MAX_PIECE = 0.5  # widest quadrature piece in lambda (pieces also end at every grid point)
EMS_KEY = "guidelab_ems"


class ExactWorld(Protocol):
    """An exact world of ``guidelab.toy`` as :func:`world_ems` reads it: its own denoiser and its sampler."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor: ...

    def sample(self, n: int, sigma: float, generator: torch.Generator | None) -> torch.Tensor: ...


class EMS:
    """Empirical model statistics: ``lambdas`` [K+1] strictly increasing (``lambda = -log sigma``),
    ``l, s, b`` [K+1, *shape] (``shape`` = one sample's shape, e.g. [2] or [1, 8, 8]), float64.

    ``lambdas=None`` with scalar ``l, s, b``: statistics constant in lambda and over dimensions, valid at
    every sigma (:meth:`degenerate`). ``meta``: JSON-able provenance stored with the file.
    """

    def __init__(
        self,
        lambdas: torch.Tensor | Sequence[float] | None,
        l: torch.Tensor | float,  # noqa: E741 (the paper's l)
        s: torch.Tensor | float,
        b: torch.Tensor | float,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.meta = dict(meta or {})
        l, s, b = (torch.as_tensor(v, dtype=torch.float64) for v in (l, s, b))  # noqa: E741
        for name, v in (("l", l), ("s", s), ("b", b)):
            check(bool(torch.isfinite(v).all()), f"EMS {name} contains NaN or inf values")
        check(
            l.shape == s.shape == b.shape,
            f"EMS l, s, b must have one shape, got {list(l.shape)}, {list(s.shape)}, {list(b.shape)}",
        )
        if lambdas is None:
            check(l.ndim == 0, f"EMS without a lambda grid holds scalars, got shape {list(l.shape)}")
            self.lambdas = None
        else:
            lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
            check(
                lambdas.ndim == 1 and lambdas.numel() >= 2, f"EMS lambdas must be 1-D with >= 2 values, got {list(lambdas.shape)}"
            )
            check(bool(torch.isfinite(lambdas).all()), "EMS lambdas contain NaN or inf values")
            check(bool((lambdas[1:] > lambdas[:-1]).all()), "EMS lambdas must be strictly increasing (sigma decreasing)")
            check(
                l.ndim >= 1 and l.shape[0] == lambdas.numel(),
                f"EMS l, s, b must be [K+1={lambdas.numel()}, *shape], got {list(l.shape)}",
            )
            self.lambdas = lambdas
            # natural cubic splines through the grid values (C^2 in lambda: the solver's Taylor expansion of g
            # needs smooth statistics; piecewise-linear ones cap the measured order at 2)
            self._M = {k: _spline_m(lambdas, v) for k, v in (("l", l), ("s", s), ("b", b))}
            dlam = lambdas.diff().reshape(-1, *([1] * (l.ndim - 1)))
            self._G = {}
            for k, v in (("l", l), ("s", s)):  # integrals of l and s at the grid points (exact for the splines)
                M = self._M[k]
                cell = dlam * (0.5 * (v[1:] + v[:-1]) - dlam**2 / 24 * (M[1:] + M[:-1]))
                self._G[k] = torch.cat([v.new_zeros(1, *v.shape[1:]), torch.cumsum(cell, 0)])
        self.l, self.s, self.b = l, s, b

    @classmethod
    def degenerate(cls) -> "EMS":
        """``l = 1, s = 0, b = 0`` at every sigma: DPM-Solver-v3 is then DPM-Solver++ multistep (the official
        code's ``degenerated`` option)."""
        return cls(None, 1.0, 0.0, 0.0, {"degenerate": True})

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape (``()`` for the degenerate statistics, which broadcast)."""
        return tuple(self.l.shape[1:]) if self.lambdas is not None else ()

    @property
    def sigma_range(self) -> tuple[float, float]:
        """``(sigma_min, sigma_max)`` the statistics cover (``(0, inf)`` for the degenerate ones)."""
        if self.lambdas is None:
            return 0.0, math.inf
        return math.exp(-float(self.lambdas[-1])), math.exp(-float(self.lambdas[0]))

    # --- evaluation at arbitrary lambda (tensor q of any shape -> q.shape + self.shape)
    def _locate(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.lambdas is not None
        lam = self.lambdas
        k = torch.searchsorted(lam, q.contiguous()).clamp(1, lam.numel() - 1)
        hk = (lam[k] - lam[k - 1]).reshape(*q.shape, *([1] * len(self.shape)))
        B = ((q - lam[k - 1]).reshape(hk.shape) / hk).clamp(0, 1)
        return k, B, hk

    def _value(self, name: str, k: torch.Tensor, B: torch.Tensor, hk: torch.Tensor) -> torch.Tensor:
        v, M = getattr(self, name), self._M[name]
        A = 1 - B
        return A * v[k - 1] + B * v[k] + ((A**3 - A) * M[k - 1] + (B**3 - B) * M[k]) * hk**2 / 6

    def stats(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(l, s, b)`` at lambdas ``q`` (the natural cubic splines through the grid values)."""
        if self.lambdas is None:
            full = lambda v: v.expand(q.shape)  # noqa: E731
            return full(self.l), full(self.s), full(self.b)
        loc = self._locate(q)
        return self._value("l", *loc), self._value("s", *loc), self._value("b", *loc)

    def integrals(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, S)`` at lambdas ``q``: the integrals of l and s from the first grid point (exact)."""
        if self.lambdas is None:
            return self.l * q, self.s * q
        k, B, hk = self._locate(q)
        A = 1 - B
        out = []
        for name in ("l", "s"):
            v, M = getattr(self, name), self._M[name]
            part = v[k - 1] * (B - B**2 / 2) + v[k] * B**2 / 2
            part = part + hk**2 / 6 * (M[k - 1] * (-(A**4) / 4 + A**2 / 2 - 0.25) + M[k] * (B**4 / 4 - B**2 / 2))
            out.append(self._G[name][k - 1] + hk * part)
        return out[0], out[1]

    def covers(self, sigma_lo: float, sigma_hi: float) -> bool:
        lo, hi = self.sigma_range
        return lo * (1 - 1e-6) <= sigma_lo and sigma_hi <= hi * (1 + 1e-6)  # float32 schedules round

    # --- files: safetensors + JSON metadata (never a pickle)
    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to ``path`` (safetensors; the JSON ``meta`` in its metadata), atomically."""
        import safetensors.torch

        from .._io import atomic_write

        check(self.lambdas is not None, "the degenerate EMS is not saved: use EMS.degenerate() directly")
        assert self.lambdas is not None
        tensors = {"lambdas": self.lambdas, "l": self.l, "s": self.s, "b": self.b}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        try:
            meta = json.dumps(self.meta, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise GuidelabError(f"EMS meta must be plain JSON: {e}") from None
        return atomic_write(path, safetensors.torch.save(tensors, metadata={EMS_KEY: meta}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EMS":
        """Read statistics written by :meth:`save`; anything else is a one-line GuidelabError."""
        from safetensors import safe_open

        path = Path(path)
        check(path.is_file(), f"EMS file {path} does not exist (compute it with `guidelab ems`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get(EMS_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # not a safetensors file
            raise GuidelabError(
                f"{path} is not an EMS safetensors file: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
        missing = {"lambdas", "l", "s", "b"} - set(tensors)
        check(meta is not None and not missing, f"{path} is not an EMS file (missing {sorted(missing) or 'its metadata'})")
        return cls(tensors["lambdas"], tensors["l"], tensors["s"], tensors["b"], json.loads(str(meta)))

    def __repr__(self) -> str:
        if self.lambdas is None:
            return "EMS.degenerate()"
        lo, hi = self.sigma_range
        return f"EMS(K={self.lambdas.numel() - 1}, shape={list(self.shape)}, sigma in [{lo:g}, {hi:g}])"


def _spline_m(lam: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Second derivatives of the natural cubic spline through ``(lam, v)`` (v: [K+1, ...]; Thomas algorithm)."""
    K = lam.numel() - 1
    M = torch.zeros_like(v)
    if K < 2:
        return M
    h = lam.diff().tolist()
    slope = (v[1:] - v[:-1]) / lam.diff().reshape(-1, *([1] * (v.ndim - 1)))
    rhs = 6 * (slope[1:] - slope[:-1])  # rows k = 1 .. K-1
    diag = [2 * (h[k - 1] + h[k]) for k in range(1, K)]
    c, d = [0.0] * (K - 1), [rhs[0]] * (K - 1)
    c[0], d[0] = h[1] / diag[0], rhs[0] / diag[0]
    for r in range(1, K - 1):
        den = diag[r] - h[r] * c[r - 1]
        c[r] = h[r + 1] / den if r < K - 2 else 0.0
        d[r] = (rhs[r] - h[r] * d[r - 1]) / den
    M[K - 1] = d[K - 2]
    for r in range(K - 3, -1, -1):
        M[r + 1] = d[r] - c[r] * M[r + 2]
    return M


def as_ems(ems: object) -> EMS:
    """An :class:`EMS`, the path of an EMS file, or ``"degenerate"`` (:meth:`EMS.degenerate`, asked for by
    name: JSON configs and CLI options can hold it); ``None`` is refused with what to pass instead."""
    if isinstance(ems, EMS):
        return ems
    if isinstance(ems, str) and ems == "degenerate":
        return EMS.degenerate()
    if isinstance(ems, (str, os.PathLike)):
        return EMS.load(ems)
    raise GuidelabError(
        "dpm_solver_v3 needs the model's empirical model statistics: ems=<EMS or path> (compute them with "
        "`guidelab ems` or samplers.compute_ems), or ems=EMS.degenerate() / 'degenerate' for l=1, s=0, b=0 "
        f"(= DPM-Solver++ multistep); got {type(ems).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Quadrature in lambda


def _pieces(ems: EMS, a: float, b: float) -> torch.Tensor:
    """Break points from a to b (either direction): every grid point between, pieces at most _MAX_PIECE wide."""
    lo, hi = min(a, b), max(a, b)
    pts = [lo, hi]
    if ems.lambdas is not None:
        pts += [v for v in ems.lambdas.tolist() if lo < v < hi]
    pts = sorted(pts)
    fine = [pts[0]]
    for p, q in zip(pts[:-1], pts[1:]):
        m = max(1, math.ceil((q - p) / _MAX_PIECE))
        fine += [p + (q - p) * (j + 1) / m for j in range(m)]
    out = torch.tensor(fine, dtype=torch.float64)
    return out if a <= b else out.flip(0)


def _nodes(starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and (signed) weights on each [start, end]: shapes starts.shape + [8]."""
    half = ((ends - starts) / 2).unsqueeze(-1)
    return starts.unsqueeze(-1) + half * (_GL_NODES + 1), half * _GL_WEIGHTS


def _bcast(w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return w.reshape(*w.shape, *([1] * len(shape)))


def _b_integral(ems: EMS, lam_s: float, S_s: torch.Tensor, lam: float) -> torch.Tensor:
    """``B_s(lambda) = int_{lambda_s}^{lambda} e^{S_s - S(u)} b(u) du`` (any direction)."""
    if lam == lam_s:
        return torch.zeros_like(S_s)
    pts = _pieces(ems, lam_s, lam)
    u, wu = _nodes(pts[:-1], pts[1:])
    _, s_u, b_u = ems.stats(u)
    _, S_u = ems.integrals(u)
    return (_bcast(wu, ems.shape) * torch.exp(S_s - S_u) * b_u).sum((0, 1))


class _Step:
    """The coefficients of one step lambda_s -> lambda_t (float64, per dimension):
    ``x_t = eL x_s - c[0] g_s - cb - sum_n c[n] g^(n)``."""

    def __init__(self, ems: EMS, lam_s: float, lam_t: float, order: int):
        shape = ems.shape
        q = torch.tensor([lam_s, lam_t], dtype=torch.float64)
        L2, S2 = ems.integrals(q)
        self.lam_s, self.S_s = lam_s, S2[0]
        self.eL = torch.exp(L2[0] - L2[1])
        pts = _pieces(ems, lam_s, lam_t)
        a, b_ = pts[:-1], pts[1:]
        tau, w = _nodes(a, b_)  # [P, 8]
        L_tau, S_tau = ems.integrals(tau)
        E = _bcast(w, shape) * torch.exp(L_tau + S_tau - L2[0] - S2[0])  # weights * e^{A - A_s}
        # B_s at the nodes: cumulative over the pieces plus an inner Gauss-Legendre rule from each piece start
        u, wu = _nodes(a.unsqueeze(-1).expand_as(tau), tau)  # [P, 8, 8]
        _, _, b_u = ems.stats(u)
        _, S_u = ems.integrals(u)
        inner = (_bcast(wu, shape) * torch.exp(S2[0] - S_u) * b_u).sum(2)  # [P, 8, *shape]: from a_p to tau
        uf, wf = _nodes(a, b_)
        _, _, b_f = ems.stats(uf)
        _, S_f = ems.integrals(uf)
        whole = (_bcast(wf, shape) * torch.exp(S2[0] - S_f) * b_f).sum(1)  # [P, *shape]: piece integrals
        start = torch.cat([torch.zeros_like(whole[:1]), torch.cumsum(whole, 0)[:-1]])
        B_tau = start.unsqueeze(1) + inner
        self.cb = self.eL * (E * B_tau).sum((0, 1))
        dt = _bcast(tau - lam_s, shape)
        self.c = [self.eL * (E * dt**n).sum((0, 1)) / math.factorial(n) for n in range(order)]
        self.ems = ems
        check(
            all(bool(torch.isfinite(v).all()) for v in (self.eL, self.cb, *self.c)),
            f"dpm_solver_v3: the step coefficients from sigma {math.exp(-lam_s):.4g} to {math.exp(-lam_t):.4g} overflow "
            f"with these EMS (|s| up to {float(ems.s.abs().max()):.3g}); recompute them (guidelab ems) or use more steps",
        )

    def g(self, lam: float, f: torch.Tensor) -> torch.Tensor:
        """g relative to lambda_s of an evaluation f at lambda."""
        if lam == self.lam_s:
            return f
        _, S = self.ems.integrals(torch.tensor([lam], dtype=torch.float64))
        e = torch.exp(self.S_s - S[0]).to(f)
        return f * e - _b_integral(self.ems, self.lam_s, self.S_s, lam).to(f)


def _update(
    ems: EMS,
    x_s: torch.Tensor,
    points: list[tuple[float, torch.Tensor]],
    lam_t: float,
    order: int,
    pseudo: bool,
    cache: dict[tuple[float, float, int], _Step],
) -> torch.Tensor:
    """One step from the first of ``points`` (``(lambda, f)``, the base first) to ``lam_t`` with ``order`` points."""
    lam_s = points[0][0]
    key = (lam_s, lam_t, order)
    if key not in cache:
        cache[key] = _Step(ems, lam_s, lam_t, order)
    st: _Step = cache[key]
    to = lambda v: v.to(x_s)  # noqa: E731
    gs = [st.g(lam, f) for lam, f in points[:order]]
    x = to(st.eL) * x_s - to(st.c[0]) * gs[0] - to(st.cb)
    n = order - 1
    derivs: list[torch.Tensor] = []
    if n:
        lams = [lam for lam, _ in points[:order]]
        if pseudo:  # divided differences (their pseudo-order solver)
            table = [gs]
            for i in range(1, n + 1):
                prev = table[-1]
                table.append([(prev[j] - prev[j + 1]) / (lams[j] - lams[i + j]) for j in range(n - i + 1)])
            derivs = [table[i][0] * math.factorial(i) for i in range(1, n + 1)]
        else:  # Taylor coefficients of the interpolating polynomial at lambda_s
            R = np.array([[(lams[j] - lam_s) ** i for i in range(1, n + 1)] for j in range(1, n + 1)])
            Rinv = np.linalg.inv(R)
            for i in range(n):
                d = gs[0] * 0
                for j in range(n):
                    d = d + float(Rinv[i, j]) * (gs[j + 1] - gs[0])
                derivs.append(d * math.factorial(i + 1))
    for k, dk in enumerate(derivs):
        x = x - to(st.c[k + 1]) * dk
    return x


@torch.no_grad()
def dpm_solver_v3(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    ems: EMS | str | os.PathLike | None = None,
    order: int = 3,
    corrector: bool | None = None,
    pseudo: bool | None = None,
    lower_order_final: bool = True,
    noise: object = None,
) -> torch.Tensor:
    """DPM-Solver-v3 multistep predictor (``order`` 1..3) with its pseudo-corrector; 1 NFE per step.

    ``ems``: the model's :class:`EMS` (or the path of its file); required -- ``EMS.degenerate()`` asks
    explicitly for l = 1, s = 0, b = 0 (DPM-Solver++ multistep). The nonzero sigmas must lie in the EMS
    range. ``corrector`` / ``pseudo`` default as the official sampling scripts: the corrector for at most 6
    steps, the pseudo-order predictor for at most 5 (steps to sigma > 0). ``lower_order_final``: the order
    is at most the number of steps left. The step to sigma = 0 returns D. Deterministic: ``noise`` is
    accepted (one signature for all samplers) and not used.
    """
    sigmas = check_inputs(x, sigmas)
    check(order in (1, 2, 3), f"order must be 1, 2 or 3, got {order!r}")
    ems = as_ems(ems)
    sig = sigmas.tolist()
    nonzero = [s for s in sig if s > 0]
    check(
        ems.covers(min(nonzero), max(nonzero)),
        f"sigmas span [{min(nonzero):g}, {max(nonzero):g}] but the EMS cover [{ems.sigma_range[0]:g}, "
        f"{ems.sigma_range[1]:g}]: compute the EMS over the sampling range",
    )
    check(
        ems.lambdas is None or tuple(x.shape[1:]) == ems.shape,
        f"the EMS are for samples of shape {list(ems.shape)}, x has samples of shape {list(x.shape[1:])}",
    )
    n = len(sig) - 1
    corrector = (n - 1 <= 6) if corrector is None else corrector
    pseudo = (n - 1 <= 5) if pseudo is None else pseudo
    denoiser, run = begin_run(denoiser, x, sigmas, noise, "dpm_solver_v3")
    evaluate = evaluator(denoiser, x, cond, run)
    lams = [-math.log(s) if s > 0 else math.inf for s in sig]
    l_at = lambda lam: ems.stats(torch.tensor([lam], dtype=torch.float64))[0][0].to(x)  # noqa: E731
    cache: dict[tuple[float, float, int], _Step] = {}
    hist: list[tuple[float, torch.Tensor, torch.Tensor]] = []  # (lambda, x, f), newest last
    p_prev = 0
    for i in run.steps(progress, "dpm_solver_v3"):
        sigma, sigma_next = sig[i], sig[i + 1]
        D = evaluate(x, sigma)
        l_i = l_at(lams[i])
        f = (1 - l_i) * x - D
        if corrector and hist and p_prev > 1 and sigma_next > 0:
            # pseudo-corrector of step i-1 -> i at order p_prev: base i-1, then i, then older points; f is kept
            # (the official code keeps N = sigma eps - l x), so D follows the corrected x
            pts = [(hist[-1][0], hist[-1][2]), (lams[i], f)] + [(lam, f_) for lam, _, f_ in reversed(hist[:-1])]
            x = _update(ems, hist[-1][1], pts, lams[i], p_prev, False, cache)
            D = (1 - l_i) * x - f
        report(callback, x, i, sigmas, sigma, D)
        if sigma_next == 0:
            x = D
            break
        hist = (hist + [(lams[i], x, f)])[-order:]
        p = min(order, len(hist), n - 1 - i if lower_order_final else order)
        pts = [(lam, f_) for lam, _, f_ in reversed(hist)]
        x = _update(ems, x, pts, lams[i + 1], p, pseudo, cache)
        p_prev = p
    return x


# ---------------------------------------------------------------------------------------------
# Computing the statistics


@torch.no_grad()
def compute_ems(
    denoiser: Callable[..., torch.Tensor],
    data: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
    *,
    steps: int = 64,
    cond: dict | None = None,
    batch: int = 1024,
    probes: int | None = None,
    delta: float | None = None,
    ridge_scale: float = 1e-2,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> EMS:
    """Estimate ``l, s, b`` of ``denoiser`` on ``data`` [n, *shape] at ``steps + 1`` lambdas uniform in
    ``[-log sigma_max, -log sigma_min]``: at each lambda, ``x = x0 + sigma n`` for every data point.

    ``l = 1 - E[diag dD/dx]``: exact (one central difference per coordinate) with ``probes=0`` or, by
    default, for samples of at most 16 values; else ``probes`` (default 4) Rademacher probes ``v * (J v)``
    per sample (Hutchinson's unbiased diagonal). ``f' = df/dlambda`` along the ODE ``dx/dlambda = D - x``:
    central differences with step ``delta`` in lambda (default 1e-4 in float64, 1e-2 otherwise); ``l'`` from the grid of l.
    ``(s, b)``: the per-dimension least-squares line of f' on f, ridge-regularised by ``ridge_scale`` times the
    mean variance of f over the dimensions (so nearly constant dimensions get s ~ 0). ``cond``: keywords for every call (tensors
    with a leading [n] dimension are sliced with the data).
    """
    check(isinstance(data, torch.Tensor) and data.ndim >= 2 and data.shape[0] >= 2, "data must be a [n >= 2, ...] tensor")
    check(bool(torch.isfinite(data).all()), "data contains NaN or inf values")
    check(0 < sigma_min < sigma_max < math.inf, f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    check(steps >= 2, f"steps must be >= 2, got {steps}")
    n, shape, dtype = data.shape[0], tuple(data.shape[1:]), data.dtype
    dim = int(np.prod(shape))
    delta = (1e-4 if dtype == torch.float64 else 1e-2) if delta is None else delta
    check(probes is None or (isinstance(probes, int) and probes >= 0), f"probes must be an integer >= 0, got {probes!r}")
    exact_diag = probes == 0 or (probes is None and dim <= 16)
    probes = 4 if probes is None else probes
    lambdas = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), steps + 1, dtype=torch.float64)
    cond = cond or {}

    def call(x: torch.Tensor, sigma: float, c: dict[str, Any]) -> torch.Tensor:
        return denoiser(x, torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device), **c)

    def chunks(k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any], torch.Generator]]:
        # the same noise (and probes) at every lambda: the estimates' sampling error is then a smooth
        # function of lambda, which the solver's Taylor expansion of g needs (common random numbers)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for lo in range(0, n, batch):
            x0 = data[lo : lo + batch]
            c = {
                key: (v[lo : lo + batch] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v)
                for key, v in cond.items()
            }
            eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(x0)
            yield x0, eps, c, gen

    # pass 1: l on the grid
    l_grid = []
    for k, lam in enumerate(lambdas.tolist()):
        sigma = math.exp(-lam)
        acc = torch.zeros(shape, dtype=torch.float64)
        h = delta * max(sigma, 1.0) if dtype != torch.float64 else delta * max(sigma, 1e-2)
        for x0, eps, c, gen in chunks(k):
            x = x0 + sigma * eps
            if exact_diag:
                flat = x.flatten(1)
                diag = torch.empty_like(flat)
                for j in range(dim):
                    e = torch.zeros_like(flat)
                    e[:, j] = h
                    dp = call((flat + e).reshape(x.shape), sigma, c).flatten(1)
                    dm = call((flat - e).reshape(x.shape), sigma, c).flatten(1)
                    diag[:, j] = (dp[:, j] - dm[:, j]) / (2 * h)
                acc += diag.reshape(x.shape).double().sum(0)
            else:
                for _ in range(probes):
                    v = (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x)
                    Jv = (call(x + h * v, sigma, c) - call(x - h * v, sigma, c)) / (2 * h)
                    acc += (v * Jv).double().sum(0) / probes
        l_grid.append(1 - acc / n)
    l = torch.stack(l_grid)  # noqa: E741
    dl = torch.from_numpy(np.gradient(l.numpy(), lambdas.numpy(), axis=0))
    # pass 2: s, b from f and f' along the ODE
    s_grid, b_grid = [], []
    for k, lam in enumerate(lambdas.tolist()):
        sigma, lk, dlk = math.exp(-lam), l[k].to(dtype), dl[k].to(dtype)
        sums = {key: torch.zeros(shape, dtype=torch.float64) for key in ("f", "g", "ff", "fg", "DD")}
        for x0, eps, c, _ in chunks(k):
            x = x0 + sigma * eps
            D = call(x, sigma, c)
            v = D - x  # dx/dlambda
            dD = (call(x + delta * v, sigma * math.exp(-delta), c) - call(x - delta * v, sigma * math.exp(delta), c)) / (
                2 * delta
            )
            f = (1 - lk) * x - D
            fp = -dlk * x + (1 - lk) * v - dD
            f, fp = f.double(), fp.double()
            sums["f"] += f.sum(0)
            sums["g"] += fp.sum(0)
            sums["ff"] += (f * f).sum(0)
            sums["fg"] += (f * fp).sum(0)
            sums["DD"] += D.double().square().sum(0)
        mf, mg = sums["f"] / n, sums["g"] / n
        var = sums["ff"] / n - mf**2
        cov = sums["fg"] / n - mf * mg
        # ridge: a dimension whose f barely varies (a constant border pixel at small sigma) gets s ~ 0 rather
        # than the ratio of two rounding errors (|s| ~ 1e4 on digits without it, e^S overflows)
        # (and an f that does not vary at all, relative to the size of D, has no slope: s = 0)
        floor = 1e-9 * float(sums["DD"].sum()) / (n * sums["DD"].numel())
        ridge = ridge_scale * float(var.clamp_min(0).mean()) + floor
        s = torch.where(var > floor, cov / (var + ridge), torch.zeros_like(var))
        s_grid.append(s)
        b_grid.append(mg - s * mf)
    info: dict[str, Any] = {"sigma_min": sigma_min, "sigma_max": sigma_max, "steps": steps, "n": n, "seed": seed}
    info.update({"delta": delta, "ridge_scale": ridge_scale})
    info.update({"diag": "exact" if exact_diag else f"rademacher x{probes}"})
    info.update(meta or {})
    return EMS(lambdas, l, torch.stack(s_grid), torch.stack(b_grid), info)


def world_ems(world: ExactWorld, sigma_min: float, sigma_max: float, *, n: int = 1024, steps: int = 64, seed: int = 0) -> EMS:
    """The statistics of an exact world (``guidelab.toy``: it *is* its denoiser) from ``n`` of its exact samples."""
    data = world.sample(n, 0.0, torch.Generator().manual_seed(seed))
    return compute_ems(world, data, sigma_min, sigma_max, steps=steps, seed=seed, meta={"world": repr(world)[:200]})
