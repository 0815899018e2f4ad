"""UniPC's coefficients depend only on the step grid: a run solves for them before its first evaluation,
never between evaluations (issue 15 item 9), and the loop gives the same result as the per-step formula."""

import importlib

import numpy as np
import pytest
import torch

from guidelab import samplers, schedules, toy

unipc_module = importlib.import_module("guidelab.samplers.unipc")  # samplers.unipc is the function


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("corrector", [True, False])
def test_no_linear_solve_between_evaluations(monkeypatch, order, corrector):
    unipc_module._plan.cache_clear()  # a grid seen before would be served from the cache (no solve at all)
    calls = []
    solve = np.linalg.solve
    monkeypatch.setattr(unipc_module.np.linalg, "solve", lambda *a: calls.append(1) or solve(*a))
    seen = []
    tree = toy.tree("A", dtype=torch.float64)

    def denoiser(x, sigma, **cond):
        seen.append(len(calls))
        return tree(x, sigma, **cond)

    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    samplers.unipc(denoiser, x, schedules.karras(12, 0.002, 80.0), order=order, corrector=corrector)
    assert len(seen) == 12  # one evaluation per step (the last to sigma = 0)
    assert len(set(seen)) == 1  # every solve happened before the first evaluation
    if order == 3:
        assert calls  # order 3 does solve (the count is not vacuously zero)


def test_the_grid_plan_is_computed_once_per_grid(monkeypatch):
    """A job samples block after block on one grid: the second run solves nothing and gives the same bits."""
    unipc_module._plan.cache_clear()
    calls = []
    solve = np.linalg.solve
    monkeypatch.setattr(unipc_module.np.linalg, "solve", lambda *a: calls.append(1) or solve(*a))
    tree = toy.tree("A", dtype=torch.float64)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80
    sig = schedules.karras(10, 0.002, 80.0)
    first = samplers.unipc(tree, x, sig, order=3)
    solved = len(calls)
    assert solved and torch.equal(samplers.unipc(tree, x, sig, order=3), first) and len(calls) == solved
    samplers.unipc(tree, x, schedules.karras(11, 0.002, 80.0), order=3)  # another grid: solved afresh
    assert len(calls) > solved


def test_third_order_weights_solve_the_order_conditions():
    # UniC-3 on a grid: the weights w_k = -B rho_k / r_k with R rho = b (their Theorem 3.1), checked
    # against an independent float64 solve of the same 3 x 3 system.
    sig = schedules.karras(10, 0.002, 80.0).tolist()
    i, p = 5, 3
    w = unipc_module._weights(sig, i, p, "bh2", True)
    h = np.log(sig[i]) - np.log(sig[i + 1])
    hh = -h
    B = np.expm1(hh)
    rks = [(np.log(sig[i]) - np.log(sig[i - k])) / h for k in (1, 2)] + [1.0]
    # k! h phi_{k+1}(hh) / B, phi from their definition: phi_1 = (e^z - 1)/z, phi_{k+1} = (phi_k - 1/k!)/z
    phi, b, fact = np.expm1(hh) / hh, [], 1.0
    for k in range(1, p + 1):
        phi = (phi - 1 / fact) / hh
        b.append(fact * hh * phi / B)
        fact *= k + 1
    R = np.array([[r ** (k - 1) for r in rks] for k in range(1, p + 1)])
    rho = np.linalg.solve(R, np.array(b))
    assert np.allclose(w, [-B * r / rk for r, rk in zip(rho, rks)], rtol=1e-10, atol=0)
