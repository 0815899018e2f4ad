"""Post-hoc EMA (Karras et al. 2024, EDM2 Sec. 3.2 and App. C.3): after training, reconstruct the
power-function EMA of any ``sigma_rel`` from periodic snapshots of two (or more) tracked profiles.

The EMA at step ``t`` with exponent ``gamma`` averages the trajectory ``theta(tau)`` with the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 < tau <= t           (EDM2 eq. 121)

(:class:`~.ema.PowerEMA` gives step ``tau`` the weight ``(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)``,
the integral of ``p`` over ``(tau - 1, tau]``, so for a trajectory held constant within each step
the continuous profile is exact). Two profiles have the inner product

    <p_a, p_b> = (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)),
    m = min(t_a, t_b),

and the snapshot weights ``x`` that best match a target profile in L2 solve the least-squares
problem ``A x = b``, ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>`` (EDM2 eq. 124-125). The
reconstructed EMA is ``sum_i x_i theta_i``, linear in the snapshots.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

from ..errors import GuidelabError, check
from ..models import registry
from . import checkpoint
from .ema import sigma_rel_to_gamma


def inner(t_a: ArrayLike, g_a: ArrayLike, t_b: ArrayLike, g_b: ArrayLike) -> np.ndarray:
    """``<p_{t_a, g_a}, p_{t_b, g_b}>`` (broadcasting numpy arrays, float64)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    m = np.minimum(t_a, t_b)
    # written with ratios (m / t <= 1) so large t and gamma do not overflow
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (m / t_a) ** (g_a + 1) * (m / t_b) ** (g_b + 1) / m


def solve_weights(ts: Sequence[float], gammas: Sequence[float], t: float, gamma: float) -> np.ndarray:
    """Least-squares weights [n] of snapshots ``(ts[i], gammas[i])`` reproducing the profile ``(t, gamma)``."""
    ts_a, gammas_a = np.asarray(ts, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    check(ts_a.shape == gammas_a.shape and ts_a.ndim == 1 and len(ts_a) > 0, "need one gamma per snapshot time, at least one")
    check(bool((ts_a > 0).all()) and t > 0, "snapshot and target steps must be > 0")
    A = inner(ts_a[:, None], gammas_a[:, None], ts_a[None, :], gammas_a[None, :])
    b = inner(ts_a, gammas_a, t, gamma)
    return np.linalg.lstsq(A, b, rcond=None)[0]


def profile_error(ts: ArrayLike, gammas: ArrayLike, weights: ArrayLike, t: float, gamma: float) -> float:
    """Relative L2 error ``|sum_i x_i p_i - p| / |p|`` of a reconstruction (0: exact)."""
    ts, gammas, x = (np.asarray(v, dtype=np.float64) for v in (ts, gammas, weights))
    A = inner(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])
    b = inner(ts, gammas, t, gamma)
    sq = x @ A @ x - 2 * x @ b + float(inner(t, gamma, t, gamma))
    return float(np.sqrt(max(sq, 0.0) / float(inner(t, gamma, t, gamma))))


_SNAP = re.compile(r"ema-(\d+)-(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\.safetensors")


def snapshots(run_dir: str | Path) -> list[tuple[Path, int, float]]:
    """``(path, step, sigma_rel)`` of every EMA snapshot in a run folder, sorted by step then sigma_rel."""
    out = []
    for p in Path(run_dir).glob("ema-*.safetensors"):
        m = _SNAP.fullmatch(p.name)
        if m:
            out.append((p, int(m.group(1)), float(m.group(2))))
    return sorted(out, key=lambda r: (r[1], r[2]))


def reconstruct(
    run_dir: str | Path, sigma_rel: float, step: int | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The network with the post-hoc EMA of ``sigma_rel`` at ``step`` (default: the last snapshot step).

    Uses every snapshot taken at or before ``step``; the result is a model (eval mode, as
    :func:`checkpoint.load_model`) whose ``checkpoint_info`` records the weights and the profile error.
    """
    snaps = snapshots(run_dir)
    check(len(snaps) > 0, f"no EMA snapshots (ema-<step>-<sigma_rel>.safetensors) in {run_dir}")
    last = max(s for _, s, _ in snaps)
    step = last if step is None else step
    check(
        isinstance(step, int) and not isinstance(step, bool) and 1 <= step <= last,
        f"step must be an integer in [1, {last}] (the last snapshot of {run_dir}), got {step!r}",
    )
    snaps = [r for r in snaps if r[1] <= step]
    check(len(snaps) > 0, f"no EMA snapshots at or before step {step} in {run_dir}")
    gamma = sigma_rel_to_gamma(sigma_rel)
    ts = [s for _, s, _ in snaps]
    gammas = [sigma_rel_to_gamma(r) for _, _, r in snaps]
    x = solve_weights(ts, gammas, step, gamma)
    total: dict[str, torch.Tensor] = {}
    config = None
    for (path, _, _), w in zip(snaps, x):
        tensors, info = checkpoint.load(path, device)
        if config is None:
            config = info
        elif info.get("model") != config.get("model"):
            raise GuidelabError(f"{path} holds another model than the other snapshots in {run_dir}")
        for k, v in tensors.items():
            if v.is_floating_point():
                total[k] = total.get(k, 0) + float(w) * v.double()
            else:
                total[k] = v
    assert config is not None  # snaps is non-empty (checked above)
    model = registry.build(config["model"]).to(device)
    state = model.state_dict()
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in total.items()})
    model.checkpoint_info = {  # type: ignore[assignment]  # dynamic attribute on nn.Module
        **config,
        "kind": "phema",
        "step": step,
        "sigma_rel": float(sigma_rel),
        "gamma": gamma,
        "phema_weights": [float(w) for w in x],
        "phema_snapshots": [p.name for p, _, _ in snaps],
        "phema_error": profile_error(ts, gammas, x, step, gamma),
    }
    return model.eval().requires_grad_(False)


def load_network(
    path: str | Path, sigma_rel: float = 0.10, step: int | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A checkpoint (.safetensors), an NVlabs EDM2 ``.pkl`` (read without running it, :func:`guidelab.models.edm2.load_pkl`),
    or a training run folder's post-hoc EMA of ``sigma_rel`` at ``step`` (:func:`reconstruct`; default the last snapshot)."""
    path = Path(path)
    check(path.exists(), f"checkpoint not found: {path} (pass a .safetensors checkpoint, an EDM2 .pkl or a training run folder)")
    if path.suffix == ".pkl" and path.is_file():
        from ..models.edm2 import load_pkl

        return load_pkl(path).to(device)
    return reconstruct(path, sigma_rel, step, device) if path.is_dir() else checkpoint.load_model(path, device)
